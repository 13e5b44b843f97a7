"""``advdit data bench``: how many samples per second the streaming loader delivers on one core,
and (``--writer``) how many images per second ``advdit data imagenet`` converts.

The loader bench measures the trainer's own loader (``build_loader`` with no worker processes,
so one process and one core do all the reading, decoding and batching) over real shards, or over
synthetic shards it writes first: ``--synthetic latents`` (SD-VAE moments of 256-px images,
2 x 2 x 4 x 32 x 32 fp16) or ``--synthetic jpeg`` (256 x 256 JPEGs of smooth colour fields with
noise, quality 95).
The writer bench makes an ILSVRC2012-style ``train/<synset>/*.JPEG`` folder of 500 x 375 JPEGs
(ImageNet's most common size) and times the real ``write_imagenet_shards`` on it: decode, ADM
centre crop, JPEG encode in worker processes, tar writing and checksums in the main process.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..trainer.data import DataError, StreamSpec, build_loader, resolve_shards
from .imagenet import write_imagenet_shards
from .shards import ShardWriter

# ILSVRC2012's most common training-image size (width x height).
IMAGENET_TYPICAL_SIZE = (500, 375)


def synthetic_latent_shards(out_dir: Path, count: int, per_shard: int = 1000) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, prefix="latents", samples_per_shard=per_shard,
                         preprocessing={"image_size": 256, "synthetic": "latents"})
    for index in range(count):
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal((2, 2, 4, 32, 32)).astype(np.float16))
        writer.write(f"{index:08d}", index % 1000, {"moments.npy": buffer.getvalue()})
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
                      image_size=image_size, num_classes=1 << 30, random_flip=True, latent_size=latent_size)
    iterator = iter(build_loader(spec, rank=0, world_size=1, num_workers=0))
    next(iterator)
    start = time.perf_counter()
    samples = sum(len(next(iterator)["labels"]) for _ in range(batches))
    return samples / (time.perf_counter() - start)


def run_writer_bench(args: argparse.Namespace) -> dict[str, Any]:
    rates = [measure_writer(args.count, args.workers, args.image_size, args.samples_per_shard)
             for _ in range(args.repeats)]
    median = statistics.median(rates)
    return {"source": f"synthetic ILSVRC folder, {IMAGENET_TYPICAL_SIZE[0]}x{IMAGENET_TYPICAL_SIZE[1]} JPEGs",
            "image_size": args.image_size, "images": args.count, "workers": args.workers,
            "images_per_sec": [round(rate, 1) for rate in rates],
            "median_images_per_sec": round(median, 1),
            "median_images_per_sec_per_worker": round(median / args.workers, 1)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        source = args.shards
        if args.synthetic:
            source = str(Path(scratch) / args.synthetic)
            make = synthetic_latent_shards if args.synthetic == "latents" else synthetic_jpeg_shards
            make(Path(source), args.count)
        latent_size = 32 if args.synthetic == "latents" else args.latent_size
        rates = [measure(resolve_shards(source), args.batch_size, args.batches, args.image_size, latent_size,
                         seed=repeat) for repeat in range(args.repeats)]
    return {"source": args.synthetic or args.shards, "batch_size": args.batch_size, "batches": args.batches,
            "samples_per_sec": [round(rate, 1) for rate in rates],
            "median_samples_per_sec_per_core": round(statistics.median(rates), 1)}


def add_bench_parser(data_commands: argparse._SubParsersAction) -> None:
    bench = data_commands.add_parser(
        "bench", help="loader samples/s on one core (real or synthetic shards), or shard-writer images/s")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--shards", help="shards to read: a folder, brace pattern or glob")
    what.add_argument("--synthetic", choices=("latents", "jpeg"), help="write synthetic shards first")
    what.add_argument("--writer", action="store_true",
                      help="time advdit data imagenet on a synthetic ILSVRC folder of --count images")
    bench.add_argument("--count", type=int, default=8000, help="synthetic samples to write")
    bench.add_argument("--workers", type=int, default=1, help="--writer: decoding processes")
    bench.add_argument("--samples-per-shard", type=int, default=1000, help="--writer: shard size")
    bench.add_argument("--image-size", type=int, default=256)
    bench.add_argument("--latent-size", type=int, default=None, help="for real latent shards: h = w")
    bench.add_argument("--batch-size", type=int, default=256)
    bench.add_argument("--batches", type=int, default=20)
    bench.add_argument("--repeats", type=int, default=3)
    bench.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if min(args.count, args.repeats, args.workers, args.samples_per_shard) < 1:
        raise DataError("advdit data bench: --count, --repeats, --workers and --samples-per-shard "
                        "must be >= 1")
    report = run_writer_bench(args) if args.writer else run_bench(args)
    print(json.dumps(report))
    return 0
