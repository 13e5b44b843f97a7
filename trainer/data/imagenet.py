"""ImageNet as webdataset shards of ADM-centre-cropped JPEGs (``advdit data imagenet``).

Sources: an ILSVRC2012 folder (``train/<synset>/<file>.JPEG``; ``val/`` either flat with a label
file or in synset folders), or existing webdataset shards (``KEY.jpg|jpeg|png|webp`` + ``KEY.cls``,
e.g. timm/imagenet-1k-wds). Images are decoded by content, so PNG data under a ``.JPEG`` name, CMYK
and grayscale JPEGs all come out as RGB; each is centre-cropped as ADM and DiT do and stored as
``KEY.jpg`` + ``KEY.cls``. Class ids follow sorted synsets (ImageFolder order), as the published
DiT checkpoints assume, unless a synsets file gives the order.

Order, sharding and restarts: the source samples are put in one fixed order (folders: by synset,
then file name; shards: by tar name, then position in the tar) and shard ``k`` holds source
samples ``[k*S, (k+1)*S)``, keyed by their position in that order. A sample that cannot be decoded
is logged, left out of its shard and listed in the manifest; it shifts nothing, so a shard's bytes
depend only on the source list and the settings. A shard is written as ``.tar.tmp``, renamed to
``.tar``, then given a ``.tar.done`` sidecar (its manifest entry, class counts, skipped files and
the settings). A rerun keeps every shard whose sidecar matches the settings and the tar's size and
redoes the others, overwriting any half-written ``.tmp``; tar members get a fixed mtime, so redone
shards are byte-identical to the first run's.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
import PIL
from PIL import Image
from tqdm import tqdm

from ..runtime.files import write_json_atomic
from .decode import IMAGE_KEYS
from .errors import DataError
from .manifest import resolve_shards, write_manifest_file
from .sources import is_remote, kind_of, open_stream, read_range
from .tar import ShardError, split_member_name, stream_entries
from .writer import ShardFile

logger = logging.getLogger(__name__)

CROP = ("adm_center_crop: halve with PIL BOX while the short side >= 2*size, resize with PIL BICUBIC "
        "so the short side is size (each side rounded), central size x size crop (floor offsets)")
SHARDING = ("shard k holds source samples [k*samples_per_shard, (k+1)*samples_per_shard) of the "
            "fixed source order, keyed by their index in it; unreadable ones are left out")
# Enough samples per task to amortise inter-process messaging, few enough to keep results in order
# without a long wait at the end of each shard.
CHUNK = 8


class SourceSample(NamedTuple):
    """One source image: ``length`` bytes at ``offset`` of ``path`` (``length == -1``: to the end).
    A tuple rather than a dataclass: there are 1.28M of them, and each is pickled to a worker."""

    name: str  # how warnings and the manifest name it: a path relative to the source, or TAR:KEY
    path: str
    label: int
    offset: int = 0
    length: int = -1
    problem: str = ""  # found while listing (e.g. no cls member): skipped like an unreadable image


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's ``center_crop_arr``, which DiT trains on: cheap BOX halvings down to < 2x the target,
    one BICUBIC resize of the short side to ``size``, then the central square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size),
                         resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _read(sample: SourceSample) -> bytes:
    if is_remote(sample.path):
        return read_range(sample.path, sample.offset, sample.length)
    with open(sample.path, "rb") as handle:
        handle.seek(sample.offset)
        return handle.read(sample.length)


def convert_sample(sample: SourceSample, size: int, quality: int) -> tuple[bytes | None, str]:
    """(JPEG bytes, "") or (None, why): failures come back as text so that one bad file neither
    stops the worker pool nor loses its place in the order."""
    if sample.problem:
        return None, sample.problem
    try:
        with Image.open(io.BytesIO(_read(sample))) as image:
            rgb = image.convert("RGB")  # decodes everything: a truncated file fails here
    except Exception as err:  # whatever PIL raises, the file cannot be used
        return None, f"{type(err).__name__}: {err}"
    buffer = io.BytesIO()
    adm_center_crop(rgb, size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), ""


# ---------------------------------------------------------------------------------------------
# Listing the source in its fixed order


def _entries(folder: Path, dirs: bool) -> list[str]:
    """Sorted names of the sub-folders (or files) of ``folder``, hidden ones left out; a DataError
    names an entry that cannot be looked at (a symlink loop, a dangling mount)."""
    try:
        with os.scandir(folder) as scan:
            return sorted(entry.name for entry in scan
                          if not entry.name.startswith(".") and (entry.is_dir() if dirs else entry.is_file()))
    except OSError as err:
        raise DataError(f"cannot list the source at {err.filename or folder}: {err.strerror or err}") from err


def read_synsets(path: str | Path) -> list[str]:
    """Synsets in class order: the first token of each line (the LOC_synset_mapping.txt form)."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def read_val_labels(path: str | Path) -> dict[str, str]:
    """File stem -> synset, from ``<file> <synset>`` lines or Kaggle's LOC_val_solution.csv
    (``ImageId,PredictionString``; the synset is the first token of the prediction string)."""
    labels = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("ImageId,"):
            continue
        parts = re.split(r"[,\s]+", line.strip())
        if len(parts) < 2:
            raise DataError(f"{path}:{number}: expected '<file> <synset>' or 'ImageId,<synset> ...', "
                            f"got {line!r}")
        labels[Path(parts[0]).stem] = parts[1]
    return labels


