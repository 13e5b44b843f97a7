"""Streaming class-conditional batches from webdataset shards, resumable to the exact batch.

How the stream is laid out, and why it can resume exactly:
- Each rank runs ``num_workers`` *logical streams*; stream ``s`` of rank ``r`` (global id
  ``g = r * num_workers + s``) owns shards ``g, g + G, g + 2G, ...`` (``G`` streams in all), so ranks
  and workers never read the same sample.
- A stream is a pure function of (seed, g): per epoch its shard order and shuffle buffer are driven
  by a generator seeded from (seed, g, epoch), and its batches are cut from consecutive raw records.
- Batch ``k`` of a rank always comes from logical stream ``k % num_workers``. The DataLoader hands
  out worker outputs round-robin starting at worker 0, so a loader restarted after ``k`` batches
  maps worker ``w`` to stream ``(w + k) % num_workers``, and each stream skips the raw records it had
  already batched (no decoding). The whole position is therefore one number: batches consumed.
- A sample that cannot be decoded is counted and replaced inside its batch by another sample of the
  same batch, so batch shapes and positions do not depend on decoding success.
- A shard that cannot be read (empty, not a tar, truncated) is skipped from the damage on, named in
  a warning and counted (``skipped_shards`` of the next batch); a stream whose shards yield no
  sample at all in an epoch stops with a DataError naming them instead of spinning forever.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
# Latent shards: SD-VAE posterior moments of the image and of its mirror, (2 flips, 2 moments, C, h, w).
MOMENTS_KEY = "moments.npy"


class DataError(ValueError):
    """A problem with the data set as configured (paths, shard counts)."""


def resolve_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a directory, a brace pattern / glob, or a list; each must exist."""
    if isinstance(spec, list):
        paths = [str(p) for p in spec]
    else:
        path = Path(spec)
        if path.is_dir():
            manifest = path / "manifest.json"
            if manifest.is_file():
                shards = json.loads(manifest.read_text())["shards"]
                paths = [str(path / shard["name"]) for shard in shards]
            else:
                paths = sorted(glob.glob(str(path / "*.tar")))
            if not paths:
                raise DataError(
                    f"shard directory {str(path)!r} holds no manifest.json and no *.tar files; "
                    "expected webdataset shards (make them with `advdit data demo` or "
                    "`advdit data imagenet`)"
                )
        else:
            paths = sorted(p for pattern in braceexpand.braceexpand(spec) for p in glob.glob(pattern))
            if not paths:
                raise DataError(
                    f"data.shards {spec!r} matches no file; expected a shard directory, a brace "
                    "pattern such as 'data/train-{000000..000007}.tar', or a list of .tar paths"
                )
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"shard file {missing[0]!r} does not exist ({len(missing)} missing in all)")
    return paths


def check_manifest(spec: str | list[str], image_size: int) -> None:
    """Compare a shard directory's manifest with the configured image size, before any training.

    Without this, a mismatch would surface only as every sample being "corrupt".
    """
    manifest = Path(spec) / "manifest.json" if isinstance(spec, str) else None
    if manifest is None or not manifest.is_file():
        return
    made_at = json.loads(manifest.read_text()).get("preprocessing", {}).get("image_size")
    if made_at is not None and made_at != image_size:
        raise DataError(
            f"shards in {str(manifest.parent)!r} hold {made_at}x{made_at} images (manifest.json), but "
            f"data.image_size is {image_size}; rewrite the shards or set data.image_size={made_at}"
        )


def decode_label(record: dict[str, Any], num_classes: int) -> int:
    if "cls" not in record:
        raise ValueError("no 'cls' member")
    label = int(record["cls"].decode().strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside [0, {num_classes})")
    return label


def decode_moments(record: dict[str, Any], latent_size: int | None) -> np.ndarray:
    moments = np.load(io.BytesIO(record[MOMENTS_KEY]), allow_pickle=False)
    if moments.ndim != 5 or moments.shape[:2] != (2, 2):
        raise ValueError(f"moments have shape {moments.shape}, expected (2, 2, C, h, w)")
    if latent_size is not None and moments.shape[-2:] != (latent_size, latent_size):
        raise ValueError(f"latents are {moments.shape[-1]}x{moments.shape[-2]}, expected {latent_size}^2")
    return moments


def decode_sample(record: dict[str, Any], image_size: int, num_classes: int,
                  latent_size: int | None = None) -> tuple[np.ndarray, int]:
    """A raw tar record -> (HWC uint8 RGB image, or (2, 2, C, h, w) latent moments; label).

    Raises ValueError on anything wrong.
    """
    label = decode_label(record, num_classes)
    if MOMENTS_KEY in record:
        return decode_moments(record, latent_size), label
    image_key = next((key for key in IMAGE_KEYS if key in record), None)
    if image_key is None:
        raise ValueError(f"no image member (one of {IMAGE_KEYS}) and no {MOMENTS_KEY}")
    with Image.open(io.BytesIO(record[image_key])) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape[:2] != (image_size, image_size):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected {image_size}^2")
    return pixels, label


def _stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])


