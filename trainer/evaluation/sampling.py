"""Sampling from a trained denoiser: sample grids, distributed sample sets, and FID of the EMA
weights during training.

Sample sets (``advdit sample``, FID during training) are cut into batches of fixed sample numbers
(batch k holds samples [k B, (k + 1) B) and goes to rank k mod world size) and every sample has
its own generator seeded by (seed, sample number), so the set is the same for any number of
ranks, bit for bit, and for any batch size up to floating-point noise.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from ...models.diffusion import Generators
from ...models.vae import PixelCodec, SDVAECodec, load_codec
from ..checkpointing.export import ema_state, raw_state
from ..checkpointing.pretrained import load_pretrained, network_settings, read_pretrained
from ..checkpointing.store import META, CheckpointError, read_meta
from ..config import Config, ConfigError, load_config, unflatten
from ..objectives import build_denoiser, objective_class
from ..objectives.base import LatentSampler
from ..runtime.distributed import gather_objects, initialized, world
from ..runtime.engines import make_accelerator
from ..runtime.seeding import seeded_rng
from .digits import class_consistency, classifier_outputs, precision_recall, read_images
from .fid import (
    IS_SPLIT_SIZE,
    FeatureStats,
    FidError,
    FidResult,
    load_feature_net,
    load_reference,
    load_spec,
    metric_name,
    rank_batches,
    score,
    write_npz_images,
)

logger = logging.getLogger(__name__)

Autocast = Callable[[], AbstractContextManager[Any]]


class EvaluationInterrupted(RuntimeError):
    """A preemption signal arrived while a sample set was drawn; the set was abandoned."""


def grid_labels(cfg: Config) -> list[int]:
    """Up to 10 classes per grid row: the configured ones, or spread evenly over all classes."""
    if cfg.sample.grid_classes:
        return list(cfg.sample.grid_classes)
    count = min(cfg.model.num_classes, 10)
    return [int(c) for c in np.linspace(0, cfg.model.num_classes - 1, count).round()]


@torch.no_grad()
def sample_images(model: nn.Module, sample_latents: LatentSampler, codec: PixelCodec | SDVAECodec,
                  labels: torch.Tensor, rng: Generators, autocast: Autocast = nullcontext) -> torch.Tensor:
    """Images in [-1, 1] for ``labels``, drawn by ``sample_latents`` (the objective's sampler:
    diffusion or DDGAN); ``autocast`` covers the denoiser only (the VAE decodes in float32)."""
    was_training = model.training
    model.eval()
    # Pixels live in [-1, 1], so clipping the x0 estimate at each step is safe there (ADM does it);
    # latents have no fixed range and are left alone.
    with autocast():
        latents = sample_latents(model, labels, rng, isinstance(codec, PixelCodec))
    model.train(was_training)
    return codec.decode(latents.float()).clamp(-1, 1)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8 on the same device: what is saved and what FID sees."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, columns: int, path: str | Path, scale: int = 1) -> Path:
    """Tile images row by row into one PNG (nearest-neighbour upscaled by ``scale``)."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    rows = -(-count // columns)
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        row, col = divmod(index, columns)
        canvas[row * height:(row + 1) * height, col * width:(col + 1) * width] = image
    picture = Image.fromarray(canvas)
    if scale > 1:
        picture = picture.resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                 Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def sample_grid(model: nn.Module, sample_latents: LatentSampler, cfg: Config,
                codec: PixelCodec | SDVAECodec, device: torch.device, path: str | Path,
                should_stop: Callable[[], bool] | None = None) -> Path:
    """A grid with one column per class and ``sample.grid_rows`` rows; the same seeds every time,
    so grids of successive steps show the same noise developing. Drawn row by row: when
    ``should_stop`` answers True between rows, the grid is abandoned (EvaluationInterrupted)."""
    classes = grid_labels(cfg)
    labels = torch.tensor(classes, device=device)
    rows = []
    for row in range(cfg.sample.grid_rows):
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted(f"stopped by a signal after {row} of {cfg.sample.grid_rows} rows")
        rng = torch.Generator(device=device).manual_seed(cfg.run.seed + row)
        rows.append(sample_images(model, sample_latents, codec, labels, rng))
    scale = max(1, 128 // cfg.data.image_size)
    return save_grid(torch.cat(rows), len(classes), path, scale=scale)


@dataclass
class GridWriter:
    """A training run's sample grids (``samples/step_N.png``), which also decides when one is due:
    every ``train.sample_every`` steps and at the last step."""

    cfg: Config
    sample_latents: LatentSampler
    codec: PixelCodec | SDVAECodec
    device: torch.device
    folder: Path

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.train.sample_every == 0 or last

    def write(self, model: nn.Module, step: int, should_stop: Callable[[], bool] | None = None) -> Path:
        path = self.folder / f"step_{step:08d}.png"
        return sample_grid(model, self.sample_latents, self.cfg, self.codec, self.device, path, should_stop)


# --------------------------------------------------------------------------- sample sets

def balanced_labels(count: int, num_classes: int) -> np.ndarray:
    """Sample i has class i mod num_classes: every class equally often (50 each in 50,000), and so
    is every prefix of a multiple of num_classes samples."""
    return np.arange(count, dtype=np.int64) % num_classes


def read_labels(path: str | Path, count: int, num_classes: int) -> np.ndarray:
    """The first ``count`` labels of a .npy file or a text file of one class index per line."""
    path = Path(path)
    if not path.is_file():
        raise FidError(f"labels file {str(path)!r} does not exist")
    labels = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) < count:
        raise FidError(f"labels file {path} holds {len(labels)} labels, {count} samples were requested")
    labels = labels[:count].astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise FidError(f"labels file {path} has classes outside [0, {num_classes}), e.g. {int(bad[0])}")
    return labels


