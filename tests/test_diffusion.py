"""Closed-form checks of the Gaussian diffusion process, its losses and its samplers."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from advdit.models.diffusion import (
    BatchDraws,
    GaussianDiffusion,
    build_diffusion,
    cfg_model_fn,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    normal_kl,
    rand,
    randint,
    randn,
    space_timesteps,
)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return build_diffusion(learn_sigma=True)


def _t(*steps: int) -> torch.Tensor:
    return torch.tensor(steps, dtype=torch.long)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- schedule


def test_linear_schedule_endpoints_and_monotonic() -> None:
    betas = linear_beta_schedule()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)


def test_linear_schedule_scales_endpoints_for_other_lengths() -> None:
    betas = linear_beta_schedule(250)
    assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)
    # The point of the scaling: the signal is destroyed about as much as with 1000 steps.
    acp_250 = np.prod(1 - betas)
    acp_1000 = np.prod(1 - linear_beta_schedule(1000))
    assert acp_250 < 1e-3 and acp_1000 < 1e-3


def test_constants_against_closed_forms(diffusion: GaussianDiffusion) -> None:
    betas = linear_beta_schedule()
    acp = np.array([np.prod(1 - betas[: i + 1]) for i in range(0, 1000, 97)])
    np.testing.assert_allclose(diffusion.alphas_cumprod[::97], acp, rtol=1e-12)
    assert diffusion.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev[1:], diffusion.alphas_cumprod[:-1])
    np.testing.assert_allclose(
        diffusion.sqrt_recipm1_alphas_cumprod**2,
        (1 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod,
    )


# --------------------------------------------------------------------------- forward process


def test_q_sample_exact_for_given_noise(diffusion: GaussianDiffusion) -> None:
    x0 = torch.randn(3, 2, 4, 4, generator=_gen(1), dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=_gen(2), dtype=torch.float64)
    t = _t(0, 500, 999)
    acp = diffusion.alphas_cumprod[[0, 500, 999]]
    expected = [math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i] for i, a in enumerate(acp)]
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), torch.stack(expected))


def test_q_sample_empirical_moments(diffusion: GaussianDiffusion) -> None:
    n, step = 200_000, 300
    x0 = torch.full((n, 1), 0.7)
    noise = torch.randn(n, 1, generator=_gen(3))
    x_t = diffusion.q_sample(x0, torch.full((n,), step), noise)
    acp = diffusion.alphas_cumprod[step]
    assert x_t.mean().item() == pytest.approx(math.sqrt(acp) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - acp, rel=0.02)
    mean, var, log_var = diffusion.q_mean_variance(x0[:2], torch.full((2,), step))
    torch.testing.assert_close(mean, torch.full((2, 1), math.sqrt(acp) * 0.7))
    torch.testing.assert_close(var, torch.full((2, 1), 1 - acp))
    torch.testing.assert_close(log_var, torch.full((2, 1), math.log(1 - acp)))


def test_extract_casts_to_input_dtype(diffusion: GaussianDiffusion) -> None:
    x = torch.ones(2, 3, dtype=torch.float16)
    out = diffusion.q_sample(x, _t(1, 2), torch.zeros_like(x))
    assert out.dtype == torch.float16


# --------------------------------------------------------------------------- posterior


def test_posterior_matches_closed_form(diffusion: GaussianDiffusion) -> None:
    betas = linear_beta_schedule()
    steps = [1, 2, 10, 500, 999]
    x0 = torch.randn(len(steps), 3, generator=_gen(4), dtype=torch.float64)
    x_t = torch.randn(len(steps), 3, generator=_gen(5), dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, torch.tensor(steps))
    for i, t in enumerate(steps):
        acp_t, acp_prev = np.prod(1 - betas[: t + 1]), np.prod(1 - betas[:t])
        expected_var = betas[t] * (1 - acp_prev) / (1 - acp_t)
        coef_x0 = math.sqrt(acp_prev) * betas[t] / (1 - acp_t)
        coef_xt = math.sqrt(1 - betas[t]) * (1 - acp_prev) / (1 - acp_t)
        torch.testing.assert_close(mean[i], coef_x0 * x0[i] + coef_xt * x_t[i])
        torch.testing.assert_close(var[i], torch.full((3,), expected_var, dtype=torch.float64))
        torch.testing.assert_close(
            log_var[i], torch.full((3,), math.log(expected_var), dtype=torch.float64)
        )


def test_posterior_is_bayes_rule_on_scalar_gaussians(diffusion: GaussianDiffusion) -> None:
    # q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) * q(x_{t-1} | x_0); for Gaussians
    # the precisions add and the mean is the precision-weighted mean of the two.
    betas = linear_beta_schedule()
    x0, x_t = 0.4, -1.3
    for t in (1, 37, 600, 999):
        acp_prev = np.prod(1 - betas[:t])
        prior_mean, prior_var = math.sqrt(acp_prev) * x0, 1 - acp_prev
        # As a function of x_{t-1}: N(x_t; sqrt(a) x_{t-1}, beta) = N(x_{t-1}; x_t / sqrt(a), beta / a).
        lik_mean, lik_var = x_t / math.sqrt(1 - betas[t]), betas[t] / (1 - betas[t])
        post_var = 1 / (1 / prior_var + 1 / lik_var)
        post_mean = post_var * (prior_mean / prior_var + lik_mean / lik_var)
        mean, var, _ = diffusion.q_posterior_mean_variance(
            torch.tensor([[x0]], dtype=torch.float64),
            torch.tensor([[x_t]], dtype=torch.float64),
            _t(t),
        )
        assert mean.item() == pytest.approx(post_mean, rel=1e-9)
        assert var.item() == pytest.approx(post_var, rel=1e-9)


def test_posterior_at_step_zero_is_x0_with_clipped_log_variance(
    diffusion: GaussianDiffusion,
) -> None:
    x0 = torch.tensor([[0.25]], dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(
        x0, torch.tensor([[3.0]], dtype=torch.float64), _t(0)
    )
    assert mean.item() == pytest.approx(0.25, abs=1e-12)
    assert var.item() == 0.0
    assert log_var.item() == pytest.approx(math.log(diffusion.posterior_variance[1]))


def test_xstart_eps_round_trip(diffusion: GaussianDiffusion) -> None:
    x0 = torch.randn(4, 3, 2, 2, generator=_gen(6), dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 2, generator=_gen(7), dtype=torch.float64)
    t = _t(0, 1, 400, 999)
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, eps), x0)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x0), eps)


# --------------------------------------------------------------------------- distributions


def test_normal_kl_matches_numerical_integral() -> None:
    m1, s1, m2, s2 = 0.3, 0.7, -0.5, 1.6
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    numeric, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -20, 20)
    kl = normal_kl(torch.tensor(m1, dtype=torch.float64), 2 * math.log(s1), m2, 2 * math.log(s2))
    assert kl.item() == pytest.approx(numeric, rel=1e-8)


def test_normal_kl_zero_for_identical_and_positive_otherwise() -> None:
    mean = torch.randn(10, generator=_gen(8))
    logvar = torch.randn(10, generator=_gen(9))
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(10))
    assert (normal_kl(mean, logvar, mean + 0.1, logvar) > 0).all()
    assert (normal_kl(mean, logvar, mean, logvar + 0.1) > 0).all()


def test_discretized_likelihood_sums_to_one_over_bins() -> None:
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.95, math.log(0.01)), (0.0, math.log(3.0))):
        log_p = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_bin_masses_match_scipy() -> None:
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 1 - 2 / 255, 1.0], dtype=torch.float64)
    mean, std = 0.6, 0.3
    log_p = discretized_gaussian_log_likelihood(
        x, torch.full_like(x, mean), torch.full_like(x, math.log(std))
    )
    dist = stats.norm(mean, std)
    h = 1 / 255
    expected = [dist.logcdf(-1 + h)]
    expected += [math.log(dist.cdf(v + h) - dist.cdf(v - h)) for v in x[1:-1].tolist()]
    expected += [dist.logsf(1 - h)]
    np.testing.assert_allclose(log_p.numpy(), expected, rtol=1e-6)


def test_discretized_likelihood_floors_interior_bins_but_not_edges() -> None:
    # Interior bins are floored at probability 1e-12 (as in ADM) to bound the loss; the edge
    # bins use the exact log-CDF, which stays accurate far into the tail.
    x = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        x, torch.ones_like(x), torch.full_like(x, math.log(0.05))
    )
    assert log_p[1].item() == pytest.approx(math.log(1e-12))
    assert log_p[0].item() == pytest.approx(stats.norm(1.0, 0.05).logcdf(-1 + 1 / 255), rel=1e-9)


# --------------------------------------------------------------------------- spacing / respacing


def test_space_timesteps_ddim() -> None:
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    assert space_timesteps(10, "ddim4") == [0, 3, 6, 9]


def test_space_timesteps_int_and_sections() -> None:
    assert space_timesteps(10, 4) == [0, 3, 6, 9]
    assert space_timesteps(10, "4") == [0, 3, 6, 9]
    assert space_timesteps(1000, 1000) == list(range(1000))
    kept = space_timesteps(100, "10,15")
    assert kept[:10] == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]
    assert len(kept) == 25 and kept[10] == 50 and kept[-1] == 99
    assert all(50 <= k < 100 for k in kept[10:])


@pytest.mark.parametrize(
    ("spacing", "match"),
    [
        ("ddim600", "ddim600"),
        ("ddimx", "ddimx"),
        ("ddim0", "ddim0"),
        ("abc", "abc"),
        ("10,x", "10,x"),
        (0, "0"),
        (2000, "cannot keep 2000"),
        ("600,600", "cannot keep 600"),
    ],
)
def test_space_timesteps_rejects_bad_input(spacing: str | int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        space_timesteps(1000, spacing)


def test_space_timesteps_error_names_expected_forms() -> None:
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(1000, "fast")
    with pytest.raises(TypeError):
        space_timesteps(1000, 2.5)  # type: ignore[arg-type]


def test_respaced_keeps_alphas_cumprod_and_maps_timesteps(diffusion: GaussianDiffusion) -> None:
    respaced = build_diffusion(respacing="ddim50")
    kept = np.arange(0, 1000, 20)
    assert respaced.num_timesteps == 50
    np.testing.assert_array_equal(respaced.timestep_map, kept)
    np.testing.assert_allclose(respaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12)
    assert respaced.betas[0] == pytest.approx(diffusion.betas[0])
    mapped = respaced.model_timesteps(_t(0, 1, 49))
    assert mapped.tolist() == [0, 20, 980] and mapped.dtype == torch.long


def test_respacing_composes_and_full_respacing_is_identity(diffusion: GaussianDiffusion) -> None:
    twice = diffusion.respaced(100).respaced("ddim10")
    once = diffusion.respaced(100)
    np.testing.assert_array_equal(twice.timestep_map, once.timestep_map[np.arange(0, 100, 10)])
    np.testing.assert_allclose(
        twice.alphas_cumprod, diffusion.alphas_cumprod[twice.timestep_map], rtol=1e-12
    )
    full = build_diffusion(respacing=1000)
    np.testing.assert_allclose(full.betas, diffusion.betas, rtol=1e-10)
    assert build_diffusion(respacing="").num_timesteps == 1000


# --------------------------------------------------------------------------- model output


def test_p_mean_variance_learned_range_endpoints(diffusion: GaussianDiffusion) -> None:
    x_t = torch.randn(3, 2, 4, dtype=torch.float64, generator=_gen(10))
    eps = torch.randn(3, 2, 4, dtype=torch.float64, generator=_gen(11))
    t = _t(0, 10, 999)
    small, large = diffusion.posterior_log_variance_clipped, np.log(diffusion.betas)
    for v, table in ((-1.0, small), (1.0, large), (0.0, (small + large) / 2)):
        out = diffusion.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], 1), x_t, t)
        expected = torch.tensor(table[[0, 10, 999]]).view(3, 1, 1).expand_as(x_t)
        torch.testing.assert_close(out["log_variance"], expected)
        torch.testing.assert_close(out["variance"], expected.exp())
    torch.testing.assert_close(out["pred_xstart"], diffusion.predict_xstart_from_eps(x_t, t, eps))
    mean, _, _ = diffusion.q_posterior_mean_variance(out["pred_xstart"], x_t, t)
    torch.testing.assert_close(out["mean"], mean)


def test_p_mean_variance_fixed_small_and_channel_check() -> None:
    fixed = build_diffusion(learn_sigma=False)
    x_t = torch.randn(2, 3, dtype=torch.float64, generator=_gen(12))
    out = fixed.p_mean_variance(torch.zeros_like(x_t), x_t, _t(5, 700))
    expected = torch.tensor(fixed.posterior_variance[[5, 700]]).view(2, 1).expand_as(x_t)
    torch.testing.assert_close(out["variance"], expected)
    with pytest.raises(ValueError, match="channels"):
        fixed.p_mean_variance(torch.zeros(2, 6, dtype=torch.float64), x_t, _t(5, 700))


def test_clip_denoised_keeps_eps_consistent(diffusion: GaussianDiffusion) -> None:
    x_t = torch.full((1, 1), 5.0, dtype=torch.float64)
    t = _t(100)
    out = diffusion.p_mean_variance(
        torch.tensor([[-3.0, 0.0]], dtype=torch.float64), x_t, t, clip_denoised=True
    )
    assert out["pred_xstart"].item() == 1.0
    torch.testing.assert_close(
        diffusion.predict_xstart_from_eps(x_t, t, out["eps"]), out["pred_xstart"]
    )


# --------------------------------------------------------------------------- training loss


def _fixed_output_model(output: torch.Tensor, seen: list[torch.Tensor] | None = None):
    def model_fn(x_t: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        if seen is not None:
            seen.append(t.clone())
        return output * 1.0  # a non-leaf, like a real network's output

    return model_fn


def test_training_losses_mse_and_vb_gradients(diffusion: GaussianDiffusion) -> None:
    b, c = 4, 3
    x0 = torch.rand(b, c, 4, 4, generator=_gen(13)) * 2 - 1
    noise = torch.randn(b, c, 4, 4, generator=_gen(14))
    output = torch.randn(b, 2 * c, 4, 4, generator=_gen(15)).clamp(-1, 1).requires_grad_()
    t = _t(0, 1, 300, 999)
    losses = diffusion.training_losses(_fixed_output_model(output), x0, t, noise)
    assert all(losses[k].shape == (b,) for k in ("loss", "mse", "vb"))
    expected_mse = ((noise - output[:, :c].detach()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], expected_mse)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    (vb_grad,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.count_nonzero(vb_grad[:, :c]) == 0
    assert (vb_grad[:, c:].abs().sum(dim=(1, 2, 3)) > 0).all()
    (mse_grad,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert torch.count_nonzero(mse_grad[:, c:]) == 0
    assert torch.count_nonzero(mse_grad[:, :c]) > 0


def test_vb_is_zero_for_the_true_posterior(diffusion: GaussianDiffusion) -> None:
    # True eps gives pred_xstart == x0, so the model mean is the true posterior mean, and v = -1
    # selects the true posterior log variance: the KL must vanish, and the MSE too.
    x0 = torch.rand(3, 2, 4, generator=_gen(16), dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, generator=_gen(17), dtype=torch.float64)
    output = torch.cat([noise, -torch.ones_like(noise)], 1)
    losses = diffusion.training_losses(_fixed_output_model(output), x0, _t(1, 250, 999), noise)
    torch.testing.assert_close(losses["vb"], torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(losses["mse"], torch.zeros(3, dtype=torch.float64))


def test_vb_at_step_zero_is_decoder_nll_in_bits(diffusion: GaussianDiffusion) -> None:
    x0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, -0.2, 0.1]], dtype=torch.float64)
    output = torch.cat([noise, torch.zeros_like(noise)], 1)  # v = 0: middle of the range
    vb = diffusion.training_losses(_fixed_output_model(output), x0, _t(0), noise)["vb"]
    # The model mean at t = 0 is x0 exactly (true eps); its std is sqrt(exp(log var)).
    std = math.exp(
        0.25 * (diffusion.posterior_log_variance_clipped[0] + math.log(diffusion.betas[0]))
    )
    dist, h = stats.norm(0.0, std), 1 / 255
    nll = -(dist.logcdf(h) + math.log(dist.cdf(h) - dist.cdf(-h)) + dist.logsf(-h))
    assert vb.item() == pytest.approx(nll / 3 / math.log(2), rel=1e-6)


def test_training_losses_without_learned_sigma_and_respaced_timesteps() -> None:
    respaced = build_diffusion(learn_sigma=False, respacing="ddim50")
    x0 = torch.zeros(2, 1, 3)
    noise = torch.ones(2, 1, 3)
    seen: list[torch.Tensor] = []
    losses = respaced.training_losses(
        _fixed_output_model(torch.zeros(2, 1, 3), seen), x0, _t(1, 49), noise
    )
    assert seen[0].tolist() == [20, 980]  # the model gets original timesteps
    torch.testing.assert_close(losses["vb"], torch.zeros(2))
    torch.testing.assert_close(losses["loss"], torch.ones(2))


# --------------------------------------------------------------------------- samplers


def _point_mass_model(base: GaussianDiffusion, x_star: torch.Tensor, learn_sigma: bool):
    """The exact eps for data concentrated on x_star, indexed by the *original* timestep."""
    acp_table = torch.tensor(base.alphas_cumprod, dtype=torch.float32)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        acp = acp_table[t].view(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t - acp.sqrt() * x_star) / (1 - acp).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_point_mass(sampler: str) -> None:
    base = build_diffusion()
    respaced = build_diffusion(respacing="ddim50" if sampler == "ddim" else 50)
    x_star = torch.tensor([0.5, -0.25, 0.9]).view(1, 3, 1, 1)
    model_fn = _point_mass_model(base, x_star, learn_sigma=True)
    loop = respaced.ddim_sample_loop if sampler == "ddim" else respaced.p_sample_loop
    sample = loop(model_fn, (8, 3, 2, 2), generator=_gen(18))
    torch.testing.assert_close(sample, x_star.expand(8, 3, 2, 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_respaced_samplers_match_gaussian_data(sampler: str) -> None:
    # Data N(mu, s^2): the exact eps is sqrt(1 - acp) (x_t - sqrt(acp) mu) / (acp s^2 + 1 - acp).
    # Unlike the point mass, this needs every step to use the right original timestep.
    base = build_diffusion(learn_sigma=False)
    respaced = build_diffusion(learn_sigma=False, respacing=50)
    mu, s = 0.3, 0.5
    acp_table = torch.tensor(base.alphas_cumprod, dtype=torch.float32)
    seen: list[torch.Tensor] = []

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t[0].clone())
        acp = acp_table[t].view(-1, 1)
        return (1 - acp).sqrt() * (x_t - acp.sqrt() * mu) / (acp * s**2 + 1 - acp)

    loop = respaced.ddim_sample_loop if sampler == "ddim" else respaced.p_sample_loop
    sample = loop(model_fn, (20_000, 1), generator=_gen(19))
    assert [int(t) for t in seen] == respaced.timestep_map[::-1].tolist()
    assert sample.mean().item() == pytest.approx(mu, abs=0.02)
    # 50 steps with fixed-small variance under-disperse a little (about 0.45 for DDPM).
    assert sample.std().item() == pytest.approx(s, abs=0.07)


def test_ddim_eta_one_equals_ddpm_with_fixed_small_variance() -> None:
    respaced = build_diffusion(learn_sigma=False, respacing=20)
    x_star = torch.tensor([0.2, -0.6]).view(1, 2)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x_t - x_star  # any deterministic model will do

    ddpm = respaced.p_sample_loop(model_fn, (16, 2), generator=_gen(20))
    ddim = respaced.ddim_sample_loop(model_fn, (16, 2), generator=_gen(20), eta=1.0)
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_reproducible_from_generator(sampler: str) -> None:
    respaced = build_diffusion(respacing=10)
    model_fn = _point_mass_model(build_diffusion(), torch.zeros(1, 2, 1), learn_sigma=True)

    def run(seed: int) -> torch.Tensor:
        def scrambled(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model_fn(x_t, t) * 0.5  # wrong eps: keeps the samples noise-dependent

        if sampler == "ddim":
            return respaced.ddim_sample_loop(scrambled, (4, 2, 3), generator=_gen(seed), eta=0.5)
        return respaced.p_sample_loop(scrambled, (4, 2, 3), generator=_gen(seed))

    torch.testing.assert_close(run(21), run(21), atol=0, rtol=0)
    assert not torch.allclose(run(21), run(22))


def test_sampler_uses_given_noise() -> None:
    respaced = build_diffusion(learn_sigma=False, respacing=5)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t * 0.1

    noise = torch.randn(3, 2, generator=_gen(23))
    a = respaced.ddim_sample_loop(model_fn, (3, 2), noise=noise)
    b = respaced.ddim_sample_loop(model_fn, (3, 2), noise=noise.clone())
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        respaced.ddim_sample_loop(model_fn, (4, 2), noise=noise)


# --------------------------------------------------------------------------- guidance


def _label_model(calls: list[tuple[torch.Tensor, torch.Tensor]]):
    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((x.clone(), y.clone()))
        label = y.to(x.dtype).view(-1, 1, 1)
        return torch.cat([x * label + 1.0, x - label], dim=1)  # eps: 2 ch, variance: 2 ch

    return model_fn


def test_cfg_scale_one_is_the_model_itself() -> None:
    model_fn = _label_model([])
    assert cfg_model_fn(model_fn, 1.0, null_class=10, channels=2) is model_fn


def test_cfg_guides_eps_and_keeps_conditional_variance() -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    model_fn = _label_model(calls)
    x = torch.randn(3, 2, 5, generator=_gen(24))
    t = _t(4, 5, 6)
    y = torch.tensor([1, 2, 3])
    scale, null = 4.0, 10
    guided = cfg_model_fn(model_fn, scale, null_class=null, channels=2)(x, t, y=y)

    assert len(calls) == 1  # one doubled forward pass
    torch.testing.assert_close(calls[0][0], torch.cat([x, x]))
    assert calls[0][1].tolist() == [1, 2, 3, null, null, null]
    label = y.float().view(-1, 1, 1)
    eps_cond, eps_uncond = x * label + 1.0, x * null + 1.0
    torch.testing.assert_close(guided[:, :2], eps_uncond + scale * (eps_cond - eps_uncond))
    torch.testing.assert_close(guided[:, 2:], x - label)


def _official_forward_with_cfg(model_fn: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                               y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The official DiT's forward_with_cfg, written out: x holds the batch twice, its first half
    conditional; only the first three eps channels are guided, the rest comes from each half."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half])
    model_out = model_fn(combined, t, y=y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def test_cfg_on_three_of_four_channels_is_the_official_dit_guidance() -> None:
    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        label = y.to(x.dtype).view(-1, 1, 1)
        return torch.cat([x * label + 1.0, x - label], dim=1)  # eps: 4 ch, variance: 4 ch

    x = torch.randn(3, 4, 5, generator=_gen(25))
    t, y, null, scale = _t(4, 5, 6), torch.tensor([1, 2, 3]), 10, 4.0
    ours = cfg_model_fn(model_fn, scale, null_class=null, channels=4, guided_channels=3)(x, t, y=y)
    official = _official_forward_with_cfg(model_fn, torch.cat([x, x]), torch.cat([t, t]),
                                          torch.cat([y, torch.full_like(y, null)]), scale)
    torch.testing.assert_close(ours, official[:3])
    everything = cfg_model_fn(model_fn, scale, null_class=null, channels=4)(x, t, y=y)
    assert not torch.allclose(everything[:, 3], ours[:, 3])  # the fourth channel: guided only with all
    torch.testing.assert_close(everything[:, :3], ours[:, :3])
    with pytest.raises(ValueError, match=r"guided_channels must be in \[1, 4\]"):
        cfg_model_fn(model_fn, scale, null_class=null, channels=4, guided_channels=5)


def test_batch_draws_give_a_sample_the_same_values_however_the_batch_is_split() -> None:
    """A global batch of 8 drawn by 1 process, by 2 (4 rows each) or by 4 (2 rows each): the same
    values in the same rows, for every kind of draw, so a resumed run on another number of
    processes draws what the uninterrupted run drew."""
    def split(processes: int) -> list[torch.Tensor]:
        rows = 8 // processes
        parts = []
        for rank in range(processes):
            draws = BatchDraws(torch.Generator().manual_seed(11), rank * rows, 8)
            parts.append(torch.cat([randn((rows, 3, 2), draws).flatten(1), rand(rows, draws)[:, None],
                                    randint(1000, rows, draws)[:, None].float()], dim=1))
        return torch.cat(parts)
    whole = split(1)
    assert torch.equal(split(2), whole) and torch.equal(split(4), whole)
    assert len(whole.unique()) > 40  # rows differ: each row's values are its own
    with pytest.raises(ValueError, match="rows 6..10 asked of a global batch of 8"):
        randn((4, 3), BatchDraws(torch.Generator(), 6, 8))
