"""How many samples per second the streaming loader delivers on one core, and how many images per
second the ImageNet shard writer converts (``advdit data bench``, ``--writer``).

The loader bench measures the trainer's own loader (``build_loader`` with no worker processes,
so one process and one core do all the reading, decoding and batching) over real shards, or over
synthetic shards it writes first: ``latents`` (SD-VAE moments of 256-px images,
2 x 2 x 4 x 32 x 32 fp16) or ``jpeg`` (256 x 256 JPEGs of smooth colour fields with noise,
quality 95).
The writer bench makes an ILSVRC2012-style ``train/<synset>/*.JPEG`` folder of 500 x 375 JPEGs
(ImageNet's most common size) and times the real ``write_imagenet_shards`` on it: decode, ADM
centre crop, JPEG encode in worker processes, tar writing and checksums in the main process.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .decode import MOMENTS_KEY
from .imagenet import write_imagenet_shards
from .manifest import resolve_shards
from .stream import StreamSpec, build_loader
from .writer import ShardWriter

# ILSVRC2012's most common training-image size (width x height).
IMAGENET_TYPICAL_SIZE = (500, 375)


def synthetic_latent_shards(out_dir: Path, count: int, per_shard: int = 1000) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, prefix="latents", samples_per_shard=per_shard,
                         preprocessing={"image_size": 256, "synthetic": "latents"})
    for index in range(count):
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal((2, 2, 4, 32, 32)).astype(np.float16))
        writer.write(f"{index:08d}", index % 1000, {MOMENTS_KEY: buffer.getvalue()})
    writer.close()


def _photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A smooth colour field with pixel noise: JPEG-encodes to a size close to a photograph's."""
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    across = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * colours[0]
    down = np.linspace(0, 1, height, dtype=np.float32)[:, None, None] * colours[1]
    pixels = np.clip((across + down) / 2 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_jpeg_shards(out_dir: Path, count: int, per_shard: int = 1000) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, prefix="train", samples_per_shard=per_shard,
                         preprocessing={"image_size": 256, "synthetic": "jpeg"})
    for index in range(count):
        writer.write(f"{index:08d}", index % 1000, {"jpg": _photo_like_jpeg(rng, 256, 256, quality=95)})
    writer.close()


def synthetic_imagenet_folder(root: Path, count: int, num_synsets: int = 10) -> None:
    """``root/train/nXXXXXXXX/*.JPEG``: ``count`` ImageNet-sized JPEGs (quality 90) over the synsets."""
    rng = np.random.default_rng(0)
    width, height = IMAGENET_TYPICAL_SIZE
    for index in range(count):
        folder = root / "train" / f"n{index % num_synsets:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{index:08d}.JPEG").write_bytes(_photo_like_jpeg(rng, width, height, quality=90))


def measure_writer(count: int, workers: int, size: int, samples_per_shard: int) -> float:
    """Images per second of ``write_imagenet_shards`` over a fresh synthetic folder of ``count`` images."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "ilsvrc"
        synthetic_imagenet_folder(source, count)
        start = time.perf_counter()
        manifest = write_imagenet_shards(source, Path(scratch) / "shards", size=size,
                                         samples_per_shard=samples_per_shard, workers=workers, progress=False)
        seconds = time.perf_counter() - start
    if manifest["num_samples"] != count:
        raise RuntimeError(f"the writer stored {manifest['num_samples']} of {count} synthetic images")
    return count / seconds


def measure(shards: list[str], batch_size: int, batches: int, image_size: int, latent_size: int | None,
            seed: int) -> float:
    """Samples per second over ``batches`` batches after one warm-up batch, no worker processes."""
    spec = StreamSpec(shards=shards, seed=seed, batch_size=batch_size, shuffle_buffer=1000,
                      image_size=image_size, num_classes=1 << 30, latent_size=latent_size)
    iterator = iter(build_loader(spec, rank=0, world_size=1, num_workers=0))
    next(iterator)
    start = time.perf_counter()
    samples = sum(len(next(iterator)["labels"]) for _ in range(batches))
    return samples / (time.perf_counter() - start)


def run_writer_bench(count: int, workers: int, image_size: int, samples_per_shard: int,
                     repeats: int) -> dict[str, Any]:
    """The writer's images/s over ``repeats`` fresh synthetic folders, with their median."""
    rates = [measure_writer(count, workers, image_size, samples_per_shard) for _ in range(repeats)]
    median = statistics.median(rates)
    return {"source": f"synthetic ILSVRC folder, {IMAGENET_TYPICAL_SIZE[0]}x{IMAGENET_TYPICAL_SIZE[1]} JPEGs",
            "image_size": image_size, "images": count, "workers": workers,
            "images_per_sec": [round(rate, 1) for rate in rates],
            "median_images_per_sec": round(median, 1),
            "median_images_per_sec_per_worker": round(median / workers, 1)}


def run_loader_bench(shards: str | None, synthetic: str | None, count: int, image_size: int,
                     latent_size: int | None, batch_size: int, batches: int, repeats: int) -> dict[str, Any]:
    """The loader's samples/s over ``shards``, or over ``count`` synthetic samples of the kind
    ``synthetic`` names ("latents" or "jpeg"), in ``repeats`` runs of ``batches`` batches."""
    with tempfile.TemporaryDirectory() as scratch:
        source = shards
        if synthetic:
            source = str(Path(scratch) / synthetic)
            make = synthetic_latent_shards if synthetic == "latents" else synthetic_jpeg_shards
            make(Path(source), count)
        latent_size = 32 if synthetic == "latents" else latent_size
        rates = [measure(resolve_shards(source), batch_size, batches, image_size, latent_size, seed=repeat)
                 for repeat in range(repeats)]
    return {"source": synthetic or shards, "batch_size": batch_size, "batches": batches,
            "samples_per_sec": [round(rate, 1) for rate in rates],
            "median_samples_per_sec_per_core": round(statistics.median(rates), 1)}
