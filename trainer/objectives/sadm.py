"""SADM's structure discriminator math: batch affinities, their distance, gathering, t weights.

Everything here is a reconstruction ([INFERRED], docs/methods.md: SADM): SADM's paper says the
denoiser minimises, and the encoder inside the "comparison-based" structure discriminator
maximises, a distance between the affinity (structure) matrices of real and generated batches,
but neither the affinity, the distance, the encoder nor the t-range are known, and no official
code exists. Each choice is therefore a switch:

- ``affinity``: cosine <h_i, h_j>, Gaussian exp(-||h_i - h_j||^2 / tau), or the row softmax of
  <h_i, h_j> / tau; the diagonal (a sample with itself) is excluded.
- ``structural_distance``: mean over i != j of |A - A'| or (A - A')^2, or the mean over rows of
  KL(A_i. || A'_i.) for row-softmax affinities.
- ``gather_rows_with_local_grad``: the affinities of the global batch (docs/methods.md: SADM).
- ``timestep_weight``: none, an SNR-based down-weighting of large t, or a hard t-range
  (docs/methods.md: SADM).

The real and fake matrices are paired: row i of both belongs to the same sample (the fake is the
denoiser's x0 prediction from the noised real, docs/methods.md: SADM). All results are float32.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...models.diffusion import Generators
from ...models.discriminators import StructureEncoder
from ..config import Config, SADMAffinity, SADMDistance, SADMWeighting
from ..runtime.distributed import initialized
from .base import Adversary, Denoiser, Metrics, Objective, StepContext, adversarial_round
from .dit import DenoisingPass, denoise, denoising_metrics, diffusion_sampler

# The choices are the config's (its section checks them when a run is configured); these
# functions also check them when called directly.
AFFINITIES = get_args(SADMAffinity)
DISTANCES = get_args(SADMDistance)
WEIGHT_MODES = get_args(SADMWeighting)


def _off_diagonal(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def affinity(features: torch.Tensor, kind: str = "cosine", tau: float = 0.5) -> torch.Tensor:
    """(B, B) affinity matrix of (B, d) features; the diagonal is 0 (excluded).

    ``tau`` is the Gaussian bandwidth or the softmax temperature; 'cosine' ignores it. Its default
    is a reconstruction: for unit features ||h_i - h_j||^2 lies in [0, 4], and 0.5 keeps both
    kernels away from saturation.
    """
    if kind not in AFFINITIES:
        raise ValueError(f"kind must be one of {AFFINITIES}, got {kind!r}")
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features has shape {tuple(features.shape)}, expected (B, d) with B >= 2")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    h = features.float()
    off_diagonal = _off_diagonal(h.shape[0], h.device)
    if kind == "softmax":
        logits = (h @ h.T / tau).masked_fill(~off_diagonal, float("-inf"))
        return torch.softmax(logits, dim=1)
    if kind == "cosine":
        h = F.normalize(h, dim=1)
        return (h @ h.T) * off_diagonal
    squared_norms = h.square().sum(dim=1)
    # Expanded form, clamped: rounding can make the diagonal slightly negative.
    squared_distances = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * h @ h.T).clamp_min(0.0)
    return torch.exp(-squared_distances / tau) * off_diagonal


def structural_distance(real_aff: torch.Tensor, fake_aff: torch.Tensor, kind: str = "l1",
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between paired (B, B) affinity matrices, over the off-diagonal entries only.

    'l1' / 'l2': mean over i != j of |A_ij - A'_ij| or its square. 'kl': (1/B) sum_i
    KL(real_i. || fake_i.), for row-stochastic affinities (``affinity(kind='softmax')``).
    ``weights`` (B,), e.g. from ``timestep_weight``, turn the means into weighted means: pair
    (i, j) counts w_i w_j, row i counts w_i. All-zero weights give 0.
    """
    if kind not in DISTANCES:
        raise ValueError(f"kind must be one of {DISTANCES}, got {kind!r}")
    if real_aff.shape != fake_aff.shape or real_aff.ndim != 2 or real_aff.shape[0] != real_aff.shape[1]:
        raise ValueError(f"real_aff and fake_aff must both be (B, B), got {tuple(real_aff.shape)} "
                         f"and {tuple(fake_aff.shape)}")
    n = real_aff.shape[0]
    if n < 2:
        raise ValueError(f"affinities must be at least 2 x 2, got {n} x {n}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected ({n},)")
    real, fake = real_aff.float(), fake_aff.float()
    row_weights = torch.ones(n, device=real.device) if weights is None else weights.float().detach()
    # Masks multiply rather than index: boolean indexing would sync the device.
    off_diagonal = _off_diagonal(n, real.device)
    if kind == "kl":
        # Clamped logs: the diagonal (and any underflowed entry) is 0, where log would give -inf
        # and its gradient 0 * inf = nan even under the mask.
        tiny = torch.finfo(torch.float32).tiny
        terms = real * (torch.log(real.clamp_min(tiny)) - torch.log(fake.clamp_min(tiny)))
        per_row = (terms * off_diagonal).sum(dim=1)
        return (per_row * row_weights).sum() / row_weights.sum().clamp_min(tiny)
    difference = real - fake
    terms = difference.abs() if kind == "l1" else difference.square()
    pair_weights = row_weights[:, None] * row_weights[None, :] * off_diagonal
    return (terms * pair_weights).sum() / pair_weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def gather_rows_with_local_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order; only this rank's rows keep their autograd graph.

    The identity when torch.distributed is not initialised or has one rank. Every rank must pass
    the same shape (``all_gather``). The gradient each rank gets for its own rows is that of the
    global-batch loss, so the per-rank gradients add up to the single-process gradient; DDP
    *averages* them, i.e. divides that by the world size (scale the loss if that matters).
    """
    if not initialized() or dist.get_world_size() == 1:
        return features
    local = features.detach().contiguous()
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    rows[dist.get_rank()] = features
    return torch.cat(rows, dim=0)


def timestep_weight(t: torch.Tensor, alphas_cumprod: np.ndarray | torch.Tensor, mode: str = "none",
                    t_max: int | None = None) -> torch.Tensor:
    """(B,) float32 weights of the structure loss per sample's diffusion step t.

    - 'none': 1.
    - 'snr': SNR / (1 + SNR) = alphas_cumprod[t], near 1 at small t and near 0 where the x0
      prediction is a blurry posterior mean.
    - 'range': 1 where t <= t_max, else 0.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    if t.ndim != 1:
        raise ValueError(f"t has shape {tuple(t.shape)}, expected (B,)")
    if mode == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if mode == "range":
        if t_max is None:
            raise ValueError("t_max must be given for mode='range'")
        return (t <= t_max).float()
    table = torch.as_tensor(alphas_cumprod, dtype=torch.float32, device=t.device)
    return table[t.long()]