def image_rngs(seed: int, indices: range, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, sample number) alone."""
    return [seeded_rng(seed, index, device=device) for index in indices]


@dataclass
class Sampler:
    """A denoiser ready to sample: the network, its objective's sampler, the codec."""

    model: nn.Module
    sample_latents: LatentSampler
    codec: PixelCodec | SDVAECodec
    device: torch.device
    autocast: Autocast = nullcontext
    # Asked before each round of batches, on every rank at once (it may be a collective): True
    # abandons the set with EvaluationInterrupted.
    should_stop: Callable[[], bool] | None = None

    def batches(self, labels: np.ndarray, seed: int, batch_size: int,
                progress: bool = False) -> Iterator[tuple[range, torch.Tensor]]:
        """(sample numbers, uint8 (N, 3, H, W) images on the device) of this rank's batches."""
        rank, world_size = world()
        batches = rank_batches(len(labels), batch_size, rank, world_size)
        # Ranks hold one batch more or less; every rank asks should_stop the busiest rank's times.
        rounds = math.ceil(math.ceil(len(labels) / batch_size) / world_size)
        for index in tqdm(range(rounds), desc="sample", unit="batch", disable=not (progress and rank == 0)):
            if self.should_stop is not None and self.should_stop():
                raise EvaluationInterrupted(f"sampling stopped by a signal after {index} of {rounds} rounds")
            if index >= len(batches):
                continue
            batch = batches[index]
            y = torch.as_tensor(labels[batch.start:batch.stop], device=self.device)
            images = sample_images(self.model, self.sample_latents, self.codec, y,
                                   image_rngs(seed, batch, self.device), self.autocast)
            yield batch, quantize(images)


def is_advdit_source(source: Path) -> bool:
    """A checkpoint folder (meta.json) or a file of ``advdit export``; anything else is read as
    published DiT weights (trainer/checkpointing/pretrained.py)."""
    if source.is_dir():
        return (source / META).is_file()
    if source.suffix != ".safetensors" or not source.is_file():
        return False
    with safe_open(str(source), "pt") as handle:
        return "advdit_config" in (handle.metadata() or {})


def recorded_config(source: str | Path, weights: str = "ema", vae: str | None = None) -> dict[str, Any]:
    """The flattened config a checkpoint folder (meta.json) or an exported file recorded; for
    published weights, the keys that build their network (with ``vae`` as their codec)."""
    source = Path(source)
    if not is_advdit_source(source):
        return network_settings(read_pretrained(source, init_entry(weights)), vae)
    if source.is_dir():
        return read_meta(source)["config"]
    with safe_open(str(source), "pt") as handle:
        return json.loads(handle.metadata()["advdit_config"])


def init_entry(weights: str) -> str:
    """``--weights ema|raw`` as the entry of an official training checkpoint."""
    return "ema" if weights == "ema" else "model"


def load_denoiser_weights(model: nn.Module, source: Path, weights: str) -> None:
    """EMA (default) or raw weights of a checkpoint folder or export, or published weights,
    into ``model``; an exported file holds one of EMA and raw."""
    if not is_advdit_source(source):
        load_pretrained(model, read_pretrained(source, init_entry(weights)))
        return
    if source.is_dir():
        model.load_state_dict(ema_state(source) if weights == "ema" else raw_state(source))
        return
    with safe_open(str(source), "pt") as handle:
        stored = (handle.metadata() or {}).get("weights", "ema")
    if stored != weights:
        raise CheckpointError(f"{source} holds the {stored} weights, {weights} were asked for")
    model.load_state_dict(load_file(str(source)))


