"""``advdit toy``: the 25-Gaussians benchmark (numerics in ``advdit.trainer.benchmarks.toy``).

    advdit toy --method diffusion_gan
    advdit toy --method all --out runs/toy
    advdit toy --method gan --set lr_g=1e-4 lr_d=1e-4 beta1=0.5 beta2=0.9 --out runs/toy-adam
    advdit toy --method all --seeds 5 --out runs/toy-seeds   # seeds 0..4, then summary.{json,md,png}
"""

from __future__ import annotations

import argparse
from typing import Any

from ..trainer.config import ConfigError, parse_override

METHOD_CHOICES = ("gan", "diffusion_gan", "ddgan", "all")


def add_toy_parser(subcommands: Any) -> argparse.ArgumentParser:
    """Register ``toy`` on an ``add_subparsers()`` object; returns its parser."""
    toy = subcommands.add_parser("toy", help="the 25-Gaussians benchmark of Diffusion-GAN (its Figure 5)")
    toy.add_argument("--method", choices=METHOD_CHOICES, default="all")
    toy.add_argument("--iterations", type=int, default=None,
                     help="training iterations (default: the method's tuned value)")
    toy.add_argument("--batch-size", type=int, default=None, help="default: the method's tuned value")
    toy.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                     help="change a ToySettings value (trainer/benchmarks/toy.py), e.g. lr_g=1e-4 r1_gamma=0")
    toy.add_argument("--seed", type=int, default=0, help="the (first) seed")
    toy.add_argument("--seeds", type=int, default=None, metavar="N",
                     help="run seeds SEED .. SEED+N-1, each into OUT/seed_<k>/, then write OUT/summary.json, "
                          "summary.md and summary.png over every seed_*/result_*.json found in OUT")
    toy.add_argument("--summarize", action="store_true",
                     help="train nothing: only rewrite OUT/summary.* from the seed_*/ results already there "
                          "(e.g. after runs of several processes into the same OUT)")
    toy.add_argument("--out", default="runs/toy", help="folder for samples_*.npy, *.png, result_*.json")
    toy.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    toy.set_defaults(func=_run)
    return toy


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..trainer.benchmarks.toy import METHODS, run_toy, seed_dir, summary_table, write_summary

    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.summarize:
        print(summary_table(write_summary(args.out)))
        return 0
    # Networks this small gain nothing from intra-op threads, and several threads per process
    # slow every step down badly on a shared machine; one thread also makes runs comparable.
    torch.set_num_threads(1)
    overrides = _overrides(args)
    methods = METHODS if args.method == "all" else (args.method,)
    seeds = range(args.seed, args.seed + (args.seeds or 1))
    results = []
    for method in methods:
        for seed in seeds:
            out = seed_dir(args.out, seed) if args.seeds is not None else args.out
            result = run_toy(method, out, overrides, seed=seed, progress=args.progress)
            print(_line(result), flush=True)
            results.append(result)
    if args.seeds is not None:
        print(summary_table(write_summary(args.out)))
    elif len(results) > 1:
        print(markdown_table(results))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` pairs (values read as YAML, as config overrides are) plus the two flags."""
    overrides: dict[str, Any] = {}
    for pair in args.settings:
        if "=" not in pair or pair.startswith("="):
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = parse_override(pair)
        overrides[key] = value
    for key in ("iterations", "batch_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return overrides


def _line(result: dict[str, Any]) -> str:
    line = (f"{result['method']}: {result['modes_covered']}/25 modes, "
            f"{result['high_quality_percent']:.1f}% high quality, {result['iterations']} iterations, "
            f"{result['seconds']:.0f} s, seed {result['seed']}")
    if "final_T" in result:
        line += f", final T = {result['final_T']} (p = {result['final_p']:.3f})"
    return line


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per result: method | modes covered | HQ % | iterations | seconds."""
    rows = ["| method | modes covered | HQ % | iterations | seconds |", "|---|---|---|---|---|"]
    rows += [f"| {r['method']} | {r['modes_covered']}/25 | {r['high_quality_percent']:.1f} | "
             f"{r['iterations']} | {r['seconds']:.0f} |" for r in results]
    return "\n".join(rows)