# --------------------------------------------------------------------------- the objective

class SADMObjective(Objective):
    """DiT + a structure discriminator (a reconstruction: docs/methods.md, "SADM").

    Per step, with one forward pass of the denoiser:
    1. the encoder takes an ascent step on D(phi, sg[x0_pred]), the structural distance between
       the affinities of the real batch and of the denoiser's x0 predictions;
    2. the denoiser, with the encoder frozen, descends on L_denoise + lambda * D(phi, x0_pred).
    In multi-process runs the affinities cover the gathered global batch, with gradients on the
    local rows. ``sadm.weighting`` down-weights samples whose x0 prediction is a blurry mean.
    """

    name = "sadm"
    adversary_names = ("encoder",)
    config_sections = ("sadm", "disc")
    sampler = staticmethod(diffusion_sampler)

    def __init__(self, cfg: Config, denoiser: Denoiser) -> None:
        super().__init__(cfg, denoiser)
        encoder = StructureEncoder(denoiser.channels, denoiser.latent_size, cfg.sadm.feature_dim,
                                   cfg.disc.base_channels, cfg.disc.num_blocks, cfg.sadm.t_conditioned)
        self.encoder = Adversary(denoiser.accelerator, encoder, cfg.disc, role="encoder")

    def distance(self, real: torch.Tensor, predicted: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sadm = self.cfg.sadm
        t_input = t if sadm.t_conditioned else None
        with self.denoiser.accelerator.autocast():
            real_features = self.encoder.net(real, t_input)
            fake_features = self.encoder.net(predicted, t_input)
        weights = timestep_weight(t, self.denoiser.diffusion.alphas_cumprod, sadm.weighting, sadm.t_max)
        real_aff = affinity(gather_rows_with_local_grad(real_features.float()), sadm.affinity, sadm.tau)
        fake_aff = affinity(gather_rows_with_local_grad(fake_features.float()), sadm.affinity, sadm.tau)
        return structural_distance(real_aff, fake_aff, sadm.distance, gather_rows_with_local_grad(weights))

    def denoise(self, latents: torch.Tensor, labels: torch.Tensor, rng: Generators) -> DenoisingPass:
        return denoise(self.denoiser, self.cfg, latents, labels, rng)

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> Metrics:
        denoised = self.denoise(latents, labels, ctx.draws(len(latents), latents.device))
        lam = self.cfg.sadm.lambda_ if ctx.step >= self.cfg.sadm.warmup_steps else 0.0

        def encoder_terms() -> dict[str, torch.Tensor]:  # ascent on the distance
            distance = self.distance(latents, denoised.x0_pred.detach(), denoised.t)
            return {"loss": -distance, "distance": distance}

        def denoiser_terms() -> dict[str, torch.Tensor]:
            distance = self.distance(latents, denoised.x0_pred, denoised.t)
            denoise_loss = denoised.terms["loss"].mean()
            return {"loss": denoise_loss + lam * distance, "denoise": denoise_loss, "distance": distance}

        played = adversarial_round(self.encoder, encoder_terms, self.denoiser, denoiser_terms, ctx.step,
                                   self.name)
        denoiser_metrics = {"loss": "loss", "loss_denoise": "denoise", "sadm/distance_denoiser": "distance"}
        return {**played.metrics(denoiser_metrics, {"sadm/distance_encoder": "distance"}),
                **denoising_metrics(denoised)}