def sampling_config(source: str | Path, sampler: str | None = None, steps: int | None = None,
                    cfg_scale: float | None = None, vae: str | None = None,
                    precision: str = "fp32", cfg_channels: int | str | None = None,
                    weights: str = "ema") -> Config:
    """The recorded config with the sampling settings replaced; DDGAN samples with NFE = its T."""
    recorded = recorded_config(source, weights, vae)
    asked = {"sample.sampler": sampler, "sample.steps": steps, "sample.cfg_scale": cfg_scale,
             "sample.cfg_channels": cfg_channels}
    asked = {key: value for key, value in asked.items() if value is not None}
    if asked and recorded.get("objective") == "ddgan":
        raise ConfigError(f"{source} is a DDGAN denoiser: it samples with NFE = ddgan.num_steps "
                          f"({recorded.get('ddgan.num_steps')}) and no guidance, so "
                          f"{', '.join(asked)} do not apply")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")
    settings = {**asked, "distributed.strategy": "ddp",
                "train.mixed_precision": "bf16" if precision == "bf16" else "no"}
    if vae is not None:
        settings["vae"] = vae
    # JSON is YAML that keeps strings strings ("no" would read as false, a path as anything).
    overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return load_config(None, overrides, base=unflatten(recorded))


def load_sampler(source: str | Path, cfg: Config, weights: str = "ema") -> tuple[Sampler, Accelerator]:
    """The denoiser of a checkpoint or export with ``weights``, on this rank's device; builds the
    process group when run under torchrun."""
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    codec = load_codec(cfg.vae).to(device)
    latent_size = cfg.data.image_size // codec.downsample
    model = build_denoiser(cfg, codec.channels, latent_size)
    load_denoiser_weights(model, Path(source), weights)
    model.to(device).eval().requires_grad_(False)
    sample_latents = objective_class(cfg.objective).sampler(cfg, codec.channels, latent_size)
    return Sampler(model, sample_latents, codec, device, accelerator.autocast), accelerator


