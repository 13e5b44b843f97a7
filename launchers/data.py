"""``advdit data demo|digits|imagenet|latents|bench``: argument parsing; the work is in
``advdit.trainer.data``.

    advdit data demo --out data/demo/train
    advdit data digits --out data/digits          # data/digits/train and data/digits/heldout
    advdit data imagenet --source /datasets/ILSVRC2012 --out data/imagenet256/train --size 256
    advdit data latents --source data/imagenet256/train --out data/imagenet256/latents \\
        --vae /models/sd-vae-ft-ema --image-size 256
    advdit data bench --synthetic latents
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..trainer.data import DataError
from ..trainer.data.manifest import MANIFEST


def add_data_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``data`` and its subcommands on an ``add_subparsers()`` object; returns its parser."""
    data = commands.add_parser("data", help="write data sets as webdataset shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    _add_demo_parser(data_commands)
    _add_digits_parser(data_commands)
    add_imagenet_parser(data_commands)
    _add_bench_parser(data_commands)
    _add_latents_parser(data_commands)
    return data


def _add_demo_parser(data_commands: Any) -> None:
    demo = data_commands.add_parser("demo", help="the procedurally drawn 10-class shapes set")
    demo.add_argument("--out", default="data/demo/train")
    demo.add_argument("--num-images", type=int, default=5120)
    demo.add_argument("--image-size", type=int, default=16)
    demo.add_argument("--samples-per-shard", type=int, default=640)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..trainer.data.demo import write_demo_shards

    manifest = write_demo_shards(args.out, num_images=args.num_images, image_size=args.image_size,
                                 samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(f"wrote {manifest['num_samples']} images in {len(manifest['shards'])} shards to {args.out}")
    return 0


def _add_digits_parser(data_commands: Any) -> None:
    digits = data_commands.add_parser(
        "digits", help="scikit-learn's bundled UCI handwritten digits (real images, offline) as "
                       "train/ and heldout/ shards")
    digits.add_argument("--out", default="data/digits", help="writes OUT/train and OUT/heldout")
    digits.add_argument("--image-size", type=int, default=16,
                        help="a multiple of 8: the 8x8 digits upscaled by pixel repetition (default 16)")
    digits.add_argument("--heldout-fraction", type=float, default=0.2, help="of each class (stratified)")
    digits.add_argument("--seed", type=int, default=0, help="of the split")
    digits.set_defaults(func=_digits)


def _digits(args: argparse.Namespace) -> int:
    from ..trainer.data.digits import write_digit_shards

    manifests = write_digit_shards(args.out, args.image_size, args.heldout_fraction, args.seed)
    counts = ", ".join(f"{split} {m['num_samples']}" for split, m in manifests.items())
    print(f"wrote the digits ({counts} images, {args.image_size}x{args.image_size}) to {args.out}")
    return 0


def add_imagenet_parser(data_commands: Any) -> argparse.ArgumentParser:
    """Register ``imagenet`` under ``advdit data``; its handler is set as ``func``."""
    parser = data_commands.add_parser(
        "imagenet", help="ImageNet (ILSVRC2012 folders or webdataset shards) as centre-cropped JPEG shards")
    parser.add_argument("--source", required=True,
                        help="the ILSVRC2012 root holding train/ and val/, or a folder, glob or brace "
                             "pattern of webdataset .tar shards (jpg/png + cls members)")
    parser.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (DiT: 256 or 512)")
    parser.add_argument("--split", default="train", help="train or val (a folder, or a word in tar names)")
    parser.add_argument("--val-labels",
                        help="labels of a flat val/ folder: '<file> <synset>' lines or LOC_val_solution.csv")
    parser.add_argument("--synsets", help="class order, one synset per line (default: sorted train/ folders)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: every CPU this process may use)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.set_defaults(func=_imagenet)
    return parser


def _imagenet(args: argparse.Namespace) -> int:
    from ..trainer.data.imagenet import write_imagenet_shards

    manifest = write_imagenet_shards(args.source, args.out, size=args.size,
                                     samples_per_shard=args.samples_per_shard, workers=args.workers,
                                     split=args.split, quality=args.quality, val_labels=args.val_labels,
                                     synsets=args.synsets)
    print(f"wrote {manifest['num_samples']} {args.size}x{args.size} images in {len(manifest['shards'])} "
          f"shards to {args.out}; {manifest['num_skipped']} unreadable file(s) skipped "
          f"(listed in {MANIFEST})")
    return 0


def _add_latents_parser(data_commands: Any) -> None:
    latents = data_commands.add_parser(
        "latents", help="SD-VAE latent shards (posterior moments of each image and its mirror)")
    latents.add_argument("--source", required=True, help="image shards: a folder, brace pattern or glob")
    latents.add_argument("--out", required=True)
    latents.add_argument("--vae", required=True, help="a local diffusers AutoencoderKL folder")
    latents.add_argument("--image-size", type=int, required=True, help="the source shards' image size")
    latents.add_argument("--batch-size", type=int, default=64)
    latents.set_defaults(func=_latents)


def _latents(args: argparse.Namespace) -> int:
    from ..trainer.data.latents import write_latent_shards

    manifest = write_latent_shards(args.source, args.out, args.vae, args.image_size, args.batch_size)
    if manifest is not None:
        print(f"wrote {manifest['num_samples']} latents in {len(manifest['shards'])} shards to {args.out} "
              f"({len(manifest['skipped'])} samples skipped)")
    return 0


def _add_bench_parser(data_commands: Any) -> None:
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
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..trainer.data.bench import run_loader_bench, run_writer_bench

    if min(args.count, args.repeats, args.workers, args.samples_per_shard) < 1:
        raise DataError("advdit data bench: --count, --repeats, --workers and --samples-per-shard "
                        "must be >= 1")
    if args.writer:
        report = run_writer_bench(args.count, args.workers, args.image_size, args.samples_per_shard,
                                  args.repeats)
    else:
        report = run_loader_bench(args.shards, args.synthetic, args.count, args.image_size, args.latent_size,
                                  args.batch_size, args.batches, args.repeats)
    print(json.dumps(report))
    return 0
