"""``advdit quality``: every method trained for the same wall-clock budget on the digits, each
seed scored by the digits evaluator and logged to MLflow, a summary over the seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from advdit.launchers.cli import main
from advdit.trainer.benchmarks.quality import QualityPlan, samplers_of
from advdit.trainer.config import ConfigError

# A tiny denoiser and adversary: the benchmark's plumbing, not its numbers.
TINY = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.num_workers=0",
        "ddgan:disc.base_channels=16", "ddgan:disc.num_blocks=1"]


def quality_args(out: Path, digits_dir: Path, classifier: Path, *extra: str) -> list[str]:
    return ["quality", "--budget-minutes", "0.04", "--seeds", "2", "--methods", "dit", "ddgan",
            "--samples", "20", "--data", str(digits_dir), "--classifier", str(classifier),
            "--out", str(out), "--no-progress", *TINY, *extra]


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, classifier: Path,
              mlflow_server: str) -> Path:
    out = tmp_path_factory.mktemp("quality")
    assert main(quality_args(out, digits_dir, classifier, f"tracking.uri={mlflow_server}")) == 0
    return out


def test_every_run_stops_at_the_budget_and_is_scored_by_each_sampler(benchmark: Path) -> None:
    for method, samplers in (("dit", {"ddpm250", "ddim25"}), ("ddgan", {"ddgan"})):
        for seed in (0, 1):
            run = benchmark / method / f"seed_{seed}"
            record = json.loads((run / "quality.json").read_text())
            assert (record["method"], record["seed"]) == (method, seed)
            assert set(record["scores"]) == samplers
            # Stopped by the 2.4 s budget, far before train.steps, with a checkpoint of that step.
            assert 1 <= record["steps"] < 1000
            assert (run / "checkpoints" / f"step_{record['steps']:08d}").is_dir()
            for name, scores in record["scores"].items():
                assert scores["fid"] > 0 and 0 <= scores["class_consistency"] <= 1, (method, name)
                assert (run / f"samples_{name}.png").is_file()


def test_the_summary_spreads_each_metric_over_the_seeds(benchmark: Path) -> None:
    summary = json.loads((benchmark / "summary.json").read_text())
    assert list(summary) == ["dit/ddpm250", "dit/ddim25", "ddgan/ddgan"]
    records = [json.loads((benchmark / "dit" / f"seed_{seed}" / "quality.json").read_text())
               for seed in (0, 1)]
    fids = [r["scores"]["ddim25"]["fid"] for r in records]
    row = summary["dit/ddim25"]
    assert row["seeds"] == [0, 1]
    assert row["fid"]["mean"] == pytest.approx(np.mean(fids))
    assert row["fid"]["std"] == pytest.approx(np.std(fids, ddof=1))
    assert row["fid"]["min"] == min(fids)
    table = (benchmark / "summary.md").read_text()
    steps = np.mean([r["steps"] for r in records])
    assert f"| dit | ddim25 | 2 | {steps:.0f} | {np.mean(fids):.1f} ±" in table
    assert (benchmark / "summary.png").stat().st_size > 0
    # The adversary's last statistics, averaged over the seeds' last logged rows.
    logs = [(benchmark / "ddgan" / f"seed_{seed}" / "metrics.jsonl").read_text() for seed in (0, 1)]
    d_real = [json.loads(log.splitlines()[-1])["d_real"] for log in logs]
    assert summary["ddgan/ddgan"]["game"]["d_real"] == pytest.approx(np.mean(d_real))
    assert "d_real" not in summary["dit/ddim25"]["game"]


def test_the_scores_are_logged_to_each_runs_mlflow_run(benchmark: Path, mlflow_server: str) -> None:
    record = json.loads((benchmark / "ddgan" / "seed_1" / "quality.json").read_text())
    # A client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for every
    # later test and the processes they start.
    run = MlflowClient(mlflow_server).get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["quality/ddgan/fid"] == pytest.approx(record["scores"]["ddgan"]["fid"])
    assert run.data.params["objective"] == "ddgan"


def test_a_second_call_keeps_the_scored_runs_and_only_summarizes(
        benchmark: Path, digits_dir: Path, classifier: Path, mlflow_server: str) -> None:
    scored = benchmark / "dit" / "seed_0" / "quality.json"
    before = scored.stat().st_mtime_ns
    assert main(quality_args(benchmark, digits_dir, classifier, f"tracking.uri={mlflow_server}")) == 0
    assert scored.stat().st_mtime_ns == before
    (benchmark / "summary.json").unlink()
    assert main(["quality", "--summarize", "--out", str(benchmark)]) == 0
    assert "dit/ddim25" in json.loads((benchmark / "summary.json").read_text())


def test_method_overrides_reach_only_their_method(digits_dir: Path, classifier: Path, tmp_path: Path) -> None:
    plan = QualityPlan(digits_dir, classifier, tmp_path, 1.0, overrides=["ddgan:disc.num_blocks=1",
                                                                         "model.depth=2"])
    assert plan.run_config("ddgan", 0).model.depth == 2
    assert plan.run_config("dit", 0).model.depth == 2  # no disc key reaches the plain DiT, which refuses it
    # The adversary sized for the digits replaces the preset's (128 channels, 3 blocks)...
    sadm = plan.run_config("sadm", 0).disc
    assert (sadm.base_channels, sadm.num_blocks) == (32, 2)
    # ...and a user's override comes after it.
    assert plan.run_config("ddgan", 0).disc.num_blocks == 1
    # DDGAN's generator trains at the official DDGAN rate and betas, the diffusion objectives at the
    # digits settings' (lr 4e-3, betas 0.9 / 0.999).
    ddgan, sadm = plan.run_config("ddgan", 0).optim, plan.run_config("sadm", 0).optim
    assert (ddgan.lr, ddgan.beta1, ddgan.beta2) == (1.6e-4, 0.5, 0.9)
    assert (sadm.lr, sadm.beta1, sadm.beta2) == (4e-3, 0.9, 0.999)
    # Every run in one MLflow store of the benchmark's folder unless a tracking.uri is given.
    assert plan.run_config("dit", 1).tracking.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="'gan' is not a method"):
        QualityPlan(digits_dir, classifier, tmp_path, 1.0, overrides=["gan:disc.lr=1"]).run_config("dit", 0)


def test_missing_inputs_name_the_command_that_writes_them(digits_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="advdit digits classifier"):
        QualityPlan(digits_dir, tmp_path / "none.json", tmp_path, 1.0)
    with pytest.raises(ConfigError, match="advdit data digits"):
        QualityPlan(tmp_path, tmp_path, tmp_path, 1.0)
    with pytest.raises(ConfigError, match="positive"):
        QualityPlan(digits_dir, tmp_path, tmp_path, 0.0)


def test_the_chosen_samplers_score_the_diffusion_objectives_and_ddgan_keeps_its_own(
        digits_dir: Path, classifier: Path, tmp_path: Path) -> None:
    assert [name for name, _, _ in samplers_of("sadm", ["ddim25"])] == ["ddim25"]
    assert [name for name, _, _ in samplers_of("dit", ["ddpm250", "ddim25"])] == ["ddpm250", "ddim25"]
    assert [name for name, _, _ in samplers_of("ddgan", ["ddim25"])] == ["ddgan"]
    with pytest.raises(ConfigError, match=r"ddim50.*expected one or more of \['ddpm250', 'ddim25'\]"):
        QualityPlan(digits_dir, classifier, tmp_path, 1.0, diffusion_samplers=["ddim50"])
    with pytest.raises(ConfigError, match="expected one or more"):
        QualityPlan(digits_dir, classifier, tmp_path, 1.0, diffusion_samplers=[])