def _class_list(root: Path, split_dir: Path, synsets: str | Path | None) -> list[str]:
    if synsets is not None:
        return read_synsets(synsets)
    for folder in (root / "train", split_dir):
        names = _entries(folder, dirs=True) if folder.is_dir() else []
        if names:
            return names
    raise DataError(f"no class list for {split_dir}: give a synsets file (--synsets) or keep the "
                    f"train/<synset>/ folders beside it in {root}")


def _class_index(classes: list[str], found: list[str], where: Path) -> dict[str, int]:
    index = {synset: position for position, synset in enumerate(classes)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise DataError(f"{len(unknown)} synset(s) of {where} are not in the class list, "
                        f"e.g. {unknown[0]!r}")
    return index


def _folder_samples(root: Path, split: str, val_labels: str | Path | None,
                    synsets: str | Path | None) -> tuple[list[SourceSample], list[str]]:
    split_dir = root / split
    classes = _class_list(root, split_dir, synsets)
    synset_dirs = _entries(split_dir, dirs=True)
    if synset_dirs:
        pairs = [(synset, f"{synset}/{name}") for synset in synset_dirs
                 for name in _entries(split_dir / synset, dirs=False)]
    else:
        if val_labels is None:
            raise DataError(f"{split_dir} is flat (no synset folders): give its label file "
                            "(--val-labels, e.g. LOC_val_solution.csv)")
        synset_of = read_val_labels(val_labels)
        files = _entries(split_dir, dirs=False)
        unlabelled = [name for name in files if Path(name).stem not in synset_of]
        if unlabelled:
            raise DataError(f"{len(unlabelled)} file(s) of {split_dir} have no label in {val_labels}, "
                            f"e.g. {unlabelled[0]!r}")
        pairs = sorted((synset_of[Path(name).stem], name) for name in files)
    index = _class_index(classes, [synset for synset, _ in pairs], split_dir)
    samples = [SourceSample(f"{split}/{name}", str(split_dir / name), index[synset])
               for synset, name in pairs]
    return samples, classes


def _tar_samples(tar_path: Path) -> list[SourceSample]:
    try:
        return _read_tar_samples(tar_path)
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"source tar {tar_path} cannot be read ({err}): it is damaged or truncated; "
                        "fetch it again or leave it out of --source") from err


def _remote_tar_samples(url: str) -> list[SourceSample]:
    """As :func:`_read_tar_samples` for a remote tar (sources.py), streamed once: the labels are
    read now, the images later by the workers, with Range requests or seeks."""
    samples = []
    try:
        with open_stream(url) as stream:
            entries = stream_entries(stream, url)
            for key, group in itertools.groupby(entries, key=lambda entry: split_member_name(entry[0])[0]):
                parts = {split_member_name(name)[1]: (offset, body) for name, offset, body in group}
                name = f"{url.rpartition('/')[2]}:{key}"
                image = next((parts[ext] for ext in IMAGE_KEYS if ext in parts), None)
                try:
                    label = int(parts["cls"][1].decode().strip())
                except (KeyError, ValueError) as err:
                    samples.append(SourceSample(name, url, -1, problem=f"no integer cls member ({err})"))
                    continue
                if image is None:
                    samples.append(SourceSample(name, url, label, problem="no image member"))
                    continue
                samples.append(SourceSample(name, url, label, image[0], len(image[1])))
    except (ShardError, OSError) as err:
        raise DataError(f"source tar {url} cannot be read ({err}): it is damaged, truncated or "
                        "unreachable; fix it or leave it out of --source") from err
    return samples


def _read_tar_samples(tar_path: Path) -> list[SourceSample]:
    samples = []
    with tarfile.open(tar_path, "r:") as tar:
        members = [member for member in tar if member.isfile()]  # headers only: data is skipped
        for key, group in itertools.groupby(members, key=lambda m: split_member_name(m.name)[0]):
            parts = {split_member_name(member.name)[1]: member for member in group}
            name = f"{tar_path.name}:{key}"
            image = next((parts[ext] for ext in IMAGE_KEYS if ext in parts), None)
            try:
                label = int(tar.extractfile(parts["cls"]).read().decode().strip())
            except (KeyError, ValueError) as err:
                problem = f"no integer cls member ({err})"
                samples.append(SourceSample(name, str(tar_path), -1, problem=problem))
                continue
            if image is None:
                samples.append(SourceSample(name, str(tar_path), label, problem="no image member"))
                continue
            samples.append(SourceSample(name, str(tar_path), label, image.offset_data, image.size))
    return samples


