"""``advdit data bench``: how many samples per second the streaming loader delivers on one core.

Measures the trainer's own loader (``build_loader`` with no worker processes, so one process and
one core do all the reading, decoding and batching) over real shards, or over synthetic shards it
writes first: ``--synthetic latents`` (SD-VAE moments of 256-px images, 2 x 2 x 4 x 32 x 32 fp16)
or ``--synthetic jpeg`` (256 x 256 JPEGs of smooth colour fields with noise, quality 95).
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

from ..trainer.data import StreamSpec, build_loader, resolve_shards
from .shards import ShardWriter


def synthetic_latent_shards(out_dir: Path, count: int, per_shard: int = 1000) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, prefix="latents", samples_per_shard=per_shard,
                         preprocessing={"image_size": 256, "synthetic": "latents"})
    for index in range(count):
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal((2, 2, 4, 32, 32)).astype(np.float16))
        writer.write(f"{index:08d}", index % 1000, {"moments.npy": buffer.getvalue()})
    writer.close()


def synthetic_jpeg_shards(out_dir: Path, count: int, per_shard: int = 1000) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, prefix="train", samples_per_shard=per_shard,
                         preprocessing={"image_size": 256, "synthetic": "jpeg"})
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    for index in range(count):
        colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        field = ramp[:, None, None] * colours[0] + ramp[None, :, None] * colours[1]
        pixels = np.clip(field / 2 + rng.normal(0, 12, (256, 256, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        writer.write(f"{index:08d}", index % 1000, {"jpg": buffer.getvalue()})
    writer.close()


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
    bench = data_commands.add_parser("bench", help="loader samples/s on one core (real or synthetic shards)")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--shards", help="shards to read: a folder, brace pattern or glob")
    what.add_argument("--synthetic", choices=("latents", "jpeg"), help="write synthetic shards first")
    bench.add_argument("--count", type=int, default=8000, help="synthetic samples to write")
    bench.add_argument("--image-size", type=int, default=256)
    bench.add_argument("--latent-size", type=int, default=None, help="for real latent shards: h = w")
    bench.add_argument("--batch-size", type=int, default=256)
    bench.add_argument("--batches", type=int, default=20)
    bench.add_argument("--repeats", type=int, default=3)
    bench.set_defaults(func=lambda args: print(json.dumps(run_bench(args))) or 0)
