"""The real-data quality benchmark: plain DiT, SADM, Diffusion-GAN and DDGAN trained for the same
wall-clock time on the handwritten digits, several seeds each, scored by the digits evaluator.

Each (method, seed) run is an ordinary training run (``train()`` with the digits settings plus the
method's preset, ``train.max_minutes`` as the budget), so the benchmark measures the trainer users
run, not a copy of it. Its EMA weights are then sampled by every sampler that applies (the
diffusion objectives with DDPM 250 steps and DDIM 25 steps, DDGAN with its own T steps) and scored
on the same labels: digits-FID in the classifier's feature space, class consistency, precision and
recall (``trainer/evaluation/digits.py``). Runs go seed after seed, every method once per seed,
so that a change in the machine's load during the benchmark falls on all methods alike.

Files: ``OUT/mlflow.db`` holds every run's MLflow run (experiment advdit-quality) unless
tracking.uri or MLFLOW_TRACKING_URI says otherwise; ``OUT/<method>/seed_<k>/`` is the run's
folder (checkpoint, metrics.jsonl) plus ``quality.json`` (its scores) and ``samples_<sampler>.png``;
``OUT/summary.json``, ``summary.md`` and ``summary.png`` summarise every ``quality.json`` found.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, load_config
from ..evaluation.digits import score_digits
from ..evaluation.sampling import balanced_labels, load_sampler, sampling_config, save_grid
from ..loop import train
from ..tracking import resolve_uri
from .toy import spread

logger = logging.getLogger(__name__)

METHODS = ("dit", "sadm", "diffusion_gan", "ddgan")
# (name, sampler, steps) for the objectives that train a diffusion model; DDGAN samples with its T.
DIFFUSION_SAMPLERS = (("ddpm250", "ddpm", 250), ("ddim25", "ddim", 25))
DDGAN_SAMPLER = "ddgan"
METRICS = ("fid", "class_consistency", "precision", "recall")
# Training statistics worth reading next to the scores: the adversaries' outputs and Diffusion-GAN's
# controller, from the last logged row of each run.
GAME_STATISTICS = ("loss", "loss_denoise", "loss_g", "loss_d", "d_real", "d_fake", "ada/T", "ada/r_d",
                   "sadm/distance_denoiser", "sadm/distance_encoder")
# The adversary sized to the digits' small DiT, after the method's preset (whose 128-channel,
# 3-block adversary is sized for DiT-XL on ImageNet latents): with it a SADM step took about 30
# times a plain DiT step here, 84 steps in 3 minutes against 2,498. At 32 channels and 2 blocks
# (widths 32, 64, 128 over 16x16 -> 4x4) SADM, Diffusion-GAN and DDGAN ran about 1,100, 1,165 and
# 770 steps in 3 minutes against about 2,150 for the plain DiT (means of seeds 0-2, 2-core CPU,
# 2026-12-03): the remaining cost is the objective's own (the adversary's passes, R1, the game's
# extra passes of the DiT).
ADVERSARY = ("disc.base_channels=32", "disc.num_blocks=2")
# DDGAN's generator learns from the adversarial loss alone, so it gets the official
# train_ddgan.py optimizer (lr 1.6e-4, Adam betas 0.5 / 0.9), not the digits DiT's lr 4e-3 with
# betas 0.9 / 0.999. At the DiT's rate its discriminator won (logits +2.4 / -3.3) and its samples
# stayed stripes at chance; at its own rate the game stayed balanced and the digits took shape
# (digits-FID 617 -> 445, class consistency 0.085 -> 0.205: seed 0, 8 minutes, 2-core CPU).
DDGAN_GENERATOR = ("optim.lr=1.6e-4", "optim.beta1=0.5", "optim.beta2=0.9")
NEVER = 10**9  # train.steps and the periodic intervals: the budget ends the run, not a step count
GRID_ROWS = 2  # samples per class in a run's picture


class QualityInterrupted(RuntimeError):
    """A run was stopped by a signal (SIGTERM, SIGUSR1): the benchmark stops; run again to go on."""


@dataclass
class QualityPlan:
    """What ``advdit quality`` runs: its data, evaluator, budget and where everything goes."""

    data_dir: Path  # the folder of ``advdit data digits`` (train/ and heldout/)
    classifier: Path  # the evaluator's spec JSON (``advdit digits classifier``)
    out_dir: Path
    budget_minutes: float
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = METHODS
    num_samples: int = 200  # per sampler, balanced over the 10 classes
    config: str = "digits"  # the base settings: a preset name or a YAML file
    # KEY=VALUE for every run; METHOD:KEY=VALUE for that method's runs only (e.g. disc.* keys,
    # which the plain DiT refuses).
    overrides: Sequence[str] = field(default_factory=list)
    # The samplers that score the objectives that train a diffusion model (DDGAN always uses its own
    # T steps): DDIM 25 alone skips DDPM 250, most of a short run's scoring time.
    diffusion_samplers: Sequence[str] = tuple(name for name, _, _ in DIFFUSION_SAMPLERS)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
        if self.budget_minutes <= 0:
            raise ConfigError(f"the budget must be positive minutes, got {self.budget_minutes}")
        known = [name for name, _, _ in DIFFUSION_SAMPLERS]
        if not self.diffusion_samplers or any(name not in known for name in self.diffusion_samplers):
            raise ConfigError(f"--samplers {list(self.diffusion_samplers)}: expected one or more of {known}")
        if self.num_samples < 10 or self.num_samples % 10:
            raise ConfigError(f"--samples must be a positive multiple of 10 (balanced classes), "
                              f"got {self.num_samples}")
        for path, what in ((self.data_dir / "train", "advdit data digits --out DIR"),
                           (self.data_dir / "heldout", "advdit data digits --out DIR"),
                           (self.classifier, "advdit digits classifier")):
            if not path.exists():
                raise ConfigError(f"{path} does not exist: write it first with `{what}`")

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out_dir / method / f"seed_{seed}"

    def run_config(self, method: str, seed: int) -> Config:
        """The base settings, the method's preset, the budget, the adversary's size (and DDGAN's
        generator optimizer); then the user's overrides."""
        return load_config([self.config, f"methods/{method}"], [
            f"run.name=quality-{method}-seed{seed}", f"run.output_dir={self.run_dir(method, seed)}",
            f"run.seed={seed}", f"data.shards={self.data_dir / 'train'}", f"train.steps={NEVER}",
            f"train.max_minutes={self.budget_minutes}", f"train.ckpt_every={NEVER}",
            f"train.sample_every={NEVER}", "tracking.experiment=advdit-quality",
            f"tracking.uri=sqlite:///{self.out_dir.resolve() / 'mlflow.db'}",  # one store for all runs
            *(ADVERSARY if method != "dit" else ()), *(DDGAN_GENERATOR if method == "ddgan" else ()),
            *self.overrides_for(method)])

    def overrides_for(self, method: str) -> list[str]:
        """The overrides that apply to ``method``: unprefixed ones and those prefixed ``method:``."""
        chosen = []
        for text in self.overrides:
            prefix, colon, _ = text.partition("=")[0].partition(":")
            if not colon:
                chosen.append(text)
            elif prefix not in METHODS:
                raise ConfigError(f"override {text!r}: {prefix!r} is not a method of {list(METHODS)}")
            elif prefix == method:
                chosen.append(text[len(prefix) + 1:])
        return chosen


