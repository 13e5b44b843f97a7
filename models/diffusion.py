"""Gaussian diffusion of DiT: the ADM process with epsilon prediction and learned-range variance.

The noise schedule and every per-step constant are precomputed once in float64 numpy, so that
``1 - alphas_cumprod`` near ``t = 0`` and the posterior coefficients keep their precision; they are
cast to the dtype and device of the tensor they multiply only when looked up.

Timesteps come in two flavours. ``t`` is an index into *this* process (``0 .. num_timesteps - 1``);
the model is always called with ``model_timesteps(t)``, the index into the process it was trained
on, so a model trained on 1000 steps can be sampled on a respaced process of, say, 50 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ModelFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class BatchDraws:
    """One generator for a batch split over processes: each process draws the values of the whole
    batch (``total`` rows) and keeps its own rows, ``start`` onwards. What a sample gets then depends
    on its place in the global batch only, not on how many processes share the batch, so a run
    resumed on another number of GPUs draws what the uninterrupted run drew. The price: a process
    draws ``total / rows`` times the values it keeps (one global batch's worth per draw)."""

    generator: torch.Generator
    start: int
    total: int


# One generator for the batch; one per sample (row i of every draw comes from generator i, so a
# sample is the same whichever batch it is drawn in: what distributed evaluation sampling needs); or
# a process's rows of a global batch's draws (BatchDraws: what distributed training uses).
Generators = torch.Generator | Sequence[torch.Generator] | BatchDraws
RowDraw = Callable[[int, "torch.Generator | None"], torch.Tensor]  # (rows, generator) -> tensor


def _by_rows(draw: RowDraw, rows: int, generator: Generators | None) -> torch.Tensor:
    """``rows`` rows of ``draw`` from ``generator``, in whichever of the three forms it comes."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(rows, generator)
    if isinstance(generator, BatchDraws):
        start, stop = generator.start, generator.start + rows
        if stop > generator.total:
            raise ValueError(f"rows {start}..{stop} asked of a global batch of {generator.total}")
        return draw(generator.total, generator.generator)[start:stop]
    if len(generator) != rows:
        raise ValueError(f"{len(generator)} generators for a batch of {rows}")
    return torch.cat([draw(1, g) for g in generator])


def randn(shape: Sequence[int], generator: Generators | None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape``; its rows drawn as ``generator``'s form says."""
    return _by_rows(lambda n, g: torch.randn((n, *shape[1:]), generator=g, device=device, dtype=dtype),
                    shape[0], generator)


def rand(rows: int, generator: Generators | None, device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` uniform values in [0, 1)."""
    return _by_rows(lambda n, g: torch.rand(n, generator=g, device=device), rows, generator)


def randint(high: int, rows: int, generator: Generators | None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` integers uniform in [0, high)."""
    return _by_rows(lambda n, g: torch.randint(0, high, (n,), generator=g, device=device), rows, generator)


_LOG2 = math.log(2.0)
# Half the width of one of the 256 pixel bins once [0, 255] is mapped onto [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Floor inside the decoder log-likelihood: keeps log() finite for bins the model puts ~0 mass on.
_MIN_PROB = 1e-12


# --------------------------------------------------------------------------- schedule and spacing


def linear_beta_schedule(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Linear betas (float64) from ``beta_start`` to ``beta_end``.

    As in ADM, the endpoints are given for a 1000-step process and are multiplied by
    ``1000 / num_steps`` otherwise, so that a shorter schedule destroys the signal about as much
    as the 1000-step one does (``alphas_cumprod[-1]`` stays close to the same value).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scale = 1000.0 / num_steps
    return np.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=np.float64)


_SPACING_FORMS = (
    "expected 'ddimN' (e.g. 'ddim50'), an int N, or comma-separated section counts "
    "(e.g. '10,15,20')"
)


def space_timesteps(num_steps: int, spacing: str | int) -> list[int]:
    """Sorted indices of the original ``num_steps`` process kept by a respaced process.

    - ``"ddimN"``: the smallest integer stride ``s`` such that ``range(0, num_steps, s)`` has
      exactly N elements (ADM's DDIM spacing: it always keeps step 0).
    - ``N`` (int) or ``"N"``: N steps spread evenly over the whole range, first and last included.
    - ``"a,b,c"``: the range is cut into equal sections and section ``i`` keeps ``counts[i]`` steps
      spread evenly inside it (ADM's section counts; a single section is the int case).
    """
    if isinstance(spacing, bool) or not isinstance(spacing, int | str):
        raise TypeError(f"spacing must be str or int, got {spacing!r}; {_SPACING_FORMS}")
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        return _ddim_spacing(num_steps, spacing)
    return _section_spacing(num_steps, _parse_section_counts(spacing))


def _ddim_spacing(num_steps: int, spacing: str) -> list[int]:
    count_str = spacing[len("ddim") :]
    if not count_str.isdigit() or int(count_str) < 1:
        raise ValueError(f"bad spacing {spacing!r}: {_SPACING_FORMS}")
    count = int(count_str)
    for stride in range(1, num_steps + 1):
        if len(range(0, num_steps, stride)) == count:
            return list(range(0, num_steps, stride))
    raise ValueError(
        f"bad spacing {spacing!r}: no integer stride gives exactly {count} steps out of "
        f"{num_steps}; pick another N or use an int / section counts instead"
    )


def _parse_section_counts(spacing: str | int) -> list[int]:
    if isinstance(spacing, int):
        counts = [spacing]
    else:
        parts = [part.strip() for part in spacing.split(",")]
        if not all(part.isdigit() for part in parts):
            raise ValueError(f"bad spacing {spacing!r}: {_SPACING_FORMS}")
        counts = [int(part) for part in parts]
    if any(count < 1 for count in counts):
        raise ValueError(f"bad spacing {spacing!r}: every count must be >= 1; {_SPACING_FORMS}")
    return counts


def _section_spacing(num_steps: int, counts: list[int]) -> list[int]:
    base_size, extra = divmod(num_steps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        # The first `extra` sections absorb the remainder, one step each.
        size = base_size + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"bad spacing {counts}: section {i} has {size} steps, cannot keep {count}"
            )
        # Fractional stride so that both ends of the section are kept.
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.update(start + round(j * stride) for j in range(count))
        start += size
    return sorted(kept)


# --------------------------------------------------------------------------- distributions


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats.

    Works on log variances so that tiny variances (the posterior near t = 0) do not underflow.
    At least one argument must be a tensor; floats are broadcast against it.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    mean1, logvar1, mean2, logvar2 = (
        torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability of 8-bit data ``x`` (scaled to [-1, 1]) under a Gaussian.

    Each of the 256 values owns a bin of width 2/255; the two edge bins extend to -inf / +inf so
    the 256 probabilities sum to one. ``log_scales`` is the log standard deviation. Uses the exact
    normal CDF (``torch.special.ndtr``), not ADM's tanh approximation, and evaluates each bin on
    the side of the mean where the CDF is small, so far-tail bins do not cancel to zero.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + _HALF_BIN)
    lower = inv_std * (centered - _HALF_BIN)
    # Phi(upper) - Phi(lower) == Phi(-lower) - Phi(-upper); the latter is accurate when both are
    # far right of the mean, where Phi ~ 1 and the direct difference loses all digits.
    bin_mass = torch.where(
        centered > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mid = torch.log(bin_mass.clamp(min=_MIN_PROB))
    log_left_edge = torch.special.log_ndtr(upper)  # P(X < -1 + 1/255)
    log_right_edge = torch.special.log_ndtr(-lower)  # P(X > 1 - 1/255)
    # Thresholds sit between the edge values (+-1) and their neighbours (+-(1 - 2/255)).
    return torch.where(x < -0.999, log_left_edge, torch.where(x > 0.999, log_right_edge, log_mid))


# --------------------------------------------------------------------------- the process


class DeviceTables:
    """Device copies of host tables (numpy arrays or CPU tensors), made once per device and dtype.

    A fresh host->device copy on every lookup would make each training step wait for the GPU
    queue to drain. Each copy is stored next to its source array, so a new array that happens to
    reuse a freed array's id can never be served the old copy. Owners whose tables change call
    ``clear`` (which also frees the old sources).
    """

    def __init__(self) -> None:
        self._copies: dict[tuple[int, torch.device, torch.dtype], tuple[Any, torch.Tensor]] = {}

    def get(self, table: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (id(table), device, dtype)
        cached = self._copies.get(key)
        if cached is None or cached[0] is not table:
            cached = (table, torch.as_tensor(table, dtype=dtype, device=device))
            self._copies[key] = cached
        return cached[1]

    def clear(self) -> None:
        self._copies.clear()


class GaussianDiffusion:
    """The forward process q, the model's reverse process p, its training loss and samplers.

    ``betas`` define the process; ``learn_sigma`` says whether the model output carries a second
    block of C channels that sets the variance (Improved DDPM's learned range). ``timestep_map``
    maps this process's step indices to those of the process the model was trained on (the
    identity unless the process was respaced).
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        timestep_map: Iterable[int] | np.ndarray | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.num_timesteps = int(betas.size)
        self.timestep_map = self._check_timestep_map(timestep_map)
        self._compute_constants()
        self._device_tables = DeviceTables()

    def _check_timestep_map(self, timestep_map: Iterable[int] | np.ndarray | None) -> np.ndarray:
        if timestep_map is None:
            return np.arange(self.num_timesteps, dtype=np.int64)
        mapping = np.asarray(list(timestep_map), dtype=np.int64)
        if mapping.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map has {mapping.size} entries, expected {self.num_timesteps}"
            )
        return mapping

    def _compute_constants(self) -> None:
        betas = self.betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance).
        one_minus_acp = self.one_minus_alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_acp
        # The variance is 0 at t = 0; its log is clipped to the t = 1 value so that it stays
        # finite (it is the lower end of the learned range, and an input to KL terms).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_acp
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_acp
        )
        self.log_betas = np.log(betas)

    # ----------------------------------------------------------------------- lookups

    def _table(self, arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return self._device_tables.get(arr, like.device, like.dtype)

    def _extract(self, arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``arr[t]`` as a (B, 1, ..., 1) tensor in x's dtype and device, broadcastable to x."""
        values = self._table(arr, x)[t.to(device=x.device, dtype=torch.long)]
        return values.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The indices of the original (training) process that the model must be given for t."""
        mapping = self._table(self.timestep_map, t.to(torch.long))
        return mapping[t.to(device=mapping.device, dtype=torch.long)]

    # ----------------------------------------------------------------------- forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(self.one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance.expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given standard normal ``noise``."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance.expand_as(x_t)

    def predict_xstart_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Invert q_sample: x_0 = (x_t - sqrt(1 - acp) * eps) / sqrt(acp)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor
    ) -> torch.Tensor:
        """The noise that takes x_0 to x_t at step t (inverse of predict_xstart_from_eps)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # ----------------------------------------------------------------------- reverse process

    def _split_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels, expected {expected} "
                f"for {channels}-channel input with learn_sigma={self.learn_sigma}"
            )
        if not self.learn_sigma:
            return model_output, None
        return model_output[:, :channels], model_output[:, channels:]

    def _model_log_variance(
        self, v: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        if v is None:
            # "Fixed small": the true posterior variance, as if x_0 were known exactly.
            return min_log.expand_as(x_t)
        # Improved DDPM: v in [-1, 1] interpolates, in log space, between the two bounds on the
        # optimal reverse variance: the posterior variance (small) and beta_t (large).
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Parameters of p(x_{t-1} | x_t) from the raw model output at x_t.

        Returns ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and ``eps``. With
        ``clip_denoised`` the predicted x_0 is clamped to [-1, 1] and ``eps`` is recomputed from
        it, so that the two stay consistent (DDIM uses both).
        """
        eps, v = self._split_output(model_output, x_t)
        log_variance = self._model_log_variance(v, x_t, t)
        if v is None:
            variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        else:
            variance = torch.exp(log_variance)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # ----------------------------------------------------------------------- training

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample variational bound term L_t in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0; the decoder's negative
        log-likelihood of the 8-bit x_0 for t == 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        return torch.where(t == 0, mean_flat(decoder_nll), mean_flat(kl)) / _LOG2

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """DiT's loss: eps MSE plus, when learning sigma, the VLB term for the variance only.

        Returns per-sample (shape [B]) ``loss``, ``mse`` and ``vb``, and the batch's noised input
        ``x_t`` and predicted ``eps`` (with its gradient) for objectives that build on the
        prediction (an x0 estimate: ``predict_xstart_from_eps(x_t, t, eps)``). The VLB term sees the eps
        prediction detached, so it trains the variance channels alone and the mean is trained by
        the MSE only (Improved DDPM's hybrid loss). Unlike ADM's RESCALED_MSE, ``vb`` is not
        multiplied by num_timesteps / 1000: DiT trains with plain MSE. The model output is cast
        to x_start's dtype so the loss is computed in that precision even under autocast.
        """
        x_t = self.q_sample(x_start, t, noise)
        output = model_fn(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        output = output.to(x_start.dtype)
        eps, v = self._split_output(output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen_mean_output = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen_mean_output, x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "x_t": x_t, "eps": eps}

    # ----------------------------------------------------------------------- respacing

    def respaced(self, spacing: str | int) -> GaussianDiffusion:
        """A shorter process that keeps the steps ``space_timesteps(num_timesteps, spacing)``.

        Its betas are chosen so that its alphas_cumprod equal this process's at the kept steps
        (new_beta_i = 1 - acp[k_i] / acp[k_{i-1}]), so q(x_t | x_0) is unchanged there and the
        model sees inputs from the distribution it was trained on.
        """
        kept = np.asarray(space_timesteps(self.num_timesteps, spacing), dtype=np.int64)
        kept_acp = self.alphas_cumprod[kept]
        previous_acp = np.append(1.0, kept_acp[:-1])
        new_betas = 1.0 - kept_acp / previous_acp
        # Compose with our own map so respacing a respaced process still targets the model's steps.
        return GaussianDiffusion(new_betas, self.learn_sigma, self.timestep_map[kept])

    # ----------------------------------------------------------------------- sampling

    def _initial_noise(
        self,
        shape: tuple[int, ...],
        generator: Generators | None,
        device: torch.device | str | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise
        return randn(shape, generator, device)

    def _steps(self, progress: bool) -> Iterable[int]:
        steps: Iterable[int] = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm  # only needed for interactive sampling

            steps = tqdm(steps, total=self.num_timesteps)
        return steps

    def _sample_loop(
        self,
        step_fn: Callable[[torch.Tensor, int, dict[str, torch.Tensor]], torch.Tensor],
        model_fn: ModelFn,
        shape: tuple[int, ...],
        model_kwargs: dict[str, Any] | None,
        generator: Generators | None,
        device: torch.device | str | None,
        clip_denoised: bool,
        progress: bool,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        if device is None:
            device = noise.device if noise is not None else generator_device(generator)
        x = self._initial_noise(shape, generator, device, noise)
        kwargs = model_kwargs or {}
        for i in self._steps(progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            output = model_fn(x, self.model_timesteps(t), **kwargs)
            out = self.p_mean_variance(output, x, t, clip_denoised=clip_denoised)
            x = step_fn(x, i, out)
        return x

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        model_kwargs: dict[str, Any] | None = None,
        generator: Generators | None = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling from x_T = ``noise`` (or fresh noise) down to x_0.

        Every random number comes from ``generator`` (or from one generator per sample), so seeded
        generators reproduce the samples. ``device`` defaults to the noise's, else the generator's, device.
        """

        def step(x: torch.Tensor, i: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
            if i == 0:
                return out["mean"]  # the decoder's mean: no noise is added at the last step
            z = randn(x.shape, generator, x.device, x.dtype)
            return out["mean"] + torch.exp(0.5 * out["log_variance"]) * z

        return self._sample_loop(
            step, model_fn, shape, model_kwargs, generator, device, clip_denoised, progress, noise
        )

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        model_kwargs: dict[str, Any] | None = None,
        generator: Generators | None = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM sampling; ``eta = 0`` is deterministic, ``eta = 1`` matches DDPM's variance.

        The learned variance channels, if any, are ignored: DDIM sets its own noise level.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

        def step(x: torch.Tensor, i: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
            # Scalars: every sample in the batch is at the same step.
            acp = float(self.alphas_cumprod[i])
            acp_prev = float(self.alphas_cumprod_prev[i])
            sigma = eta * math.sqrt((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))
            # Clamp: for eta > 1 sigma^2 can exceed 1 - acp_prev.
            eps_scale = math.sqrt(max(1 - acp_prev - sigma**2, 0.0))
            x_prev = math.sqrt(acp_prev) * out["pred_xstart"] + eps_scale * out["eps"]
            if sigma == 0.0:
                return x_prev  # eta == 0, or t == 0 where acp_prev == 1 makes sigma exactly 0
            z = randn(x.shape, generator, x.device, x.dtype)
            return x_prev + sigma * z

        return self._sample_loop(
            step, model_fn, shape, model_kwargs, generator, device, clip_denoised, progress, noise
        )


def generator_device(generator: Generators | None) -> torch.device:
    if generator is None:
        return torch.device("cpu")
    if isinstance(generator, BatchDraws):
        return generator.generator.device
    return generator.device if isinstance(generator, torch.Generator) else generator[0].device


# --------------------------------------------------------------------------- builders


def build_diffusion(
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    learn_sigma: bool = True,
    respacing: str | int | None = None,
) -> GaussianDiffusion:
    """DiT's diffusion: a linear schedule of ``num_steps``, optionally respaced for sampling.

    ``respacing`` is anything ``space_timesteps`` accepts; ``None`` or ``""`` keeps every step
    (``""`` is what DiT's configs use for training).
    """
    diffusion = GaussianDiffusion(
        linear_beta_schedule(num_steps, beta_start, beta_end), learn_sigma=learn_sigma
    )
    if respacing is None or respacing == "":
        return diffusion
    return diffusion.respaced(respacing)


def cfg_model_fn(model_fn: ModelFn, cfg_scale: float, null_class: int, channels: int,
                 guided_channels: int | None = None) -> ModelFn:
    """Wrap ``model_fn`` for classifier-free guidance with scale ``cfg_scale``.

    The wrapper takes the usual ``(x, t, y=..., **kwargs)``, runs the model once on the doubled
    batch ``[x; x]`` with labels ``[y; null_class]``, and returns, for the original batch,
    ``eps_uncond + cfg_scale * (eps_cond - eps_uncond)`` on the first ``guided_channels`` of the
    ``channels`` eps channels (all of them when None) and the conditional half's other channels
    (unguided eps, variance). The official DiT guides the first three of its four latent channels
    (its ``forward_with_cfg``), which is what its published FIDs used: ``guided_channels=3``
    reproduces it. Other keyword arguments are passed through unchanged (not doubled). With
    ``cfg_scale == 1`` guidance is the identity, so ``model_fn`` itself is returned and no doubled
    batch is run.
    """
    guided_channels = channels if guided_channels is None else guided_channels
    if not 1 <= guided_channels <= channels:
        raise ValueError(f"guided_channels must be in [1, {channels}] for {channels}-channel eps, "
                         f"got {guided_channels}")
    if cfg_scale == 1.0:
        return model_fn

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        batch = x.shape[0]
        labels = torch.cat([y, torch.full_like(y, null_class)])
        output = model_fn(torch.cat([x, x]), torch.cat([t, t]), y=labels, **kwargs)
        cond, uncond = output[:batch], output[batch:]
        eps_cond, eps_uncond = cond[:, :guided_channels], uncond[:, :guided_channels]
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        return torch.cat([eps, cond[:, guided_channels:]], dim=1)

    return guided
