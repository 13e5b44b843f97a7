"""DDGAN's schedule, real pairs, posterior and sampler against independent float64 closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advdit.trainer.objectives.ddgan import DDGANSchedule

from helpers import gen


def _grid_acp(num_steps: int) -> np.ndarray:
    """alpha-bar at the levels' times: exp(2 * log mean coefficient) of the VP-SDE (0.1, 20)."""
    tau = np.array([k / num_steps * 0.999 + 0.001 for k in range(num_steps + 1)])
    log_mean_coeff = -0.25 * tau**2 * (20.0 - 0.1) - 0.5 * tau * 0.1
    return np.exp(2.0 * log_mean_coeff)


def _chain(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha-bar of each level relative to level 0, per-step beta): the chain the posterior assumes."""
    acp = _grid_acp(num_steps)
    return acp / acp[0], 1 - acp[1:] / acp[:-1]


# --------------------------------------------------------------------------- schedule


def test_schedule_matches_the_values_in_methods_md() -> None:
    schedule = DDGANSchedule(num_steps=4)
    assert schedule.betas[0] == 1e-8
    assert np.allclose(schedule.betas[1:], [0.478, 0.849, 0.956, 0.987], atol=1e-3)
    assert np.allclose(schedule.marginal_mean_coef, [1.0, 0.722, 0.280, 0.059, 0.0066], atol=5e-4)
    assert np.allclose(schedule.marginal_std, [1e-4, 0.692, 0.960, 0.998, 1.0], atol=5e-4)
    assert schedule.marginal_std[0] == pytest.approx(1e-4, rel=1e-3)  # beta_0 = 1e-8: std 1e-4
    assert np.allclose(DDGANSchedule(num_steps=2).marginal_mean_coef, [1.0, 0.280, 0.0066], atol=5e-4)


def test_schedule_betas_follow_the_vp_grid() -> None:
    schedule = DDGANSchedule(num_steps=4)
    relative_acp, betas = _chain(4)
    assert np.allclose(schedule.betas[1:], betas, rtol=1e-12)
    assert np.allclose(schedule.posterior_alphas_cumprod, relative_acp[1:], rtol=1e-12)
    assert np.allclose(schedule.alphas_cumprod, (1 - 1e-8) * relative_acp, rtol=1e-12)


# --------------------------------------------------------------------------- posterior


def _posterior_closed_form(k: int, x0: float, x_next: float, num_steps: int) -> tuple[float, float]:
    """q(x_k | x_{k+1}, x_0) by Gaussian conditioning of the forward chain, level 0 being x_0."""
    relative_acp, betas = _chain(num_steps)
    prior_mean, prior_var = np.sqrt(relative_acp[k]) * x0, 1 - relative_acp[k]
    if k == 0:
        return x0, 0.0
    step_scale, step_var = np.sqrt(1 - betas[k]), betas[k]  # x_{k+1} = step_scale x_k + N(0, step_var)
    precision = 1 / prior_var + step_scale**2 / step_var
    mean = (prior_mean / prior_var + step_scale * x_next / step_var) / precision
    return mean, 1 / precision


@pytest.mark.parametrize("num_steps", [2, 4])
def test_posterior_mean_and_variance_match_the_closed_form(num_steps: int) -> None:
    schedule = DDGANSchedule(num_steps=num_steps)
    x0 = torch.tensor([[0.3], [-1.2], [2.0], [0.9]], dtype=torch.float64)[:num_steps]
    x_next = torch.tensor([[1.1], [0.4], [-0.7], [-2.5]], dtype=torch.float64)[:num_steps]
    t = torch.arange(num_steps)
    mean, variance, log_variance = schedule.posterior_mean_variance(x0, x_next, t)
    for k in range(num_steps):
        expected_mean, expected_var = _posterior_closed_form(k, x0[k, 0].item(), x_next[k, 0].item(),
                                                             num_steps)
        assert mean[k, 0].item() == pytest.approx(expected_mean, rel=1e-10, abs=1e-12)
        assert variance[k, 0].item() == pytest.approx(expected_var, rel=1e-10, abs=1e-15)
    assert log_variance[0, 0].item() == pytest.approx(np.log(1e-20))  # clipped where the variance is 0


def test_posterior_sample_draws_the_posterior_and_no_noise_at_step_zero() -> None:
    schedule = DDGANSchedule(num_steps=4)
    batch = 50_000
    x0_pred = torch.full((batch, 1), 0.8, requires_grad=True)
    x_next = torch.full((batch, 1), -0.5)
    t = torch.full((batch,), 2)
    sample = schedule.posterior_sample(x0_pred, x_next, t, gen(0))
    expected_mean, expected_var = _posterior_closed_form(2, 0.8, -0.5, 4)
    assert sample.mean().item() == pytest.approx(expected_mean, abs=0.01)
    assert sample.var().item() == pytest.approx(expected_var, rel=0.03)
    sample.sum().backward()  # G's gradient path: through the posterior mean's x0 coefficient
    assert torch.allclose(x0_pred.grad, torch.full_like(x0_pred, schedule.posterior_mean_coef1[2]))
    x0_few, x_next_few, zero = x0_pred[:3].detach(), x_next[:3], torch.zeros(3, dtype=torch.long)
    at_zero = schedule.posterior_sample(x0_few, x_next_few, zero, gen(1))
    mean_at_zero, _, _ = schedule.posterior_mean_variance(x0_few, x_next_few, zero)
    assert torch.equal(at_zero, mean_at_zero)
    assert torch.allclose(at_zero, torch.full((3, 1), 0.8))  # the step to level 0 returns x0'


# --------------------------------------------------------------------------- real pairs


def test_q_sample_pairs_marginals_and_covariance_match_the_schedule() -> None:
    schedule = DDGANSchedule(num_steps=4)
    relative_acp, betas = _chain(4)
    level_acp = (1 - 1e-8) * relative_acp
    x0 = torch.full((4, 100_000), 0.7)
    t = torch.arange(4)
    x_t, x_next = schedule.q_sample_pairs(x0, t, gen(0))
    for k in range(4):
        for level, samples in ((k, x_t[k]), (k + 1, x_next[k])):
            assert samples.mean().item() == pytest.approx(np.sqrt(level_acp[level]) * 0.7, abs=0.01)
            assert samples.std().item() == pytest.approx(np.sqrt(1 - level_acp[level]), abs=0.01)
        # x_{k+1} = sqrt(1 - beta_{k+1}) x_k + noise: cov = sqrt(1 - beta_{k+1}) var(x_k)
        covariance = ((x_t[k] - x_t[k].mean()) * (x_next[k] - x_next[k].mean())).mean().item()
        assert covariance == pytest.approx(np.sqrt(1 - betas[k]) * (1 - level_acp[k]), abs=0.01)


# --------------------------------------------------------------------------- sampler


def test_sampler_with_an_oracle_generator_returns_the_point_mass() -> None:
    schedule = DDGANSchedule(num_steps=4)
    point = 1.5
    batch, latent_dim = 20_000, 3
    labels = torch.arange(batch) % 7
    seen: list[tuple[int, torch.Tensor]] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert z.shape == (batch, latent_dim) and y is labels
        seen.append((int(t[0]), x_t.clone()))
        return torch.full_like(x_t, point)

    out = schedule.sample(oracle, (batch, 1), labels, gen(0), latent_dim)
    assert torch.allclose(out, torch.full((batch, 1), point), atol=1e-6)
    assert [step for step, _ in seen] == [3, 2, 1, 0]
    # The input labelled k sits at level k + 1 (DDGAN's convention) and has q(x_{k+1} | x0)'s law.
    relative_acp, _ = _chain(4)
    for step, x in seen[1:]:
        assert x.mean().item() == pytest.approx(np.sqrt(relative_acp[step + 1]) * point, abs=0.03)
        assert x.std().item() == pytest.approx(np.sqrt(1 - relative_acp[step + 1]), abs=0.03)


def test_sampler_randomness_comes_from_the_generator() -> None:
    schedule = DDGANSchedule(num_steps=2)

    def generator_fn(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor:
        return 0.5 * x + z[:, :1]

    first = schedule.sample(generator_fn, (5, 1), None, gen(3), 2)
    torch.manual_seed(999)  # the global RNG must not matter
    assert torch.equal(first, schedule.sample(generator_fn, (5, 1), None, gen(3), 2))
    assert not torch.equal(first, schedule.sample(generator_fn, (5, 1), None, gen(4), 2))


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        DDGANSchedule(num_steps=0)
    schedule = DDGANSchedule()
    with pytest.raises(ValueError, match="t has shape \\(2,\\), expected \\(3,\\)"):
        schedule.q_sample_pairs(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), gen(0))
    with pytest.raises(ValueError, match="labels has shape"):
        schedule.sample(lambda x, t, z, y: x, (3, 2), torch.zeros(2, dtype=torch.long), gen(0), 4)
