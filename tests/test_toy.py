"""The 25-Gaussians benchmark: data, metric, reproducibility and the ``advdit toy`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from advdit.launchers.cli import main
from advdit.trainer.benchmarks import toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- metric


def test_samples_at_every_centre_cover_all_modes_with_full_quality() -> None:
    stats = toy.mode_stats(toy.mode_centres().repeat(4, 1))
    assert stats["modes_covered"] == 25
    assert stats["high_quality_fraction"] == 1.0
    assert stats["mode_counts"] == [4] * 25
    assert stats["reverse_kl"] == pytest.approx(0.0, abs=1e-12)


def test_points_between_modes_are_not_high_quality() -> None:
    # Midpoints between neighbouring centres and cell centres: at least 1 away from any centre.
    between = torch.tensor([[1.0, 0.0], [-3.0, 2.0], [1.0, 1.0], [3.0, -3.0], [0.0, -1.0]])
    stats = toy.mode_stats(between)
    assert stats["high_quality_fraction"] == 0.0
    assert stats["modes_covered"] == 0
    assert math.isnan(stats["reverse_kl"])


def test_samples_on_three_modes_cover_three() -> None:
    centres = torch.tensor([[-4.0, -4.0], [0.0, 2.0], [4.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    samples = centres.repeat_interleave(100, dim=0) + 0.02 * torch.randn(300, 2, generator=generator)
    stats = toy.mode_stats(samples)
    assert stats["modes_covered"] == 3
    assert stats["high_quality_fraction"] == 1.0
    assert stats["reverse_kl"] == pytest.approx(math.log(25 / 3))


def test_high_quality_radius_is_three_standard_deviations() -> None:
    inside = torch.tensor([[2.0 + 0.99 * toy.HQ_RADIUS, 0.0]])
    outside = torch.tensor([[2.0, 1.01 * toy.HQ_RADIUS]])
    assert toy.HQ_RADIUS == pytest.approx(0.15)
    assert toy.mode_stats(inside)["high_quality_fraction"] == 1.0
    assert toy.mode_stats(outside)["high_quality_fraction"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        toy.mode_stats(torch.zeros(4, 3))


# --------------------------------------------------------------------------- data


def test_data_moments_and_modes() -> None:
    x = toy.sample_data(100_000, torch.Generator().manual_seed(1)).double()
    # Per axis: a uniform choice of {-4, -2, 0, 2, 4} (variance 8) plus N(0, 0.05^2).
    assert x.mean(dim=0).abs().max() < 0.05
    assert torch.allclose(x.var(dim=0), torch.full((2,), 8.0025, dtype=torch.float64), rtol=0.02)
    residual = x - 2 * torch.round(x / 2)
    assert torch.allclose(residual.std(dim=0), torch.full((2,), 0.05, dtype=torch.float64), rtol=0.02)
    stats = toy.mode_stats(x)
    assert stats["modes_covered"] == 25
    # P(|N(0, s^2 I_2)| <= 3 s) = 1 - exp(-9 / 2) for a 2-D Gaussian.
    assert stats["high_quality_fraction"] == pytest.approx(1 - math.exp(-4.5), abs=0.002)
    counts = np.array(stats["mode_counts"])
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("method", toy.METHODS)
def test_same_seed_gives_identical_samples(method: str, tmp_path: Path) -> None:
    short = {"iterations": 3, "batch_size": 32}
    first = toy.run_toy(method, tmp_path / "a", short, seed=5, progress=False)
    again = toy.run_toy(method, tmp_path / "b", short, seed=5, progress=False)
    other = toy.run_toy(method, tmp_path / "c", short, seed=6, progress=False)
    samples = [np.load(tmp_path / run / f"samples_{method}.npy") for run in ("a", "b", "c")]
    np.testing.assert_array_equal(samples[0], samples[1])
    assert not np.array_equal(samples[0], samples[2])
    assert first["mode_counts"] == again["mode_counts"]
    assert first["final"] == again["final"] and first["final"] != other["final"]


@pytest.mark.parametrize("method", toy.METHODS)
def test_command_writes_samples_figure_and_result(method: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--method", method, "--iterations", "20", "--batch-size", "64",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    result = json.loads((tmp_path / f"result_{method}.json").read_text())
    assert line.startswith(f"{method}: {result['modes_covered']}/25 modes")

    samples = np.load(tmp_path / f"samples_{method}.npy")
    assert samples.shape == (toy.NUM_EVAL_SAMPLES, 2) and np.isfinite(samples).all()
    assert result["method"] == method and result["iterations"] == 20
    assert result["settings"]["batch_size"] == 64 and result["seconds"] > 0
    # The json's numbers are those of the saved samples.
    stats = toy.mode_stats(samples)
    assert result["modes_covered"] == stats["modes_covered"]
    assert result["high_quality_percent"] == pytest.approx(100 * stats["high_quality_fraction"])
    assert sum(result["mode_counts"]) == round(result["high_quality_percent"] / 100 * len(samples))
    assert set(result["final"]) >= {"loss_d", "loss_g"}
    assert all(math.isfinite(v) for v in result["final"].values())

    figure = (tmp_path / f"{method}.png").read_bytes()
    assert figure.startswith(PNG_MAGIC) and 5_000 < len(figure) < 500_000
    if method == "diffusion_gan":
        settings = result["settings"]
        assert settings["t_min"] <= result["final_T"] <= settings["t_max"]
        assert 0.0 <= result["final_p"] <= 1.0
    else:
        assert "final_T" not in result


def test_all_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--method", "all", "--iterations", "2", "--batch-size", "16",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| method | modes covered | HQ % | iterations | seconds |" in out
    for method in toy.METHODS:
        assert f"| {method} | " in out
        assert (tmp_path / f"result_{method}.json").exists()


def test_unknown_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        toy.run_toy("wgan", tmp_path)
    with pytest.raises(SystemExit):
        main(["toy", "--method", "wgan"])


def test_set_changes_settings_and_bad_settings_are_named(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--method", "gan", "--iterations", "2", "--batch-size", "8", "--out", str(tmp_path),
                 "--no-progress", "--set", "lr_g=1e-4", "beta1=0.5", "hidden=16"]) == 0
    settings = json.loads((tmp_path / "result_gan.json").read_text())["settings"]
    assert settings["lr_g"] == 1e-4 and settings["beta1"] == 0.5 and settings["hidden"] == 16
    assert settings["lr_d"] == toy.DEFAULTS["gan"].lr_d
    capsys.readouterr()
    assert main(["toy", "--method", "gan", "--set", "learning_rate=1e-4", "--out", str(tmp_path)]) == 2
    assert "unknown config key 'learning_rate'; valid keys: ada_kimg," in capsys.readouterr().err
    with pytest.raises(ValueError, match="'hidden' expects int, got float 1.5"):
        toy.toy_settings("gan", {"hidden": 1.5})
    assert main(["toy", "--set", "lr_g", "--out", str(tmp_path)]) == 2
    assert "--set expects KEY=VALUE, got 'lr_g'" in capsys.readouterr().err
    assert toy.toy_settings("ddgan", {"lr_g": 1}).lr_g == 1.0
    # The config's own checks: types (ints taken for floats), finite values, each section's rules.
    assert toy.toy_settings("gan", ["lr_g=3e-4", "time_encoding=sinusoidal"]).lr_g == 3e-4
    with pytest.raises(ValueError, match="'lr_d' .*nan"):
        toy.toy_settings("gan", {"lr_d": float("nan")})
    with pytest.raises(ValueError, match="'iterations' must be positive"):
        toy.toy_settings("gan", {"iterations": 0})
