"""The 25-Gaussians benchmark of Diffusion-GAN (its Figure 5): vanilla GAN, Diffusion-GAN, DDGAN.

The point of the benchmark is that it runs the very game code of the DiT trainer: Diffusion-GAN's
``AdaptiveDiffusion`` and its ``discriminator_loss`` / ``generator_loss``, DDGAN's
``DDGANSchedule`` and its losses, and the non-saturating losses and R1 of ``gan.py``. Only the
networks (the toy MLPs of ``models/discriminators.py``) and the data differ.

Data and metrics are the standard VEEGAN / PacGAN definitions, which the Diffusion-GAN paper is
assumed to follow ([INFERRED], docs/methods.md: Diffusion-GAN; its own definitions were not retrieved):

- data: an equal mixture of 25 isotropic Gaussians with std 0.05 centred on {-4, -2, 0, 2, 4}^2;
- a sample is *high quality* if it lies within 3 std (0.15) of its nearest centre;
- a mode is *covered* if at least one high-quality sample is assigned to it;
- both are measured on 2,500 samples drawn with a fixed seed after training.

Every random draw (initial weights, data, z, diffusion noise, evaluation samples) comes from an
explicit ``torch.Generator`` derived from ``seed``, so a run is reproducible on the same machine.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ...models.discriminators import (
    MLP,
    ToyDDGANGenerator,
    ToyGenerator,
    ToyPairDiscriminator,
    ToyTimeDiscriminator,
)
from ..config import ConfigError, Section, with_settings
from ..ema import EMA
from ..objectives import ddgan, diffusion_gan
from ..objectives.base import Terms, adversarial_round, check_finite, frozen_parameters
from ..objectives.gan import d_loss_nonsaturating, g_loss_nonsaturating
from ..runtime.seeding import seed_of, seeded_rng

METHODS = ("gan", "diffusion_gan", "ddgan")
GRID = (-4.0, -2.0, 0.0, 2.0, 4.0)
MODE_STD = 0.05
HQ_RADIUS = 3 * MODE_STD
NUM_EVAL_SAMPLES = 2500
HISTORY_EVERY = 100  # iterations per row of a run's training history

# Independent random streams derived from the run's seed.
_INIT_STREAM, _TRAIN_STREAM, _EVAL_STREAM, _CONTROLLER_STREAM = range(4)


# --------------------------------------------------------------------------- data and metrics


def mode_centres() -> torch.Tensor:
    """The 25 centres, (25, 2), row-major over the grid."""
    grid = torch.tensor(GRID)
    return torch.cartesian_prod(grid, grid)


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of the mixture: a uniformly drawn centre plus N(0, 0.05^2 I) noise."""
    centres = mode_centres()
    index = torch.randint(0, len(centres), (n,), generator=generator)
    return centres[index] + MODE_STD * torch.randn((n, 2), generator=generator)


def nearest_mode(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each point's nearest centre, whether it is a high-quality sample: within
    ``HQ_RADIUS`` of that centre), in float64."""
    nearest_distance, nearest = torch.cdist(points.double(), mode_centres().double()).min(dim=1)
    return nearest, nearest_distance <= HQ_RADIUS


def mode_stats(samples: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Coverage and quality of (N, 2) samples.

    Returns ``modes_covered`` (modes holding >= 1 high-quality sample), ``high_quality_fraction``
    (samples within ``HQ_RADIUS`` of their nearest centre), ``mode_counts`` (high-quality samples
    per mode, row-major) and ``reverse_kl``: KL(q || uniform) of the high-quality samples' mode
    histogram q (PacGAN's extra measure; nan without high-quality samples).
    """
    points = torch.as_tensor(samples, dtype=torch.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"samples must have shape (N, 2) with N >= 1, got {tuple(points.shape)}")
    nearest, high_quality = nearest_mode(points)
    counts = torch.bincount(nearest[high_quality], minlength=len(GRID) ** 2)
    q = counts.double() / counts.sum() if counts.sum() else counts.double()
    kl = float((q[q > 0] * torch.log(q[q > 0] * len(q))).sum()) if counts.sum() else math.nan
    return {"modes_covered": int((counts > 0).sum()),
            "high_quality_fraction": float(high_quality.double().mean()),
            "mode_counts": counts.tolist(), "reverse_kl": kl}