def _find_tars(source: str, split: str) -> list[Path]:
    root = Path(source)
    if not root.is_dir():
        return sorted(Path(p) for pattern in braceexpand.braceexpand(source) for p in glob.glob(pattern))
    tars = sorted(root.glob("*.tar"))
    # imagenet-1k-wds keeps train and validation shards side by side; "val" matches "validation".
    if any(word in tar.name for tar in tars for word in ("train", "val")):
        tars = [tar for tar in tars if split in tar.name]
    return tars


def list_source(source: str | Path, split: str = "train", val_labels: str | Path | None = None,
                synsets: str | Path | None = None) -> tuple[str, list[SourceSample], list[str] | None]:
    """(kind, samples in the fixed order, class names where known) of an ImageNet source."""
    if is_remote(str(source)):
        urls = resolve_shards(str(source))
        pipes = [url for url in urls if kind_of(url) == "pipe"]
        if pipes:
            raise DataError(f"--source {pipes[0]!r}: advdit data imagenet reads each image of a tar on "
                            "its own (worker processes, in any order), which a pipe: command cannot "
                            "serve; give the tars as http(s):// or fsspec URLs (s3://, gs://), or copy them")
        classes = read_synsets(synsets) if synsets is not None else None
        return "webdataset", [sample for url in urls for sample in _remote_tar_samples(url)], classes
    root = Path(source)
    if (root / split).is_dir():
        samples, classes = _folder_samples(root, split, val_labels, synsets)
        return "ilsvrc-folder", samples, classes
    tars = _find_tars(str(source), split)
    if not tars:
        raise DataError(f"--source {str(source)!r} holds neither a {split}/ folder nor webdataset "
                        f".tar shards of split {split!r}")
    classes = read_synsets(synsets) if synsets is not None else None
    return "webdataset", [sample for tar in tars for sample in _tar_samples(tar)], classes


# ---------------------------------------------------------------------------------------------
# Writing shards


def _list_digest(samples: list[SourceSample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.name}\t{sample.label}\n".encode())
    return digest.hexdigest()


def _done_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".done")


class _ImageNetShard(ShardFile):
    """A shard of ``source_range`` of the source order; when complete, a ``.tar.done`` sidecar
    records it (what a rerun checks to keep it) with its skipped files and the settings."""

    def __init__(self, out_dir: Path, prefix: str, index: int, source_range: range) -> None:
        super().__init__(out_dir / f"{prefix}-{index:06d}.tar")
        self.index = index
        self.source_range = source_range
        self.skipped: list[dict[str, str]] = []

    def finish_with_sidecar(self, settings: dict[str, Any]) -> dict[str, Any]:
        record = {
            **self.finish(), "bytes": self.path.stat().st_size,
            "source_range": [self.source_range.start, self.source_range.stop],
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
            "skipped": self.skipped, "settings": settings,
        }
        write_json_atomic(_done_path(self.path), record)
        return record


def _check_settings(out_dir: Path, prefix: str, settings: dict[str, Any]) -> None:
    """Refuse to mix shards made with other settings (or another source list) into one set."""
    for done in sorted(out_dir.glob(f"{prefix}-*.tar.done")):
        theirs = json.loads(done.read_text())["settings"]
        if theirs != settings:
            differ = sorted(key for key in settings.keys() | theirs.keys()
                            if settings.get(key) != theirs.get(key))
            raise DataError(f"{out_dir} holds shards written with other settings ({done.name}: "
                            f"{', '.join(differ)} differ); write to a new --out or delete them")


def _finished(shard: Path) -> dict[str, Any] | None:
    """The sidecar record of a complete shard, or None when the shard must be (re)written."""
    done = _done_path(shard)
    if not (done.is_file() and shard.is_file()):
        return None
    record = json.loads(done.read_text())
    return record if shard.stat().st_size == record["bytes"] else None


def _shard_range(k: int, per_shard: int, total: int) -> range:
    return range(k * per_shard, min((k + 1) * per_shard, total))