def samplers_of(method: str, chosen: Sequence[str]) -> list[tuple[str, str | None, int | None]]:
    """(name, sampler, steps) to score ``method``'s weights with: DDGAN's own (None), else the
    ``chosen`` ones of :data:`DIFFUSION_SAMPLERS`."""
    if method == "ddgan":
        return [(DDGAN_SAMPLER, None, None)]
    return [entry for entry in DIFFUSION_SAMPLERS if entry[0] in chosen]


def draw_samples(checkpoint: Path, sampler: str | None, steps: int | None, labels: np.ndarray,
                 seed: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) samples of the checkpoint's EMA weights for ``labels`` (one process)."""
    cfg = sampling_config(checkpoint, sampler, steps)
    model, _ = load_sampler(checkpoint, cfg)
    batches = model.batches(labels, seed, batch_size=len(labels))
    return torch.cat([images.cpu() for _, images in batches])


def picture(images: torch.Tensor, path: Path, num_classes: int = 10) -> Path:
    """The first GRID_ROWS samples of each class (images drawn for balanced labels), a class per
    column, upscaled 4x."""
    shown = images[: GRID_ROWS * num_classes].float() / 127.5 - 1
    return save_grid(shown, num_classes, path, scale=4)


def game_statistics(run_dir: Path) -> dict[str, float]:
    """Those of GAME_STATISTICS that the run's last logged row (metrics.jsonl) holds."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    last = rows[-1] if rows else {}
    return {key: float(last[key]) for key in GAME_STATISTICS if key in last}


def log_scores(cfg: Config, run_id: str | None, scores: dict[str, dict[str, float]], step: int) -> None:
    """The scores into the run's own MLflow run (quality/<sampler>/<metric>); a tracking fault
    is logged, never raised: the scores are in quality.json either way."""
    if not (cfg.tracking.enabled and run_id):
        return
    try:
        import mlflow

        client = mlflow.MlflowClient(resolve_uri(cfg.tracking.uri, Path(cfg.run.output_dir)))
        for sampler, metrics in scores.items():
            for name, value in metrics.items():
                client.log_metric(run_id, f"quality/{sampler}/{name}", value, step=step)
    except Exception as err:  # noqa: BLE001 - any fault of the tracking side
        logger.warning("could not log the quality scores to MLflow run %s: %s", run_id, err)


def run_one(plan: QualityPlan, method: str, seed: int, progress: bool = False) -> dict[str, Any]:
    """Train ``method`` with ``seed`` for the budget (one process), score it, write and return
    quality.json."""
    cfg = plan.run_config(method, seed)
    out = plan.run_dir(method, seed)
    if out.exists():  # an earlier attempt cut short: a budget cannot be resumed, so start over
        logger.info("%s seed %d: removing the unscored attempt in %s", method, seed, out)
        shutil.rmtree(out)
    started = time.monotonic()
    result = train(cfg, resume="none", progress=progress)
    train_seconds = time.monotonic() - started
    if result.preempted:
        raise QualityInterrupted(f"{method} seed {seed} was stopped by a signal at step {result.step}")
    if result.checkpoint is None:
        raise RuntimeError(f"{method} seed {seed} left no checkpoint in {out}")
    labels = balanced_labels(plan.num_samples, cfg.model.num_classes)
    scores = {}
    for name, sampler, steps in samplers_of(method, plan.diffusion_samplers):
        images = draw_samples(result.checkpoint, sampler, steps, labels, seed)
        scored = score_digits(images, torch.as_tensor(labels), plan.data_dir, plan.classifier)
        scores[name] = {key: getattr(scored, key) for key in METRICS}
        picture(images, out / f"samples_{name}.png", cfg.model.num_classes)
    log_scores(cfg, result.mlflow_run_id, scores, result.step)
    record = {"method": method, "seed": seed, "steps": result.step,
              "images_seen": result.step * cfg.data.batch_size, "train_seconds": round(train_seconds, 1),
              "budget_minutes": plan.budget_minutes, "num_samples": plan.num_samples, "scores": scores,
              "mlflow_run_id": result.mlflow_run_id}
    (out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_quality(plan: QualityPlan, progress: bool = True) -> dict[str, Any]:
    """Every (seed, method) without a quality.json yet, seed-major; then the summary."""
    for seed in plan.seeds:
        for method in plan.methods:
            if (plan.run_dir(method, seed) / "quality.json").is_file():
                logger.info("%s seed %d: scored already, kept", method, seed)
                continue
            record = run_one(plan, method, seed, progress)
            print(result_line(record), flush=True)
    return write_summary(plan.out_dir)


def result_line(record: dict[str, Any]) -> str:
    parts = [f"{name}: FID {s['fid']:.0f}, class {s['class_consistency']:.3f}"
             for name, s in record["scores"].items()]
    return f"{record['method']} seed {record['seed']}: {record['steps']} steps; " + "; ".join(parts)


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every ``<method>/seed_<k>/quality.json`` under ``out_dir`` (at least one), each with the
    ``game`` statistics of its run's last logged row."""
    paths = sorted(out_dir.glob("*/seed_*/quality.json"))
    if not paths:
        raise FileNotFoundError(f"no */seed_*/quality.json under {out_dir}")
    return [{**json.loads(path.read_text()), "game": game_statistics(path.parent)} for path in paths]


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method and sampler: the seeds, each metric's mean / std / min / max over them, the
    steps reached in the budget and the adversaries' last statistics (mean over seeds)."""
    summary: dict[str, Any] = {}
    for method in METHODS:
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue
        for name in runs[0]["scores"]:
            row: dict[str, Any] = {"method": method, "sampler": name, "seeds": [r["seed"] for r in runs],
                                   "steps": spread([r["steps"] for r in runs])}
            row |= {metric: spread([r["scores"][name][metric] for r in runs]) for metric in METRICS}
            game_keys = [key for key in GAME_STATISTICS if all(key in r["game"] for r in runs)]
            row["game"] = {key: float(np.mean([r["game"][key] for r in runs])) for key in game_keys}
            summary[f"{method}/{name}"] = row
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per method and sampler, mean ± std over the seeds."""
    lines = ["| method | sampler | seeds | steps in budget | digits-FID | class consistency | precision "
             "| recall |", "|---|---|---|---|---|---|---|---|"]
    for row in summary.values():
        cells = [f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f}" if m == "fid" else
                 f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in METRICS]
        lines.append(f"| {row['method']} | {row['sampler']} | {len(row['seeds'])} "
                     f"| {row['steps']['mean']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def game_table(summary: dict[str, Any]) -> str:
    """Markdown: the last logged training statistics of each method (mean over seeds)."""
    lines = ["| method | " + " | ".join(GAME_STATISTICS) + " |", "|---|" + "---|" * len(GAME_STATISTICS)]
    seen = set()
    for row in summary.values():
        if row["method"] in seen:
            continue
        seen.add(row["method"])
        cells = [f"{row['game'][key]:.3f}" if key in row["game"] else "" for key in GAME_STATISTICS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(out_dir: str | Path) -> dict[str, Any]:
    """summary.json, summary.md (both tables) and summary.png from every quality.json under
    ``out_dir``; returns the summary."""
    out = Path(out_dir)
    summary = summarize(read_results(out))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(f"{summary_table(summary)}\n\nLast logged training statistics "
                                    f"(mean over seeds):\n\n{game_table(summary)}\n")
    plot_summary(out / "summary.png", out, summary)
    return summary


def plot_summary(path: Path, out_dir: Path, summary: dict[str, Any]) -> None:
    """One panel per method and sampler: the samples of its lowest seed, a class per column."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    rows = list(summary.values())
    fig = Figure(figsize=(6, 1.6 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    for ax, row in zip(np.atleast_1d(fig.subplots(len(rows), 1)), rows, strict=True):
        seed = row["seeds"][0]
        grid = out_dir / row["method"] / f"seed_{seed}" / f"samples_{row['sampler']}.png"
        ax.imshow(np.asarray(Image.open(grid)), interpolation="nearest")
        ax.set_axis_off()
        fid, consistency = row["fid"]["mean"], row["class_consistency"]["mean"]
        ax.set_title(f"{row['method']} ({row['sampler']}), seed {seed}; over seeds: FID {fid:.0f}, "
                     f"class {consistency:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
