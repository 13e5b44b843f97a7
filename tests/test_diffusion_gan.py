"""Diffusion-GAN's adaptive diffusion: schedule, t_epl, diffuse, the p/T controller, resume.

The all-reduce of the controller's statistic across two real processes is tested together with
SADM's gather in ``test_sadm.py::test_two_processes_gather_and_all_reduce`` (one spawn for both).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from advdit.trainer.objectives.diffusion_gan import AdaptiveDiffusion, AdaStats, noise_std_of

from helpers import gen, tiny_config


def _feed(ada: AdaptiveDiffusion, logits: list[float], batch_size: int = 1000,
          seed: int = 0) -> AdaStats | None:
    ada.accumulate(torch.tensor(logits))
    return ada.update(batch_size, gen(seed))


# --------------------------------------------------------------------------- schedule and t_epl


def test_initial_state_and_restretched_schedule() -> None:
    ada = AdaptiveDiffusion()
    assert ada.p == 0.0 and ada.T == 10
    betas = np.linspace(1e-4, 2e-2, 10)
    assert ada.alphas_cumprod.shape == (11,) and ada.alphas_cumprod[0] == 1.0
    assert np.allclose(ada.alphas_cumprod[1:], np.cumprod(1 - betas), rtol=1e-14)
    assert math.sqrt(ada.alphas_cumprod[10]) == pytest.approx(0.951, abs=1e-3)  # docs/methods.md


def test_t_epl_has_the_clean_fraction_of_zeros_and_priority_never_draws_one() -> None:
    ada = AdaptiveDiffusion(t_min=3, t_max=3)
    assert int((ada.t_epl == 0).sum()) == 32 and ada.t_epl.dtype == torch.int64
    nonzero = ada.t_epl[32:]
    assert bool(((nonzero >= 2) & (nonzero <= 3)).all())  # T = 3: priority only yields 2 and 3
    quarter = AdaptiveDiffusion(clean_fraction=0.25)
    assert int((quarter.t_epl == 0).sum()) == 16 and bool((quarter.t_epl[16:] > 0).all())


@pytest.mark.parametrize("ts_dist", ["priority", "uniform"])
def test_t_epl_draws_follow_the_distribution(ts_dist: str) -> None:
    draws = AdaptiveDiffusion(t_min=10, t_max=10, ts_dist=ts_dist, clean_fraction=0.0,
                              epl_size=40_000).t_epl
    frequencies = torch.bincount(draws, minlength=11).double() / draws.numel()
    steps = torch.arange(11, dtype=torch.float64)
    expected = (steps - 1).clamp_min(0) / 45 if ts_dist == "priority" else (steps > 0).double() / 10
    assert frequencies[0] == 0  # clean_fraction 0: every entry is a draw from {1..T}
    assert torch.allclose(frequencies, expected, atol=0.01)
    if ts_dist == "priority":
        assert frequencies[1] == 0


# --------------------------------------------------------------------------- diffuse


def test_diffuse_at_t_zero_returns_x_unchanged() -> None:
    ada = AdaptiveDiffusion(clean_fraction=1.0)
    x = torch.randn(6, 4, 3, 3, generator=gen(0))
    y, t = ada.diffuse(x, gen(1))
    assert torch.equal(t, torch.zeros(6, dtype=torch.int64))
    assert torch.equal(y, x)


def test_diffuse_scales_x_noises_it_and_passes_gradients() -> None:
    ada = AdaptiveDiffusion(t_min=500, t_max=500, clean_fraction=0.0, noise_std=0.5)
    x = torch.randn(64, 2000, generator=gen(0)).requires_grad_()
    y, t = ada.diffuse(x, gen(1))
    assert t.shape == (64,) and bool((t >= 1).all() and (t <= 500).all())
    acp = torch.as_tensor(ada.alphas_cumprod)[t][:, None]
    y.sum().backward()
    assert torch.allclose(x.grad, acp.sqrt().float().expand_as(x))  # dy/dx = sqrt(acp_t)
    eps = (y.detach() - acp.sqrt() * x.detach()) / (0.5 * (1 - acp).sqrt())
    assert eps.mean().abs() < 0.01 and (eps.std(dim=1) - 1).abs().max() < 0.1


# --------------------------------------------------------------------------- controller


def test_p_and_T_rise_above_target_and_fall_below_it() -> None:
    ada = AdaptiveDiffusion(ada_interval=2)
    step = 1000 * 2 / (100 * 1000)  # batch * interval / (ada_kimg * 1000) = 0.02
    assert _feed(ada, [1.0, 2.0, 3.0]) is None  # first of two calls: no adjustment
    assert ada.p == 0.0 and ada.T == 10
    stats = _feed(ada, [4.0, 5.0, -1.0])  # mean sign over the interval: 4/6 = 0.667 > 0.6
    assert stats == AdaStats(r_d=pytest.approx(4 / 6), p=pytest.approx(step), T=10 + round(step * 990))
    assert ada.T == 30 and ada.alphas_cumprod.shape == (31,)
    assert int(ada.t_epl.max()) <= 30
    _feed(ada, [1.0, -1.0])
    stats = _feed(ada, [1.0, -1.0])  # r_d = 0 < 0.6: back down
    assert stats.p == 0.0 and stats.T == 10
    _feed(ada, [-1.0])
    stats = _feed(ada, [-1.0])  # below target at p = 0: clipped, T stays at t_min
    assert stats.p == 0.0 and ada.T == ada.t_min == 10


def test_p_is_unchanged_at_the_target_and_clipped_at_one() -> None:
    ada = AdaptiveDiffusion(ada_interval=1, ada_kimg=2, t_max=200)  # step 1000 / 2000 = 0.5
    assert _feed(ada, [1.0]).p == 0.5
    at_target = _feed(ada, [1.0, 1.0, 1.0, 1.0, -1.0])  # mean sign 3/5 == target
    assert at_target.r_d == pytest.approx(0.6) and at_target.p == 0.5
    assert _feed(ada, [1.0]).p == 1.0 and _feed(ada, [1.0]).p == 1.0  # clipped
    assert ada.T == 200
    assert _feed(ada, [-1.0]).p == 0.5 and ada.T == 10 + round(0.5 * 190)


def test_update_without_statistics_keeps_p() -> None:
    ada = AdaptiveDiffusion(ada_interval=1)
    stats = ada.update(64, gen(0))
    assert math.isnan(stats.r_d) and stats.p == 0.0 and stats.T == 10


# --------------------------------------------------------------------------- checkpointing


def _run(ada: AdaptiveDiffusion, steps: range) -> list[torch.Tensor]:
    """Diffuse, accumulate D-like logits, update: what a training loop does, seeded per step."""
    outputs = []
    x = torch.randn(16, 3, generator=gen(100))
    for step in steps:
        y, t = ada.diffuse(x, gen(step))
        ada.accumulate(y[:, 0] + 1.0)  # mostly positive: p and T keep rising
        stats = ada.update(16_000, gen(10_000 + step))
        outputs += [y, t, torch.tensor([ada.p, ada.T] + ([stats.r_d] if stats else []))]
    return outputs


def test_state_dict_round_trip_gives_identical_subsequent_draws() -> None:
    config = {"ada_interval": 3, "clean_fraction": 0.5, "t_max": 400}
    uninterrupted = AdaptiveDiffusion(**config, seed=7)
    _run(uninterrupted, range(5))  # stops mid-interval: the accumulators matter
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    resumed = AdaptiveDiffusion(**config, seed=123)  # a different initial t_epl, overwritten
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    expected, actual = _run(uninterrupted, range(5, 12)), _run(resumed, range(5, 12))
    assert uninterrupted.T > 10  # the run did move T, so the comparison covers the schedule
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_a_snapshot() -> None:
    ada = AdaptiveDiffusion()
    ada.accumulate(torch.tensor([1.0, 1.0]))
    state = ada.state_dict()
    ada.accumulate(torch.tensor([1.0, -1.0, 1.0]))  # accumulates in place: must not reach the snapshot
    assert state["sign_stats"].tolist() == [2.0, 2.0]


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="ts_dist must be one of"):
        AdaptiveDiffusion(ts_dist="exponential")
    with pytest.raises(ValueError, match="clean_fraction must lie in"):
        AdaptiveDiffusion(clean_fraction=1.5)
    with pytest.raises(ValueError, match="2 <= t_min <= t_max"):
        AdaptiveDiffusion(t_min=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        AdaptiveDiffusion().update(0, gen(0))
    with pytest.raises(ValueError, match="missing \\['calls'"):
        AdaptiveDiffusion().load_state_dict({"p": 0.0, "T": 10, "t_epl": torch.zeros(64), "sign_stats": 0})
    with pytest.raises(ValueError, match="T = 5000 is outside"):
        AdaptiveDiffusion().load_state_dict({**AdaptiveDiffusion().state_dict(), "T": 5000})


def test_noise_std_follows_the_data_space_unless_set(tmp_path: Path) -> None:
    """Null means the paper's 0.05 in pixel space (it won on the digits) and 0.5 on SD-VAE latents."""
    pixels = tiny_config(tmp_path, tmp_path, "objective=diffusion_gan")
    latents = tiny_config(tmp_path, tmp_path, "objective=diffusion_gan", "vae=models/sd-vae-ft-ema")
    assert pixels.diffusion_gan.noise_std is None
    assert (noise_std_of(pixels), noise_std_of(latents)) == (0.05, 0.5)
    chosen = tiny_config(tmp_path, tmp_path, "objective=diffusion_gan", "vae=models/sd-vae-ft-ema",
                         "diffusion_gan.noise_std=0.2")
    assert noise_std_of(chosen) == 0.2