def _convert_shards(out_dir: Path, prefix: str, samples: list[SourceSample], todo: list[int],
                    per_shard: int, settings: dict[str, Any], workers: int,
                    progress: bool) -> dict[int, dict[str, Any]]:
    """Write shards ``todo``: workers decode and crop in order, this process writes the tars."""
    indices = [i for k in todo for i in _shard_range(k, per_shard, len(samples))]
    convert = functools.partial(convert_sample, size=settings["image_size"], quality=settings["jpeg_quality"])
    records: dict[int, dict[str, Any]] = {}
    shard: _ImageNetShard | None = None
    start = time.perf_counter()
    # The pool forks before tqdm starts its monitor thread.
    with multiprocessing.Pool(workers) as pool:
        results = pool.imap(convert, (samples[i] for i in indices), chunksize=CHUNK)
        bar = tqdm(zip(indices, results, strict=True), total=len(indices), unit="img", disable=not progress,
                   desc=f"imagenet {prefix} {settings['image_size']}px")
        for i, (jpg, problem) in bar:
            if shard is None or i not in shard.source_range:
                if shard is not None:
                    records[shard.index] = shard.finish_with_sidecar(settings)
                k = i // per_shard
                shard = _ImageNetShard(out_dir, prefix, k, _shard_range(k, per_shard, len(samples)))
            if jpg is None:
                logger.warning("skipping unreadable image %s (%s)", samples[i].path, problem)
                shard.skipped.append({"path": samples[i].name, "error": problem})
            else:
                shard.write(f"{i:08d}", samples[i].label, {"jpg": jpg})
    if shard is not None:
        records[shard.index] = shard.finish_with_sidecar(settings)
    seconds = time.perf_counter() - start
    logger.info("converted %d images in %.1f s: %.1f images/s, %.1f images/s per worker process (%d)",
                len(indices), seconds, len(indices) / seconds, len(indices) / seconds / workers, workers)
    return records


def _manifest(prefix: str, records: list[dict[str, Any]], preprocessing: dict[str, Any],
              classes: list[str] | None, settings: dict[str, Any]) -> dict[str, Any]:
    class_counts: Counter[int] = Counter()
    for record in records:
        class_counts.update({int(k): v for k, v in record["class_counts"].items()})
    skipped = [entry for record in records for entry in record["skipped"]]
    manifest = {
        "prefix": prefix,
        "num_samples": sum(record["samples"] for record in records),
        # A shard whose every file was unreadable is left out: the loader must not get empty streams.
        "shards": [{key: record[key] for key in ("name", "samples", "sha256", "bytes", "source_range")}
                   for record in records if record["samples"]],
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "preprocessing": preprocessing,
        "sharding": SHARDING,
        "samples_per_shard": settings["samples_per_shard"],
        "source_samples": settings["source_samples"],
        "source_list_sha256": settings["source_list_sha256"],
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    if classes is not None:
        manifest["class_names"] = classes
    return manifest


def write_imagenet_shards(source: str | Path, out_dir: str | Path, size: int = 256,
                          samples_per_shard: int = 1000, workers: int | None = None,
                          split: str = "train", quality: int = 95, val_labels: str | Path | None = None,
                          synsets: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert an ImageNet split into ``{split}-NNNNNN.tar`` shards of ``size``-pixel JPEGs under
    ``out_dir``; finished shards of an earlier run are kept. Returns the manifest."""
    if size <= 0 or samples_per_shard <= 0 or not 1 <= quality <= 100:
        raise DataError(f"need size > 0, samples_per_shard > 0 and 1 <= quality <= 100; got {size}, "
                        f"{samples_per_shard}, {quality}")
    kind, samples, classes = list_source(source, split, val_labels, synsets)
    if not samples:
        raise DataError(f"{source} holds no images of split {split!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocessing = {"source": str(source), "source_kind": kind, "split": split, "crop": CROP,
                     "image_size": size, "format": "jpg", "jpeg_quality": quality,
                     "pillow": PIL.__version__,
                     "order": "by synset, then file name" if kind == "ilsvrc-folder"
                     else "by tar name, then position in the tar"}
    # Everything a shard's bytes depend on, apart from where the source lies.
    settings = {**{k: v for k, v in preprocessing.items() if k != "source"},
                "samples_per_shard": samples_per_shard, "source_samples": len(samples),
                "source_list_sha256": _list_digest(samples)}
    _check_settings(out, split, settings)
    num_shards = -(-len(samples) // samples_per_shard)
    records = {k: record for k in range(num_shards)
               if (record := _finished(out / f"{split}-{k:06d}.tar")) is not None}
    todo = [k for k in range(num_shards) if k not in records]
    if records:
        logger.info("keeping %d finished shard(s) of %d; writing %d", len(records), num_shards, len(todo))
    if todo:
        records |= _convert_shards(out, split, samples, todo, samples_per_shard, settings,
                                   workers or len(os.sched_getaffinity(0)), progress)
    manifest = _manifest(split, [records[k] for k in range(num_shards)], preprocessing, classes, settings)
    write_manifest_file(out, manifest)
    return manifest
