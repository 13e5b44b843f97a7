"""FID and Inception Score: the feature network, float64 statistics, reference statistics.

- The feature network is the TF-ported Inception-v3 of the FID literature (torch-fidelity's
  ``FeatureExtractorInceptionV3``: pool3 features, 2048-d, and the unbiased 1008-way logits for
  IS), with its weights read from a local file whose SHA-256 is checked; nothing is downloaded and
  no other network is ever substituted. It is built from a :class:`FeatureSpec` and a weights
  file; a spec file can name a small CNN instead (``arch: convnet``), which is how the tests run
  the whole path with a tiny random network saved to a file.
- Images enter as uint8 and are resized to the network's input size with TF1's bilinear resize
  (torch-fidelity's reimplementation, ``align_corners=False``), as the graph of the ADM evaluator
  resizes them (docs/architecture.md, "FID").
- Statistics are running float64 sums (count, sum of features, sum of outer products; per-split
  sums for IS), so ranks all-reduce the sums instead of gathering features (EDM2's approach).
- Reference statistics come from an ADM reference batch (``mu``, ``sigma``), from a statistics
  file written by ``advdit fid --save-stats``, or from validation shards, computed once and cached
  under a hash of how they were made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from scipy import linalg
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import DataError, check_manifest, decode_sample, iter_records, resolve_shards
from ..data.sources import is_remote, source_sizes
from ..runtime.distributed import world

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "ADVDIT_INCEPTION_WEIGHTS"
IS_SPLIT_SIZE = 5000  # the ADM evaluator's split: samples [0, 5000), [5000, 10000), ...
STATS_META = "advdit_meta"  # the JSON record our statistics files carry next to mu and sigma
STATS_VERSION = 1  # bump when the way reference statistics are computed changes (it is hashed)


class FidError(DataError):
    """A problem with FID's inputs: the weights file, reference statistics or the sample set."""


# --------------------------------------------------------------------------- the feature network

@dataclass(frozen=True)
class FeatureSpec:
    """What a feature network is and which weights file it expects (checked by SHA-256)."""

    name: str  # recorded with every statistics file, so statistics of different networks never mix
    arch: str  # inception-v3-tf | convnet
    sha256: str
    feature_dim: int
    num_logits: int
    input_size: int
    file_name: str
    source: str  # where the weights file can be obtained
    widths: tuple[int, ...] = ()  # convnet only: channels of its stride-2 convolutions

    @classmethod
    def from_file(cls, path: str | Path) -> FeatureSpec:
        """A spec stored as JSON (the keys of this class)."""
        path = Path(path)
        if not path.is_file():
            raise FidError(f"feature network spec {str(path)!r} does not exist")
        fields = json.loads(path.read_text())
        fields["widths"] = tuple(fields.get("widths", ()))
        try:
            return cls(**fields)
        except TypeError as err:
            raise FidError(f"feature network spec {path}: {err}; expected the keys of "
                           f"{[f.name for f in dataclasses.fields(cls)]}") from err

    def to_file(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return Path(path)


INCEPTION_V3_TF = FeatureSpec(
    name="inception-v3-tf-2015-12-05",
    arch="inception-v3-tf",
    # 95,628,359 bytes; the same file as torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    feature_dim=2048,
    num_logits=1008,
    input_size=299,
    file_name="pt_inception-2015-12-05-6726825d.pth",
    source="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
           "pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's identical "
           "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
           "weights-inception-2015-12-05-6726825d.pth)",
)


def load_spec(path: str | Path | None) -> FeatureSpec:
    """The TF-ported Inception-v3 unless a spec file names another network."""
    return INCEPTION_V3_TF if path is None else FeatureSpec.from_file(path)


def tf_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, size, size) with TF1's bilinear resize, in [0, 255]."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    return interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(size, size), align_corners=False)


