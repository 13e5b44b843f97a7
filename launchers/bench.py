"""``advdit bench``: time training steps of a config, alone or side by side with a baseline.

    advdit bench model.arch=DiT-S/2 data.image_size=256 data.batch_size=8 --vs diffusers
    advdit bench --config imagenet/base --config imagenet/256 --config methods/sadm data.batch_size=8 \\
        --vs objective=dit
    advdit bench --config imagenet/base --config imagenet/256 model.attention=xformers \\
        --vs model.attention=sdpa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..trainer.config import load_config, to_dict
from .options import add_config_option


def add_training_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="median training-step time, images/s, FLOPs, MFU and peak memory of a config",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(bench)
    bench.add_argument("--vs", action="append", default=[], metavar="diffusers|KEY=VALUE",
                       help="baseline run alternately in the same process: 'diffusers' (its "
                            "DiTTransformer2DModel of the same size, eager, with torch's default "
                            "AdamW), or the same config with KEY=VALUE changed (repeatable, e.g. "
                            "--vs objective=dit; after diffusers: changes to its config)")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    bench.add_argument("--data", choices=("latents", "images"), default="latents",
                       help="latents: SD-VAE latent moments as latent shards give (no encoder); "
                            "images: uint8 images through the configured vae (online encoding)")
    bench.add_argument("--random-vae", action="store_true",
                       help="with --data images: the SD-VAE's architecture with random weights "
                            "instead of loading vae (the encoder's cost does not depend on them)")
    bench.add_argument("--peak-tflops", type=float, help="peak for MFU (default: the device's "
                       "data-sheet peak if known, else a large matmul measured now)")
    bench.add_argument("--peak-matmul-size", type=int, help="n of the n x n x n matmul that "
                       "measures the peak (default 4096 on CPU, 8192 on GPU)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    bench.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    bench.add_argument("--profile", type=Path, metavar="FILE", help="then profile 2 more steps of "
                       "the subject with torch.profiler: the shares of matmuls, attention, compiled "
                       "kernels and the optimizer in the table, the profiler's op table to FILE")
    bench.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. model.arch=DiT-S/2 data.batch_size=8")
    bench.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..trainer.benchmarks.throughput import (
        DIFFUSERS_STOCK,
        BenchOptions,
        Side,
        format_table,
        run_benchmark,
    )

    overrides = ["tracking.enabled=false", *args.overrides]
    sides = [Side("advdit", load_config(args.config, overrides))]
    baseline, network = list(args.vs), "advdit"
    if baseline[:1] == ["diffusers"]:
        baseline, network = [*DIFFUSERS_STOCK, *baseline[1:]], "diffusers"
    if args.vs:
        # On top of the subject's resolved config, so e.g. a SADM recipe's sadm section may stay
        # (unread) when the baseline is objective=dit.
        subject = to_dict(sides[0].cfg)
        sides.append(Side(" ".join(args.vs), load_config(None, baseline, base=subject), network))
    options = BenchOptions(steps=args.steps, warmup=args.warmup, data=args.data, random_vae=args.random_vae,
                           peak_tflops=args.peak_tflops, threads=args.threads,
                           peak_matmul_size=args.peak_matmul_size, profile_steps=2 if args.profile else 0)
    report = run_benchmark(sides, options)
    if args.profile:
        args.profile.write_text(report["profile"].pop("table"))
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0