# --------------------------------------------------------------------------- settings


@dataclass
class ToySettings(Section):
    """Hyper-parameters of one benchmark run; ``DEFAULTS`` holds each method's values, and
    ``advdit toy --set KEY=VALUE`` changes any of them, checked as config keys are (docs/methods.md,
    "25 Gaussians", lists the measured variants). Adam with StyleGAN2's betas (0, 0.99) at 2e-3,
    decayed along a cosine to 5% of the rate, is the setting that reached the issue's targets.
    """

    iterations: int = 20_000
    batch_size: int = 256
    lr_g: float = 2e-3
    lr_d: float = 2e-3
    beta1: float = 0.0
    beta2: float = 0.99
    latent_dim: int = 2
    hidden: int = 128
    negative_slope: float = 0.01
    time_encoding: str = "scalar"  # how D (and DDGAN's G) see t: scalar t / t_max or sinusoidal
    ema_decay: float = 0.999
    lr_final: float = 0.05  # the learning rates decay to this fraction along a cosine
    r1_gamma: float = 0.0
    r1_interval: int = 1
    # Diffusion-GAN's controller (unused by the other methods). The target is not the image
    # value 0.6 [INFERRED]: here r_d peaks near 0.35-0.45 while D is ahead and falls towards 0 once
    # G has caught up, so 0.6 is never reached and T would never leave t_min (docs/methods.md,
    # "25 Gaussians").
    noise_std: float = 1.0
    t_min: int = 5
    t_max: int = 500
    target: float = 0.3
    ada_kimg: float = 100.0
    # DDGAN's chain (unused by the other methods).
    num_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("iterations", "batch_size", "hidden", "latent_dim", "num_steps")


DEFAULTS: dict[str, ToySettings] = {
    "gan": ToySettings(),
    "diffusion_gan": ToySettings(),
    # The 2 x 128 MLPs (DDGAN's own toy used 3 x 512 and 50k iterations of batch 512). A
    # sinusoidal t lets G and D act differently per level, and R1 on the real x_t keeps D smooth
    # enough that G spreads over every mode (docs/methods.md has the runs without either).
    "ddgan": ToySettings(iterations=30_000, time_encoding="sinusoidal", r1_gamma=0.02),
}


def _initialise(module: nn.Module, rng: torch.Generator) -> nn.Module:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``rng`` instead of the global RNG."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=rng)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=rng)
    return module


