"""``advdit quality``: the real-data benchmark of the four objectives at equal wall-clock time
(numerics in ``advdit.trainer.benchmarks.quality``).

    advdit data digits --out data/digits
    advdit digits classifier --data data/digits --out models/digits
    advdit quality --budget-minutes 3 --seeds 3 --out runs/quality
    advdit quality --summarize --out runs/quality
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..trainer.runtime.preemption import PREEMPTED_EXIT_CODE

METHOD_CHOICES = ("dit", "sadm", "diffusion_gan", "ddgan")
DIFFUSION_SAMPLER_CHOICES = ("ddpm250", "ddim25")


def add_quality_parser(subcommands: Any) -> argparse.ArgumentParser:
    """Register ``quality`` on an ``add_subparsers()`` object; returns its parser."""
    quality = subcommands.add_parser(
        "quality", help="DiT, SADM, Diffusion-GAN and DDGAN on the digits at equal wall-clock, scored")
    quality.add_argument("--budget-minutes", type=float, default=3.0,
                         help="training time of every run (train.max_minutes)")
    quality.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 of every method")
    quality.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, default=list(METHOD_CHOICES))
    quality.add_argument("--samples", type=int, default=200, help="samples scored per sampler")
    quality.add_argument("--samplers", nargs="+", choices=DIFFUSION_SAMPLER_CHOICES,
                         default=list(DIFFUSION_SAMPLER_CHOICES),
                         help="what scores the diffusion objectives (DDGAN uses its own T steps); "
                              "ddim25 alone skips DDPM 250, most of a short run's scoring time")
    quality.add_argument("--data", default="data/digits", help="the folder of advdit data digits")
    quality.add_argument("--classifier", default="models/digits/digits-classifier.json",
                         help="the evaluator's spec JSON (advdit digits classifier)")
    quality.add_argument("--config", default="digits", help="the base settings (preset or YAML)")
    quality.add_argument("--out", default="runs/quality", help="runs, scores and the summary")
    quality.add_argument("--summarize", action="store_true",
                         help="train nothing: rewrite OUT/summary.* from the scored runs in OUT")
    quality.add_argument("--no-progress", dest="progress", action="store_false", help="hide the bars")
    quality.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides of every run; METHOD:KEY=VALUE for one method's runs only")
    quality.set_defaults(func=_run)
    return quality


def _run(args: argparse.Namespace) -> int:
    from ..trainer.benchmarks.quality import (
        QualityInterrupted,
        QualityPlan,
        game_table,
        run_quality,
        summary_table,
        write_summary,
    )

    if args.summarize:
        summary = write_summary(args.out)
    else:
        plan = QualityPlan(Path(args.data), Path(args.classifier), Path(args.out), args.budget_minutes,
                           range(args.seeds), args.methods, args.samples, args.config, args.overrides,
                           args.samplers)
        try:
            summary = run_quality(plan, progress=args.progress)
        except QualityInterrupted as err:
            print(f"{err}; the scored runs are kept: the same command goes on")
            return PREEMPTED_EXIT_CODE
    print(summary_table(summary))
    print()
    print(game_table(summary))
    print(f"\nsummary: {Path(args.out) / 'summary.md'}, {Path(args.out) / 'summary.png'}")
    return 0