class ConvFeatureNet(nn.Module):
    """A small CNN with the Inception extractor's interface (uint8 images -> pool features and
    unbiased logits), for tests and smoke runs; its FID is comparable with nothing published."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        if not spec.widths or spec.widths[-1] != spec.feature_dim:
            raise FidError(f"convnet spec {spec.name!r}: widths {spec.widths} must end in feature_dim "
                           f"{spec.feature_dim}")
        layers: list[nn.Module] = []
        channels = 3
        for width in spec.widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(spec.feature_dim, spec.num_logits, bias=False)
        self.input_size = spec.input_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (tf_resize(images, self.input_size) - 128) / 128
        pool = self.body(x).mean(dim=(2, 3))
        return pool, self.fc(pool)


def resolve_weights(path: str | Path | None, spec: FeatureSpec) -> Path:
    """The weights file: ``path``, else $ADVDIT_INCEPTION_WEIGHTS; missing is an error saying which
    file is needed and where to get it."""
    path = path or os.environ.get(WEIGHTS_ENV)
    wanted = (f"{spec.file_name} (sha256 {spec.sha256}), from {spec.source}; nothing is downloaded at "
              f"run time: fetch it once, then pass --inception-weights PATH, set {WEIGHTS_ENV}=PATH, "
              "or eval.inception_weights=PATH in a training config")
    if not path:
        raise FidError(f"FID needs the weights of {spec.name}: the file {wanted}")
    if not Path(path).is_file():
        raise FidError(f"inception weights file {str(path)!r} does not exist; expected {wanted}")
    return Path(path)


def load_feature_net(weights: str | Path | None, spec: FeatureSpec = INCEPTION_V3_TF) -> nn.Module:
    """The feature network of ``spec`` with the weights of the file (checked by SHA-256), in eval
    mode; called with uint8 (N, 3, H, W) it returns (pool features, unbiased logits)."""
    path = resolve_weights(weights, spec)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec.sha256:
        raise FidError(f"inception weights file {str(path)!r} has sha256 {digest} ({len(blob)} bytes), "
                       f"expected {spec.sha256} ({spec.file_name} of {spec.name}): a different or "
                       "damaged file")
    if spec.arch == "inception-v3-tf":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # A file object, so torch-fidelity reads the verified bytes instead of downloading.
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=io.BytesIO(blob))
    elif spec.arch == "convnet":
        net = ConvFeatureNet(spec)
        net.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    else:
        raise FidError(f"feature network spec {spec.name!r}: unknown arch {spec.arch!r} "
                       "(inception-v3-tf or convnet)")
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------- statistics

class FeatureStats:
    """Float64 running sums of pool features (for mu and sigma) and of the softmax of the logits
    per IS split; additive, so ranks combine them with one all-reduce."""

    def __init__(self, feature_dim: int, num_logits: int = 0, num_splits: int = 0,
                 device: torch.device | str = "cpu") -> None:
        kwargs = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros((), **kwargs)
        self.sum = torch.zeros(feature_dim, **kwargs)
        self.outer = torch.zeros(feature_dim, feature_dim, **kwargs)
        self.split_count = torch.zeros(num_splits, **kwargs)
        self.split_probs = torch.zeros(num_splits, num_logits, **kwargs)
        self.split_neg_entropy = torch.zeros(num_splits, **kwargs)  # sum over x of sum_y p log p

    def add(self, features: torch.Tensor, logits: torch.Tensor | None = None,
            indices: torch.Tensor | None = None) -> None:
        """Add a batch; ``indices`` (sample numbers) place each sample's logits in its IS split."""
        features = features.to(self.sum.device, torch.float64)
        self.count += features.shape[0]
        self.sum += features.sum(dim=0)
        self.outer += features.T @ features
        if logits is None or self.split_count.numel() == 0:
            return
        log_p = torch.log_softmax(logits.to(self.sum.device, torch.float64), dim=1)
        splits = (indices.to(self.sum.device) // IS_SPLIT_SIZE).long()
        self.split_count.index_add_(0, splits, torch.ones_like(splits, dtype=torch.float64))
        self.split_probs.index_add_(0, splits, log_p.exp())
        self.split_neg_entropy.index_add_(0, splits, (log_p.exp() * log_p).sum(dim=1))

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.sum, self.outer, self.split_count, self.split_probs, self.split_neg_entropy]

    def all_reduce(self) -> FeatureStats:
        """Sum every rank's sums in place (a no-op in one process)."""
        if world()[1] > 1:
            for tensor in self.tensors():
                dist.all_reduce(tensor)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu and the unbiased covariance (np.cov's ddof = 1, as the ADM evaluator)."""
        count = float(self.count)
        if count < 2:
            raise FidError(f"statistics need at least 2 images, got {count:.0f}")
        mean = self.sum / count
        sigma = (self.outer - count * torch.outer(mean, mean)) / (count - 1)
        return mean.cpu().numpy(), sigma.cpu().numpy()

    def inception_score(self) -> tuple[float, float]:
        """Mean and std over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's marginal."""
        counts = self.split_count.cpu().numpy()
        marginals = self.split_probs.cpu().numpy() / counts[:, None]
        log_marginals = np.log(np.where(marginals > 0, marginals, 1.0))
        kl = self.split_neg_entropy.cpu().numpy() / counts - (marginals * log_marginals).sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as the ADM evaluator and
    pytorch-fid compute it (scipy's sqrtm; an eps ridge if the product is singular)."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FidError(f"the matrix square root has a large imaginary part "
                           f"({np.abs(covmean.imag).max():.3g}): the covariances are degenerate")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- statistics files

@dataclass
class Statistics:
    """mu and sigma of a set of images, and what is known of how they were made."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any]  # image_size, images, feature_net, ... (empty for ADM's reference batches)
    path: Path | None = None

    def describe(self) -> str:
        return str(self.path) if self.path else "statistics"


def npz_member_shape(path: str | Path, name: str) -> tuple[int, ...] | None:
    """The shape of array ``name`` in an .npz, read from its header alone (ADM's reference batches
    hold 10,000 images next to mu and sigma; they are not loaded to learn the resolution)."""
    with zipfile.ZipFile(path) as archive:
        if f"{name}.npy" not in archive.namelist():
            return None
        with archive.open(f"{name}.npy") as member:
            shape, _, _ = _npy_header(member)
    return tuple(shape)


def _npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream at ``handle``, which is left at the data."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def read_stats(path: str | Path) -> Statistics:
    """An ADM reference batch (mu, sigma, and arr_0 images) or a statistics file of ours."""
    path = Path(path)
    if not path.is_file():
        raise FidError(f"reference statistics file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise FidError(f"{path} holds no 'mu' and 'sigma' ({sorted(data.files)}); expected an ADM "
                           "reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or a file written by "
                           "advdit fid --save-stats")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        meta = json.loads(str(data[STATS_META])) if STATS_META in data else {}
    images = npz_member_shape(path, "arr_0")
    if images is not None and "image_size" not in meta:
        meta["image_size"] = images[1]
    return Statistics(mu, sigma, meta, path)


def write_stats(path: str | Path, stats: Statistics) -> Path:
    """mu, sigma (the ADM evaluator's keys) and our JSON record, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, mu=stats.mu, sigma=stats.sigma, **{STATS_META: np.array(json.dumps(stats.meta))})
    partial.replace(path)
    return path


def check_reference(ref: Statistics, image_size: int, spec: FeatureSpec) -> None:
    """Refuse reference statistics of another resolution, feature size or feature network."""
    where = ref.describe()
    if ref.mu.shape != (spec.feature_dim,) or ref.sigma.shape != (spec.feature_dim, spec.feature_dim):
        raise FidError(f"reference statistics {where} have {ref.mu.shape[0]}-d features (mu {ref.mu.shape}, "
                       f"sigma {ref.sigma.shape}), but {spec.name} gives {spec.feature_dim}-d features")
    made_with = ref.meta.get("feature_net")
    if made_with is not None and made_with != spec.name:
        raise FidError(f"reference statistics {where} were made with the feature network {made_with!r}, "
                       f"not {spec.name!r}")
    size = ref.meta.get("image_size")
    if size is not None and size != image_size:
        raise FidError(f"reference statistics {where} were made from {size}x{size} images, but the "
                       f"samples are {image_size}x{image_size}")


# --------------------------------------------------------------------------- image sources

def rank_batches(count: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's batches of sample numbers: batch k = [k B, (k + 1) B) goes to rank k mod world.

    Batches are cut the same way for any number of ranks, so every sample is computed in the same
    batch (bit for bit the same result) whether one process or many do the work.
    """
    starts = range(0, count, batch_size)
    return [range(start, min(start + batch_size, count)) for start in starts[rank::world_size]]


def npz_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of an .npz, memory-mapped when stored uncompressed (np.savez, ADM, DiT)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise FidError(f"{path} holds no arr_0 (expected N x H x W x 3 uint8 images)")
        info = archive.getinfo("arr_0.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with path.open("rb") as raw:
                raw.seek(info.header_offset + 26)  # the local header's name and extra lengths
                name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
                raw.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
                shape, fortran, dtype = _npy_header(raw)
                offset = raw.tell()
            images = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                               order="F" if fortran else "C")
        else:
            images = np.load(path)["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise FidError(f"{path}: arr_0 is {images.dtype} {images.shape}, expected N x H x W x 3 uint8")
    return images


def write_npz_images(path: str | Path, shape: tuple[int, int, int, int], chunks: Iterable[np.ndarray],
                     labels: np.ndarray | None = None) -> Path:
    """An ADM sample batch: ``arr_0`` (N x H x W x 3 uint8, streamed from ``chunks`` in order, so
    50,000 images need not fit in memory) and ``arr_1`` (the labels), as np.savez writes them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(shape)}
    written = 0
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for chunk in chunks:
                if chunk.shape[1:] != tuple(shape[1:]) or chunk.dtype != np.uint8:
                    raise ValueError(f"chunk {chunk.dtype} {chunk.shape} does not fit arr_0 {shape} uint8")
                member.write(np.ascontiguousarray(chunk).tobytes())
                written += len(chunk)
        if labels is not None:
            with archive.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(labels))
    if written != shape[0]:
        partial.unlink()
        raise ValueError(f"{written} images written to {path}, {shape[0]} announced")
    partial.replace(path)
    return path


class PngFolder:
    """The *.png files of a folder in name order, as N x H x W x 3 uint8 on indexing."""

    def __init__(self, folder: str | Path) -> None:
        self.files = sorted(Path(folder).glob("*.png"))
        if not self.files:
            raise FidError(f"sample folder {str(folder)!r} holds no .png files")
        with Image.open(self.files[0]) as first:
            self.shape = (len(self.files), first.height, first.width, 3)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, batch: slice) -> np.ndarray:
        return np.stack([np.asarray(Image.open(file).convert("RGB")) for file in self.files[batch]])