class ToyPlayer:
    """A toy network with its Adam optimizer, as a player of ``adversarial_round``."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, role: str) -> None:
        self.net, self.optimizer, self.role = net, optimizer, role

    def step(self, loss: torch.Tensor, at_step: int, method: str) -> None:
        check_finite(loss, f"{method} {self.role} loss", at_step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def frozen(self) -> AbstractContextManager[None]:
        return frozen_parameters(self.net)


# --------------------------------------------------------------------------- the three games


class ToyGame(ABC):
    """One method: its networks and optimisers, one training iteration, sampling, D's view."""

    method: str  # the name in METHODS, used in errors

    def __init__(self, settings: ToySettings, generator_net: nn.Module, disc: nn.Module,
                 init: torch.Generator) -> None:
        self.settings = settings
        self.live_generator = _initialise(generator_net, init)
        self.disc = _initialise(disc, init)
        betas = (settings.beta1, settings.beta2)
        self.ema = EMA(self.live_generator, settings.ema_decay, warmup=True)
        self.opt_g = torch.optim.Adam(self.live_generator.parameters(), lr=settings.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=settings.lr_d, betas=betas)
        self.g_player = ToyPlayer(self.live_generator, self.opt_g, "generator")
        self.d_player = ToyPlayer(self.disc, self.opt_d, "discriminator")
        self.schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, settings.iterations, eta_min=opt.param_groups[0]["lr"] * settings.lr_final)
            for opt in (self.opt_g, self.opt_d)]
        self.iteration = 0

    def train_step(self, real: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        """A D step then a G step (D frozen), the trainer's own round; returns the losses."""
        r1_weight = self._r1_weight()
        played = adversarial_round(self.d_player, lambda: self.d_terms(real, rng, r1_weight),
                                   self.g_player, lambda: {"loss": self.g_loss(real, rng)}, self.iteration,
                                   self.method)
        self.ema.update(self.live_generator)
        for scheduler in self.schedulers:
            scheduler.step()
        self.iteration += 1
        losses = {"loss_d": played.adversary["loss"].item(), "loss_g": played.denoiser["loss"].item()}
        return losses | self.after_step(rng)

    def _r1_weight(self) -> float:
        # StyleGAN2's lazy R1 scales gamma / 2 by the interval; with interval 1 this is DDGAN's form.
        s = self.settings
        regularise = s.r1_gamma > 0 and self.iteration % s.r1_interval == 0
        return s.r1_gamma / 2 * s.r1_interval if regularise else 0.0

    def z(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randn((n, self.settings.latent_dim), generator=rng)

    @abstractmethod
    def d_terms(self, real: torch.Tensor, rng: torch.Generator, r1_weight: float) -> Terms:
        """D's loss terms for one real batch (the fakes detached)."""

    @abstractmethod
    def g_loss(self, real: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """G's loss against the current D."""

    def after_step(self, rng: torch.Generator) -> dict[str, float]:
        """Per-iteration bookkeeping; returns values to show and report."""
        return {}

    @abstractmethod
    def sample(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n generated points, (n, 2)."""

    @abstractmethod
    def critic(self, real: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits on clean real and generated inputs (t = 0 where D takes a time)."""


class LatentGame(ToyGame):
    """A one-step generator G(z) (vanilla GAN and Diffusion-GAN); ``d_logits`` is D on clean points."""

    def __init__(self, settings: ToySettings, disc: nn.Module, init: torch.Generator) -> None:
        s = settings
        generator_net = ToyGenerator(s.latent_dim, hidden=s.hidden, negative_slope=s.negative_slope)
        super().__init__(settings, generator_net, disc, init)

    @abstractmethod
    def d_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) logits of D on clean points."""

    def fake(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return self.live_generator(self.z(n, rng))

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return self.ema.model(self.z(n, rng))

    @torch.no_grad()
    def critic(self, real: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d_logits(real), self.d_logits(self.sample(len(real), rng))


class VanillaGAN(LatentGame):
    """G(z) against an MLP D on clean points, non-saturating loss, no regulariser."""

    method = "gan"

    def __init__(self, settings: ToySettings, init: torch.Generator) -> None:
        super().__init__(settings, MLP(2, 1, settings.hidden, negative_slope=settings.negative_slope), init)

    def d_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(x).squeeze(1)

    def d_terms(self, real: torch.Tensor, rng: torch.Generator, r1_weight: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            fake = self.fake(len(real), rng)
        return {"loss": d_loss_nonsaturating(self.d_logits(real), self.d_logits(fake))}

    def g_loss(self, real: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return g_loss_nonsaturating(self.d_logits(self.fake(len(real), rng)))


class DiffusionGAN(LatentGame):
    """G(z) against D(y, t) on adaptively diffused points: trainer/objectives/diffusion_gan.py's game."""

    method = "diffusion_gan"

    def __init__(self, settings: ToySettings, init: torch.Generator, controller_seed: int) -> None:
        s = settings
        disc = ToyTimeDiscriminator(t_max=s.t_max, encoding=s.time_encoding, hidden=s.hidden,
                                    negative_slope=s.negative_slope)
        super().__init__(settings, disc, init)
        self.controller = diffusion_gan.AdaptiveDiffusion(
            t_min=s.t_min, t_max=s.t_max, noise_std=s.noise_std, target=s.target, ada_kimg=s.ada_kimg,
            seed=controller_seed)

    def d_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(x, torch.zeros(len(x), dtype=torch.long))

    def d_terms(self, real: torch.Tensor, rng: torch.Generator, r1_weight: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            fake = self.fake(len(real), rng)
        return diffusion_gan.discriminator_loss(self.disc, self.controller, real, fake, rng, r1_weight)

    def g_loss(self, real: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return diffusion_gan.generator_loss(self.disc, self.controller, self.fake(len(real), rng), rng)

    def after_step(self, rng: torch.Generator) -> dict[str, float]:
        stats = self.controller.update(self.settings.batch_size, rng)
        values = {"T": self.controller.T, "p": self.controller.p}
        if stats is not None:  # r_d exists only on the iterations that adjust p
            values["r_d"] = stats.r_d
        return values


class DDGAN(ToyGame):
    """G(x_{t+1}, z, t) -> x0' and posterior sampling against D(x_t, x_{t+1}, t): the game of
    trainer/objectives/ddgan.py."""

    method = "ddgan"

    def __init__(self, settings: ToySettings, init: torch.Generator) -> None:
        s = settings
        net_kwargs = {"num_steps": s.num_steps, "encoding": s.time_encoding, "hidden": s.hidden,
                      "negative_slope": s.negative_slope}
        super().__init__(settings, ToyDDGANGenerator(latent_dim=s.latent_dim, **net_kwargs),
                         ToyPairDiscriminator(**net_kwargs), init)
        self.schedule = ddgan.DDGANSchedule(s.num_steps)

    def fake_pair(self, net: nn.Module, real: torch.Tensor, rng: torch.Generator,
                  t: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(t, real x_t, x_{t+1}, generated x_t) for fresh t (unless given), pairs and z."""
        if t is None:
            t = torch.randint(0, self.schedule.num_steps, (len(real),), generator=rng)
        real_prev, x_next = self.schedule.q_sample_pairs(real, t, rng)
        x0_pred = net(x_next, self.z(len(real), rng), t)
        return t, real_prev, x_next, self.schedule.posterior_sample(x0_pred, x_next, t, rng)

    def d_terms(self, real: torch.Tensor, rng: torch.Generator, r1_weight: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t, real_prev, x_next, fake_prev = self.fake_pair(self.live_generator, real, rng)
        return ddgan.discriminator_loss(self.disc, real_prev, fake_prev, x_next, t, r1_weight)

    def g_loss(self, real: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        t, _, x_next, fake_prev = self.fake_pair(self.live_generator, real, rng)
        return ddgan.generator_loss(self.disc, fake_prev, x_next, t)

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> torch.Tensor:
        def generator_fn(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, _: None) -> torch.Tensor:
            return self.ema.model(x, z, t)

        return self.schedule.sample(generator_fn, (n, 2), None, rng, self.settings.latent_dim)

    @torch.no_grad()
    def critic(self, real: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # The last reverse step (t = 0): real x_0 against G's x_0 given the same real x_1.
        t = torch.zeros(len(real), dtype=torch.long)
        t, real_prev, x_next, fake_prev = self.fake_pair(self.ema.model, real, rng, t)
        return self.disc(real_prev, x_next, t), self.disc(fake_prev, x_next, t)


def build_game(method: str, settings: ToySettings, seed: int) -> ToyGame:
    init = seeded_rng(seed, _INIT_STREAM)
    if method == "gan":
        return VanillaGAN(settings, init)
    if method == "diffusion_gan":
        return DiffusionGAN(settings, init, seed_of(seed, _CONTROLLER_STREAM))
    if method == "ddgan":
        return DDGAN(settings, init)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------- the run


# Values that are a state (the last one of a window is kept); the others are averaged per window.
_STATE_KEYS = ("T", "p")


def train_game(game: ToyGame, iterations: int, seed: int, progress: bool = True,
               history_every: int = HISTORY_EVERY) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``iterations`` training steps on fresh data batches; returns the last step's values and the
    history: one row per ``history_every`` iterations (and one for a shorter last window) holding
    ``iteration`` (iterations done), the window's mean of each loss and of r_d (Diffusion-GAN:
    over the window's controller adjustments) and the state (T, p) at the window's end."""
    rng = seeded_rng(seed, _TRAIN_STREAM)
    values: dict[str, float] = {}
    history: list[dict[str, float]] = []
    window: dict[str, list[float]] = {}
    bar = tqdm(range(iterations), desc=type(game).__name__, disable=not progress, mininterval=1.0)
    for step in bar:
        values = game.train_step(sample_data(game.settings.batch_size, rng), rng)
        for key, value in values.items():
            window.setdefault(key, []).append(float(value))
        if (step + 1) % history_every == 0 or step + 1 == iterations:
            row = {"iteration": step + 1}
            row |= {k: v[-1] if k in _STATE_KEYS else float(np.mean(v)) for k, v in window.items()}
            history.append(row)
            window = {}
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "iteration"}, refresh=False)
    return values, history


def toy_settings(method: str, overrides: dict[str, Any] | Sequence[str] = ()) -> ToySettings:
    """The method's ``DEFAULTS`` with ``overrides`` (key -> value, or ``key=value`` texts)
    applied and checked by the config's own loader."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    return with_settings(DEFAULTS[method], overrides)


def run_toy(method: str, out_dir: str | Path, overrides: dict[str, Any] | Sequence[str] = (), seed: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Train ``method`` on 25 Gaussians, evaluate 2,500 samples and write the run's files.

    ``overrides`` change the method's ``DEFAULTS`` (see ``toy_settings``). Writes
    ``samples_<method>.npy``, ``<method>.png`` (real points, generated points, D's logits on real
    and generated inputs) and ``result_<method>.json``, whose content is returned.
    """
    settings = toy_settings(method, overrides)
    torch.set_grad_enabled(True)
    start = time.perf_counter()
    game = build_game(method, settings, seed)
    last, history = train_game(game, settings.iterations, seed, progress)
    train_seconds = time.perf_counter() - start

    eval_rng = seeded_rng(seed, _EVAL_STREAM)
    samples = game.sample(NUM_EVAL_SAMPLES, eval_rng)
    real = sample_data(NUM_EVAL_SAMPLES, eval_rng)
    real_logits, fake_logits = game.critic(real, eval_rng)
    stats = mode_stats(samples)
    result = {"method": method, "modes_covered": stats["modes_covered"],
              "high_quality_percent": 100 * stats["high_quality_fraction"],
              "reverse_kl": stats["reverse_kl"], "mode_counts": stats["mode_counts"],
              "iterations": settings.iterations, "seconds": round(train_seconds, 3), "seed": seed,
              "num_samples": NUM_EVAL_SAMPLES, "final": last, "settings": asdict(settings),
              "history": history}
    if isinstance(game, DiffusionGAN):
        result |= {"final_T": game.controller.T, "final_p": game.controller.p}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"samples_{method}.npy", samples.numpy())
    plot_run(out / f"{method}.png", real, samples, real_logits, fake_logits, result)
    (out / f"result_{method}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot_run(path: Path, real: torch.Tensor, samples: torch.Tensor, real_logits: torch.Tensor,
             fake_logits: torch.Tensor, result: dict[str, Any]) -> None:
    """Three panels: real samples, generated samples (high quality in blue), D's logits."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=80)
    FigureCanvasAgg(fig)
    real_ax, fake_ax, d_ax = fig.subplots(1, 3)
    centres = mode_centres()
    _, high_quality = nearest_mode(samples)
    real_ax.scatter(real[:, 0], real[:, 1], s=2, c="tab:green")
    fake_ax.scatter(samples[high_quality, 0], samples[high_quality, 1], s=2, c="tab:blue",
                    label="high quality")
    fake_ax.scatter(samples[~high_quality, 0], samples[~high_quality, 1], s=2, c="tab:red", label="other")
    fake_ax.legend(loc="upper right", fontsize=7, markerscale=3)
    for ax, title in ((real_ax, "real"), (fake_ax, f"{result['method']}: {result['modes_covered']}/25 modes, "
                                                   f"{result['high_quality_percent']:.1f}% HQ")):
        ax.scatter(centres[:, 0], centres[:, 1], s=12, marker="+", c="black", linewidths=0.8)
        ax.set(xlim=(-6, 6), ylim=(-6, 6), aspect="equal", title=title)
    bins = np.histogram_bin_edges(torch.cat([real_logits, fake_logits]).numpy(), bins=60)
    d_ax.hist(real_logits.numpy(), bins=bins, alpha=0.6, color="tab:green", label="D(real)")
    d_ax.hist(fake_logits.numpy(), bins=bins, alpha=0.6, color="tab:blue", label="D(generated)")
    d_ax.set(title="D logits (clean inputs, t = 0)", xlabel="logit")
    d_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- several seeds

SUMMARY_METRICS = ("modes_covered", "high_quality_percent", "reverse_kl")


def seed_dir(out_dir: str | Path, seed: int) -> Path:
    """Where ``run_seeds`` puts one seed's files: ``<out>/seed_<seed>``."""
    return Path(out_dir) / f"seed_{seed}"


def run_seeds(method: str, out_dir: str | Path, seeds: Sequence[int],
              overrides: dict[str, Any] | Sequence[str] = (), progress: bool = True) -> list[dict[str, Any]]:
    """``run_toy`` once per seed, each into ``seed_dir(out_dir, seed)``; returns the results."""
    return [run_toy(method, seed_dir(out_dir, seed), overrides, seed=seed, progress=progress)
            for seed in seeds]


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, ddof 1; 0 for one value), min and max of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "min": float(array.min()), "max": float(array.max())}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method (in ``METHODS`` order): one row per seed and the mean / std / min / max over the
    seeds of modes covered, HQ % and reverse KL; for Diffusion-GAN also of the final and the
    largest T of each run (from its history). Each (method, seed) may appear only once."""
    summary: dict[str, Any] = {}
    for method in METHODS:
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue
        seeds = [r["seed"] for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{method}: seeds {seeds} hold a seed twice")
        rows = []
        for r in runs:
            row = {"seed": r["seed"], **{k: r[k] for k in SUMMARY_METRICS}, "iterations": r["iterations"],
                   "seconds": r["seconds"]}
            if "final_T" in r:
                row |= {"final_T": r["final_T"], "max_T": max(h["T"] for h in r.get("history", [])
                                                               or [{"T": r["final_T"]}])}
            rows.append(row)
        keys = [*SUMMARY_METRICS, *(("final_T", "max_T") if "final_T" in rows[0] else ())]
        spreads = {k: spread([row[k] for row in rows]) for k in keys}
        summary[method] = {"seeds": seeds, "runs": rows, **spreads}
    return summary


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``seed_*/result_*.json`` under ``out_dir``."""
    return [json.loads(path.read_text()) for path in sorted(Path(out_dir).glob("seed_*/result_*.json"))]


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: method | seeds | modes covered mean ± std (min) | HQ % mean ± std (min) | reverse KL."""
    rows = ["| method | seeds | modes covered, mean ± std (min) | HQ %, mean ± std (min) "
            "| reverse KL, mean ± std |", "|---|---|---|---|---|"]
    for method, s in summary.items():
        modes, hq, kl = s["modes_covered"], s["high_quality_percent"], s["reverse_kl"]
        rows.append(f"| {method} | {len(s['seeds'])} "
                    f"| {modes['mean']:.1f} ± {modes['std']:.1f} ({modes['min']:.0f}) "
                    f"| {hq['mean']:.1f} ± {hq['std']:.1f} ({hq['min']:.1f}) "
                    f"| {kl['mean']:.3f} ± {kl['std']:.3f} |")
    return "\n".join(rows)


def write_summary(out_dir: str | Path) -> dict[str, Any]:
    """Summarise every seed's result under ``out_dir``: ``summary.json``, ``summary.md`` and
    ``summary.png`` (samples of each method's lowest seed; T and r_d over training for every
    Diffusion-GAN seed; modes covered per seed). Returns the summary."""
    out = Path(out_dir)
    results = read_results(out)
    if not results:
        raise FileNotFoundError(f"no seed_*/result_*.json under {out}")
    summary = summarize(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_table(summary) + "\n")
    plot_summary(out / "summary.png", out, results, summary)
    return summary


def plot_summary(path: Path, out_dir: Path, results: Sequence[dict[str, Any]],
                 summary: dict[str, Any]) -> None:
    """Top row: each method's samples (its lowest seed). Bottom row: Diffusion-GAN's T and r_d
    over training, one line per seed, and the modes covered by every run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    centres = mode_centres()
    for ax, method in zip(axes[0], METHODS, strict=True):
        ax.set(xlim=(-6, 6), ylim=(-6, 6), aspect="equal")
        if method not in summary:
            ax.set_title(f"{method}: not run")
            continue
        seed = summary[method]["seeds"][0]
        samples = torch.as_tensor(np.load(seed_dir(out_dir, seed) / f"samples_{method}.npy"))
        _, high_quality = nearest_mode(samples)
        ax.scatter(samples[high_quality, 0], samples[high_quality, 1], s=2, c="tab:blue")
        ax.scatter(samples[~high_quality, 0], samples[~high_quality, 1], s=2, c="tab:red")
        ax.scatter(centres[:, 0], centres[:, 1], s=12, marker="+", c="black", linewidths=0.8)
        run = summary[method]["runs"][0]
        ax.set_title(f"{method}, seed {seed}: {run['modes_covered']}/25 modes, "
                     f"{run['high_quality_percent']:.1f}% HQ", fontsize=10)
    t_ax, r_ax, modes_ax = axes[1]
    dg_runs = sorted((r for r in results if r["method"] == "diffusion_gan"), key=lambda r: r["seed"])
    for r in dg_runs:
        history = r.get("history", [])
        iterations = [h["iteration"] for h in history]
        t_ax.plot(iterations, [h["T"] for h in history], lw=1, label=f"seed {r['seed']}")
        r_ax.plot(iterations, [h.get("r_d", math.nan) for h in history], lw=0.8, label=f"seed {r['seed']}")
    if dg_runs:
        settings = dg_runs[0]["settings"]
        r_ax.axhline(settings["target"], color="black", ls="--", lw=1, label="target")
        t_ax.set_title(f"Diffusion-GAN: T (t_min {settings['t_min']}, t_max {settings['t_max']})",
                       fontsize=10)
        t_ax.set_ylim(0, settings["t_max"] * 1.05)
        t_ax.legend(fontsize=7)
        r_ax.legend(fontsize=7)
    t_ax.set(xlabel="iteration", ylabel="T")
    r_ax.set(xlabel="iteration", ylabel="r_d = E[sign D(real)]",
             title=f"Diffusion-GAN: r_d (mean per {HISTORY_EVERY} iterations)")
    for i, s in enumerate(summary.values()):
        modes = [row["modes_covered"] for row in s["runs"]]
        offsets = np.linspace(-0.15, 0.15, len(modes)) if len(modes) > 1 else [0.0]
        modes_ax.scatter(i + np.asarray(offsets), modes, s=18)
        modes_ax.errorbar(i + 0.3, s["modes_covered"]["mean"], yerr=s["modes_covered"]["std"], fmt="o",
                          color="black", capsize=3)
    hq = {method: s["high_quality_percent"] for method, s in summary.items()}
    labels = [f"{method}\nHQ {hq[method]['mean']:.1f} ± {hq[method]['std']:.1f}%" for method in summary]
    modes_ax.set_xticks(range(len(summary)), labels, fontsize=8)
    modes_ax.set(ylabel="modes covered", title="modes covered per seed (black: mean ± std)", xlim=(-0.5, 2.7),
                 ylim=(None, 25.5))
    fig.tight_layout()
    fig.savefig(path)