class SampleWriter:
    """Writes this rank's batches as PNGs (``{n:06d}.png``) and/or into a part file per rank, which
    rank 0 joins into one ADM .npz once every rank is done (the folder must be shared)."""

    def __init__(self, png_dir: str | Path | None, npz: str | Path | None, labels: np.ndarray,
                 batch_size: int) -> None:
        self.png_dir = Path(png_dir) if png_dir else None
        self.npz = Path(npz) if npz else None
        self.labels, self.batch_size = labels, batch_size
        self.rank, self.world_size = world()
        if self.png_dir:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        self.part = None
        if self.npz:
            self.parts_dir = self.npz.with_name(self.npz.name + ".parts")
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self.part = (self.parts_dir / f"rank{self.rank:05d}.u8").open("wb")

    def write(self, batch: range, images: torch.Tensor) -> None:
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()
        if self.png_dir:
            for index, image in zip(batch, pixels, strict=True):
                Image.fromarray(image).save(self.png_dir / f"{index:06d}.png")
        if self.part:
            self.part.write(pixels.tobytes())

    def close(self, image_size: int) -> Path | None:
        """Wait for every rank, then (rank 0) join the parts in sample order into the .npz."""
        if self.part:
            self.part.close()
        if initialized():
            dist.barrier()
        if not self.npz or self.rank != 0:
            return self.npz
        shape = (len(self.labels), image_size, image_size, 3)
        write_npz_images(self.npz, shape, self._chunks(shape), self.labels)
        for part in self.parts_dir.glob("rank*.u8"):
            part.unlink()
        self.parts_dir.rmdir()
        return self.npz

    def _chunks(self, shape: tuple[int, int, int, int]) -> Iterator[np.ndarray]:
        """Batch k from rank k mod W's part, where it is that rank's (k div W)-th full batch."""
        image_bytes = int(np.prod(shape[1:]))
        parts = [np.memmap(self.parts_dir / f"rank{rank:05d}.u8", dtype=np.uint8, mode="r")
                 for rank in range(self.world_size)]
        for number, start in enumerate(range(0, shape[0], self.batch_size)):
            count = min(self.batch_size, shape[0] - start)
            offset = (number // self.world_size) * self.batch_size * image_bytes
            part = parts[number % self.world_size]
            yield np.asarray(part[offset:offset + count * image_bytes]).reshape(count, *shape[1:])


def write_samples(sampler: Sampler, labels: np.ndarray, seed: int, batch_size: int, image_size: int,
                  png_dir: str | Path | None = None, npz: str | Path | None = None) -> dict[str, float]:
    """Draw ``len(labels)`` samples over all ranks into a PNG folder and/or an ADM .npz; returns
    the images/s of all ranks together (drawing and writing, not joining the .npz) and the ranks."""
    writer = SampleWriter(png_dir, npz, labels, batch_size)
    start = time.perf_counter()
    for batch, images in sampler.batches(labels, seed, batch_size, progress=True):
        writer.write(batch, images)
    # The slowest rank's time: the set is complete only when it is done.
    seconds = torch.tensor(time.perf_counter() - start, device=sampler.device)
    if world()[1] > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    writer.close(image_size)
    return {"images_per_sec": len(labels) / float(seconds), "processes": world()[1]}


# --------------------------------------------------------------------------- FID during training

Kept = list[tuple[torch.Tensor, ...]]  # per batch: features, logits, the labels drawn for


def sample_stats(sampler: Sampler, net: nn.Module, feature_dim: int, num_logits: int, labels: np.ndarray,
                 seed: int, batch_size: int, kept: Kept | None = None) -> FeatureStats:
    """Feature statistics of freshly drawn samples, every rank drawing its share (no images kept);
    ``kept`` receives this rank's (features, logits, labels) per batch when given."""
    stats = FeatureStats(feature_dim, num_logits, math.ceil(len(labels) / IS_SPLIT_SIZE), sampler.device)
    for batch, images in sampler.batches(labels, seed, batch_size):
        pool, logits = net(images)
        stats.add(pool, logits, torch.as_tensor(list(batch), device=pool.device))
        if kept is not None:
            kept.append((pool.double().cpu(), logits.cpu(), torch.as_tensor(labels[batch.start:batch.stop])))
    return stats.all_reduce()


def class_scores(kept: Kept, reference: torch.Tensor) -> dict[str, float]:
    """Class consistency and precision/recall of every rank's kept samples (an all-gather)."""
    parts = [part for rank_parts in gather_objects(kept) for part in rank_parts]
    features, logits, labels = (torch.cat([part[i] for part in parts]) for i in range(3))
    precision, recall = precision_recall(reference, features)
    return {"class_consistency": class_consistency(logits, labels), "precision": precision, "recall": recall}


class TrainingFID:
    """FID (and IS) of the EMA weights every ``eval.fid_every`` steps on ``eval.fid_samples``
    samples, and on ``eval.final_fid_samples`` at the last step. Every rank draws its share of the
    samples, so none waits for another; the sums are all-reduced and every rank computes the same
    distance. The samples use the same seeds at every measurement, so the curve follows the weights."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        ev = cfg.eval
        self.spec = load_spec(ev.feature_net)
        self.net = load_feature_net(ev.inception_weights, self.spec).to(accelerator.device)
        self.reference = load_reference(ev.reference, cfg.data.image_size, self.net, self.spec, ev.cache_dir,
                                        ev.batch_size, cfg.data.num_workers, accelerator.device)
        # eval.class_metrics: the reference images' features, held whole (a small reference set).
        self.class_reference = (classifier_outputs(self.net, read_images(ev.reference, cfg.data.image_size)[0]
                                                   .to(accelerator.device))[0].cpu()
                                if ev.class_metrics else None)

    @classmethod
    def from_config(cls, cfg: Config, accelerator: Accelerator) -> TrainingFID | None:
        """None when the config asks for no FID; loading the network and reference checks them early."""
        if not (cfg.eval.fid_every or cfg.eval.final_fid_samples):
            return None
        return cls(cfg, accelerator)

    def due(self, step: int, last: bool) -> list[int]:
        """Sample counts to measure after ``step``."""
        counts = []
        if self.cfg.eval.fid_every and step % self.cfg.eval.fid_every == 0:
            counts.append(self.cfg.eval.fid_samples)
        if last and self.cfg.eval.final_fid_samples:
            counts.append(self.cfg.eval.final_fid_samples)
        return counts

    def measure(self, sampler: Sampler, num_samples: int) -> tuple[FidResult, dict[str, float]]:
        """FID and IS, and with eval.class_metrics the class consistency and precision/recall."""
        labels = balanced_labels(num_samples, self.cfg.model.num_classes)
        kept: Kept | None = [] if self.class_reference is not None else None
        stats = sample_stats(sampler, self.net, self.spec.feature_dim, self.spec.num_logits, labels,
                             self.cfg.run.seed, self.cfg.eval.batch_size, kept)
        extra = class_scores(kept, self.class_reference) if kept is not None else {}
        return score(stats, self.reference), extra

    def after_step(self, step: int, last: bool, sampler: Sampler) -> dict[str, float]:
        """The metrics due at this step (empty if none), named by sample count: fid5k, is5k."""
        metrics: dict[str, float] = {}
        for count in self.due(step, last):
            start = time.perf_counter()
            result, extra = self.measure(sampler, count)
            metrics[metric_name(count)] = result.fid
            metrics[metric_name(count, "is")] = result.inception_score
            metrics |= {metric_name(count, name): value for name, value in extra.items()}
            logger.info("step %d: %s %.4f, IS %.3f (%.1f s)", step, metric_name(count), result.fid,
                        result.inception_score, time.perf_counter() - start)
        return metrics