@dataclass
class StreamSpec:
    shards: list[str]
    seed: int
    batch_size: int
    shuffle_buffer: int
    image_size: int
    num_classes: int
    random_flip: bool
    latent_size: int | None = None  # the expected h = w of latent shards' moments


class ShardError(ValueError):
    """A shard that cannot be read on (empty, not a tar, truncated); its earlier records stand."""


def _tar_size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes beyond the octal field's range
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ") or b"0", 8)


def _header_checksum_ok(header: bytes) -> bool:
    """The tar header checksum: the byte sum with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _pax_path(body: bytes) -> str | None:
    """The ``path`` record of a PAX extended header ("<len> path=<value>\n" lines)."""
    for line in body.split(b"\n"):
        _, _, record = line.partition(b" ")
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode()
    return None


def _member_header(data: memoryview, offset: int, path: str) -> tuple[bytes, int] | None:
    """(header, body size) of the member at ``offset``; None at the end of the archive."""
    if offset == len(data) and offset:
        return None  # ends after a complete member, without the end-of-archive blocks
    if offset + 512 > len(data):
        what = f"is truncated at byte {len(data)} (inside a header)" if len(data) else "is empty (0 bytes)"
        raise ShardError(f"{path} {what}")
    header = bytes(data[offset:offset + 512])
    if not header.strip(b"\0"):
        return None  # the end-of-archive blocks
    if not _header_checksum_ok(header):
        raise ShardError(f"{path} has no valid tar header at byte {offset} (not a tar file, or damaged)")
    try:
        size = _tar_size(header[124:136])
    except ValueError as err:
        raise ShardError(f"{path}: the tar header at byte {offset} has a non-octal size field") from err
    if offset + 512 + size > len(data):
        raise ShardError(f"{path} is truncated at byte {len(data)} (inside a member of {size} bytes)")
    return header, size


def tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar archive, in order; a ShardError where it cannot
    be read on (the members before it are yielded).

    A reader of its own rather than ``tarfile``: it parses the 512-byte headers of a file read at
    once, several times faster per member, which is what keeps small-member shards (latents)
    from being loader-bound. PAX and GNU long names are understood; other entries are skipped.
    """
    data = memoryview(Path(path).read_bytes())
    offset, long_name = 0, None
    while (found := _member_header(data, offset, path)) is not None:
        header, size = found
        kind = header[156:157]
        body = data[offset + 512:offset + 512 + size]
        offset += 512 + (size + 511) // 512 * 512
        if kind == b"x":
            long_name = _pax_path(bytes(body))
        elif kind == b"L":
            long_name = bytes(body).rstrip(b"\0").decode()
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), bytes(body)
            long_name = None


def iter_records(paths: list[str], skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes keyed by extension, plus ``__key__`` and ``__url__``).

    Members sharing a key (the name up to the first dot of its last component, as webdataset
    groups them) and standing next to each other form one sample. A shard that cannot be read (on)
    is named in a warning and in ``skipped``; its readable records before the damage are kept.
    """
    for path in paths:
        record: dict[str, Any] = {}
        try:
            for name, payload in tar_members(path):
                folder, _, base = name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot or stem.startswith("__"):
                    continue  # no extension, or webdataset's metadata members
                key = f"{folder}/{stem}" if folder else stem
                if record and record["__key__"] != key:
                    yield record
                    record = {}
                if not record:
                    record = {"__key__": key, "__url__": path}
                record[extension.lower()] = payload
        except (ShardError, OSError, UnicodeDecodeError) as err:
            logger.warning("skipping unreadable shard data: %s", err)
            if skipped is not None:
                skipped.append(str(err))
            continue  # the record being assembled may be incomplete: dropped
        if record:
            yield record


def shuffled(records: Iterator[dict[str, Any]], buffer_size: int, rng: random.Random):
    """Reservoir shuffle: fill the buffer, then emit a random element for each new record."""
    buffer: list[dict[str, Any]] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        index = rng.randrange(len(buffer))
        yield buffer[index]
        buffer[index] = record
    rng.shuffle(buffer)
    yield from buffer


def raw_batches(spec: StreamSpec, stream_id: int) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Endless (``batch_size`` raw records, shards skipped since the last batch) of one logical
    stream, epoch after epoch. An epoch without a single readable record is a DataError: the
    stream would otherwise spin forever."""
    pending: list[dict[str, Any]] = []
    skipped: list[str] = []
    reported = 0
    for epoch in range(1 << 62):
        rng = random.Random(_stream_seed(spec.seed, stream_id, epoch))
        order = list(spec.shards)
        rng.shuffle(order)
        records = 0
        for record in shuffled(iter_records(order, skipped), spec.shuffle_buffer, rng):
            records += 1
            pending.append(record)
            if len(pending) == spec.batch_size:
                yield pending, len(skipped) - reported
                reported = len(skipped)
                pending = []
        if not records:
            reasons = "; ".join(skipped[-len(order):]) or "no samples in them"
            raise DataError(f"shards {', '.join(order)} yield no readable sample ({reasons}); "
                            "rewrite or remove them")