def open_samples(path: str | Path) -> np.ndarray | PngFolder:
    """A sample set: an .npz with arr_0 (ADM's format) or a folder of PNGs."""
    path = Path(path)
    if path.is_dir():
        return PngFolder(path)
    if path.suffix == ".npz" and path.is_file():
        return npz_images(path)
    raise FidError(f"sample set {str(path)!r} is neither an .npz file nor a folder of PNGs")


def to_device_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 -> (N, 3, H, W) uint8 on ``device``."""
    # A copy: memory-mapped sample sets are read-only, which torch tensors cannot be.
    return torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2)


@torch.no_grad()
def add_features(stats: FeatureStats, net: nn.Module, images: torch.Tensor, indices: range) -> None:
    """Features of a uint8 (N, 3, H, W) batch into ``stats``."""
    pool, logits = net(images)
    stats.add(pool, logits, torch.as_tensor(list(indices), device=pool.device))


def sample_set_stats(samples: np.ndarray | PngFolder, num_samples: int, net: nn.Module, spec: FeatureSpec,
                     batch_size: int, device: torch.device) -> FeatureStats:
    """Statistics (and IS sums) of the first ``num_samples`` images, split over all ranks."""
    rank, world_size = world()
    stats = FeatureStats(spec.feature_dim, spec.num_logits, math.ceil(num_samples / IS_SPLIT_SIZE), device)
    for batch in rank_batches(num_samples, batch_size, rank, world_size):
        add_features(stats, net, to_device_batch(samples[batch.start:batch.stop], device), batch)
    return stats.all_reduce()


def check_sample_count(path: str | Path, available: int, requested: int | None) -> int:
    if requested is not None and requested > available:
        raise FidError(f"sample set {path} holds {available} images, but {requested} were requested "
                       "(--num-samples); sample more or ask for fewer")
    return available if requested is None else requested


# --------------------------------------------------------------------------- reference from shards

class _ShardImages(IterableDataset):
    """uint8 batches of the images of some shards, each read once (workers split the shards)."""

    def __init__(self, shards: list[str], image_size: int, batch_size: int, retries: int = 3,
                 retry_backoff: float = 1.0) -> None:
        super().__init__()
        self.shards, self.image_size, self.batch_size = shards, image_size, batch_size
        self.retries, self.retry_backoff = retries, retry_backoff  # of remote shards (data.sources)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        shards = self.shards[info.id::info.num_workers] if info is not None else self.shards
        images, corrupt, unreadable = [], 0, []
        for record in iter_records(shards, unreadable, self.retries, self.retry_backoff):
            try:
                # Labels are not used here; any class index is accepted.
                decoded, _ = decode_sample(record, self.image_size, sys.maxsize)
            except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt sample
                logger.warning("reference statistics: skipping %s:%s (%s)", record["__url__"],
                               record["__key__"], err)
                corrupt += 1
                continue
            if decoded.ndim != 3:  # latent moments, not an image
                raise FidError(f"{record['__url__']} holds latents; reference statistics need image shards")
            images.append(decoded)
            if len(images) == self.batch_size:
                yield self._batch(images, corrupt)
                images, corrupt = [], 0
        if unreadable:  # statistics of part of the set would be cached and compared as the whole
            raise FidError(f"reference shards cannot be read to the end: {'; '.join(unreadable)}; no "
                           "statistics written (fix the shards or the connection and run again)")
        if images or corrupt:
            yield self._batch(images, corrupt)

    def _batch(self, images: list[np.ndarray], corrupt: int) -> dict[str, Any]:
        empty = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return {"images": torch.from_numpy(np.stack(images) if images else empty), "corrupt": corrupt}


def shard_recipe(shards: list[str], image_size: int, spec: FeatureSpec) -> dict[str, Any]:
    """Everything that determines statistics computed from shards; its hash names the cache file."""
    return {"version": STATS_VERSION, "kind": "shards", "image_size": image_size,
            "feature_net": spec.name, "feature_sha256": spec.sha256,
            "preprocessing": f"uint8 RGB as stored, TF1 bilinear resize to {spec.input_size}",
            "shards": [[p if is_remote(p) else Path(p).name, size]
                       for p, size in zip(shards, source_sizes(shards), strict=True)]}


def shard_stats(source: str | list[str], image_size: int, net: nn.Module, spec: FeatureSpec,
                cache_dir: str | Path, batch_size: int = 64, num_workers: int = 2,
                device: torch.device | str = "cpu", retries: int = 3,
                retry_backoff: float = 1.0) -> Statistics:
    """Reference statistics of every image in the shards at ``source``, computed by all ranks
    (each reads its own shards) the first time and read from ``cache_dir`` afterwards."""
    shards = resolve_shards(source)
    check_manifest(source, image_size)  # else every image would be skipped as the wrong size
    recipe = shard_recipe(shards, image_size, spec)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cached = Path(cache_dir).expanduser() / f"ref-{image_size}px-{digest}.npz"
    if cached.is_file():
        logger.info("reference statistics of %s from the cache %s", source, cached)
        return read_stats(cached)
    rank, world_size = world()
    stats = FeatureStats(spec.feature_dim, device=device)
    corrupt = torch.zeros((), dtype=torch.float64, device=device)
    mine = shards[rank::world_size]
    loader = DataLoader(_ShardImages(mine, image_size, batch_size, retries, retry_backoff), batch_size=None,
                        num_workers=min(num_workers, len(mine)))
    with torch.no_grad():
        for batch in loader:
            corrupt += batch["corrupt"]
            if len(batch["images"]):
                stats.add(net(batch["images"].to(device).permute(0, 3, 1, 2))[0])
    if world_size > 1:
        dist.all_reduce(corrupt)
    stats.all_reduce()
    mu, sigma = stats.mean_cov()
    meta = {**recipe, "hash": digest, "images": int(stats.count), "corrupt_skipped": int(corrupt),
            "source": str(source)}
    result = Statistics(mu, sigma, meta, cached)
    if rank == 0:
        write_stats(cached, result)
        logger.info("reference statistics of %d images cached in %s", int(stats.count), cached)
    return result


def load_reference(reference: str, image_size: int, net: nn.Module, spec: FeatureSpec,
                   cache_dir: str | Path, batch_size: int, num_workers: int,
                   device: torch.device | str) -> Statistics:
    """Reference statistics from an .npz file, or from shards (cached), checked against the samples."""
    if reference.endswith(".npz"):
        ref = read_stats(reference)
    else:
        ref = shard_stats(reference, image_size, net, spec, cache_dir, batch_size, num_workers, device)
    check_reference(ref, image_size, spec)
    return ref


@dataclass
class FidResult:
    fid: float
    inception_score: float
    inception_score_std: float
    num_samples: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def score(stats: FeatureStats, ref: Statistics) -> FidResult:
    mu, sigma = stats.mean_cov()
    inception, spread = stats.inception_score()
    return FidResult(frechet_distance(mu, sigma, ref.mu, ref.sigma), inception, spread, int(stats.count))


def stats_of(stats: FeatureStats, image_size: int, spec: FeatureSpec, source: str) -> Statistics:
    """A sample set's statistics as a file-ready record (usable as a reference later)."""
    mu, sigma = stats.mean_cov()
    meta = {"version": STATS_VERSION, "kind": "samples", "image_size": image_size, "feature_net": spec.name,
            "feature_sha256": spec.sha256, "images": int(stats.count), "source": source}
    return Statistics(mu, sigma, meta)