def collate(spec: StreamSpec, records: list[dict[str, Any]], flip_seed: int) -> dict[str, Any]:
    """Decode a raw batch; corrupt samples are replaced by good ones of the same batch.

    Image batches hold ``images``, (B, 3, H, W) uint8 (4x less to move than floats; the trainer
    normalises on its device with :func:`normalize_images`); latent batches hold ``moments``
    (B, 2, C, h, w), the mean and std of the image or of its mirror, as the flip draw says.
    """
    images, labels, keys, bad = [], [], [], []
    for record in records:
        try:
            pixels, label = decode_sample(record, spec.image_size, spec.num_classes, spec.latent_size)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt sample
            bad.append(f"{record.get('__url__', '?')}:{record.get('__key__', '?')} ({err})")
            continue
        images.append(pixels)
        labels.append(label)
        keys.append(record["__key__"])
    for where in bad:
        logger.warning("skipping corrupt sample %s", where)
    if not images:
        raise DataError(f"every sample of a batch is corrupt, e.g. {bad[0]}; check the shards")
    fill = len(records) - len(images)
    images += images[:fill] * (fill // max(len(images), 1) + 1)
    labels += labels[:fill] * (fill // max(len(labels), 1) + 1)
    keys += keys[:fill] * (fill // max(len(keys), 1) + 1)
    samples = images[: len(records)]
    flip = [False] * len(samples)
    if spec.random_flip:
        flip = (torch.rand(len(samples), generator=torch.Generator().manual_seed(flip_seed)) < 0.5).tolist()
    batch: dict[str, Any] = {"labels": torch.tensor(labels[: len(records)], dtype=torch.long),
                             "keys": keys[: len(records)], "corrupt": len(bad)}
    if samples[0].ndim == 5:  # latent moments: pick the stored mirror instead of flipping latents
        batch["moments"] = torch.from_numpy(np.stack([m[int(f)] for m, f in zip(samples, flip, strict=True)]))
        batch["moments"] = batch["moments"].float()
    else:  # HWC -> CHW and the flip as views; np.stack makes the one copy
        views = [(pixels[:, ::-1] if f else pixels).transpose(2, 0, 1)
                 for pixels, f in zip(samples, flip, strict=True)]
        batch["images"] = torch.from_numpy(np.stack(views))
    return batch


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


class ShardStream(IterableDataset):
    """Yields whole decoded batches; see the module docstring for the resume contract."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int, num_workers: int,
                 start_batch: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.rank = rank
        self.streams_per_rank = max(num_workers, 1)
        self.start_batch = start_batch
        total = world_size * self.streams_per_rank
        if len(spec.shards) < total:
            raise DataError(
                f"{len(spec.shards)} shards cannot feed {world_size} process(es) x "
                f"{self.streams_per_rank} loader worker(s) = {total} streams without repeats; "
                "write more shards or lower data.num_workers"
            )
        self.total_streams = total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.start_batch) % self.streams_per_rank
        stream_id = self.rank * self.streams_per_rank + local
        spec = dataclasses.replace(self.spec, shards=self.spec.shards[stream_id :: self.total_streams])
        # Batches this stream handed out before the restart: k < start_batch with k % W == local.
        already = max(0, -(-(self.start_batch - local) // self.streams_per_rank))
        for index, (records, skipped) in enumerate(raw_batches(spec, stream_id)):
            if index < already:
                continue
            batch = collate(spec, records, _stream_seed(self.spec.seed, stream_id, index, 1))
            batch["skipped_shards"] = skipped
            yield batch


def next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The loader's next batch. A DataError raised in a loader worker comes back with the worker's
    traceback folded into its message: keep the message the worker raised."""
    try:
        return next(batches)
    except DataError as err:
        text = str(err)
        if "Traceback" not in text:
            raise
        raise DataError(text.rstrip().rpartition("DataError: ")[2]) from None


def build_loader(spec: StreamSpec, rank: int, world_size: int, num_workers: int,
                 start_batch: int = 0) -> DataLoader:
    """An endless DataLoader of batches, positioned after ``start_batch`` batches of this rank."""
    dataset = ShardStream(spec, rank, world_size, num_workers, start_batch)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