def sample_set_fid(samples_path: str | Path, reference: str, weights: str | Path | None,
                   spec_path: str | Path | None = None, num_samples: int | None = None, batch_size: int = 100,
                   cache_dir: str | Path = "~/.cache/advdit/fid", num_workers: int = 2,
                   device: torch.device | str = "cpu",
                   save_stats: str | Path | None = None) -> tuple[FidResult, Statistics]:
    """FID and IS of a sample set (.npz or PNG folder) against a reference, over all ranks; the
    set's statistics are returned (and written to ``save_stats`` by rank 0)."""
    device = torch.device(device)
    samples = open_samples(samples_path)
    count = check_sample_count(samples_path, len(samples), num_samples)
    image_size = samples.shape[1]
    if samples.shape[1] != samples.shape[2]:
        raise FidError(f"sample set {samples_path} holds {samples.shape[2]}x{samples.shape[1]} images; "
                       "expected square ones")
    spec = load_spec(spec_path)
    net = load_feature_net(weights, spec).to(device)
    ref = load_reference(reference, image_size, net, spec, cache_dir, batch_size, num_workers, device)
    stats = sample_set_stats(samples, count, net, spec, batch_size, device)
    own = stats_of(stats, image_size, spec, str(samples_path))
    if save_stats is not None and world()[0] == 0:
        write_stats(save_stats, own)
    return score(stats, ref), own


def metric_name(num_samples: int, prefix: str = "fid") -> str:
    """fid5k for 5,000 samples, fid50k for 50,000, fid300 for 300."""
    if num_samples % 1000 == 0:
        return f"{prefix}{num_samples // 1000}k"
    return f"{prefix}{num_samples}"

