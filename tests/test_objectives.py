"""The adversarial objectives inside the real training loop: steps, metrics, exact resume, NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from advdit.trainer.checkpointing.store import CheckpointError, complete_checkpoints
from advdit.trainer.config import ConfigError, load_config
from advdit.trainer.loop import Trainer, train
from advdit.trainer.objectives.base import StepContext

from helpers import tiny_config

ADVERSARIAL = {
    "sadm": ["objective=sadm", "sadm.lambda=1.0", "sadm.feature_dim=16"],
    "diffusion_gan": ["objective=diffusion_gan", "diffusion_gan.r1_interval=2",
                      "diffusion_gan.ada_interval=2", "diffusion_gan.ada_kimg=0.1"],
    "ddgan": ["objective=ddgan", "ddgan.z_dim=8", "ddgan.r1_interval=2"],
}
SMALL_DISC = ["disc.base_channels=8", "disc.num_blocks=2"]
LOGGED = {
    "sadm": {"loss_denoise", "sadm/distance_encoder", "sadm/distance_denoiser", "loss_mse", "loss_vb"},
    "diffusion_gan": {"loss_denoise", "loss_g", "loss_d", "d_real", "d_fake", "r1", "ada/p", "ada/T",
                      "ada/r_d"},
    "ddgan": {"loss_g", "loss_d", "d_real", "d_fake", "r1", "loss_x0_mse"},
}


def config(out: Path, shards: Path, method: str, *extra: str):
    return tiny_config(out, shards, *ADVERSARIAL[method], *SMALL_DISC, "train.steps=4",
                       "train.ckpt_every=2", "train.sample_every=4", *extra)


@pytest.mark.parametrize("method", sorted(ADVERSARIAL))
def test_objective_trains_logs_and_resumes_exactly(method: str, tmp_path: Path, tiny_shards: Path) -> None:
    whole = train(config(tmp_path / "whole", tiny_shards, method), progress=False)
    assert whole.step == 4 and whole.grid is not None and whole.grid.is_file()
    assert LOGGED[method] <= set(whole.history[-1]) | set(whole.history[-2])
    names = [p.name for p in complete_checkpoints(tmp_path / "whole" / "checkpoints")]
    assert names == ["step_00000004", "step_00000002"]
    # The adversary and its optimizer are in the checkpoint, in their own sub-folder.
    name = {"sadm": "encoder"}.get(method, "disc")
    assert (tmp_path / f"whole/checkpoints/step_00000004/{name}/model.safetensors").is_file()
    assert (tmp_path / f"whole/checkpoints/step_00000004/{name}/optimizer.bin").is_file()

    part = tmp_path / "parts"
    first = train(config(part, tiny_shards, method, "train.steps=2"), progress=False)
    second = train(config(part, tiny_shards, method), progress=False)
    resumed = {row["step"]: row for row in first.history + second.history}
    for row in whole.history:
        for key in ("loss", "loss_d" if method != "sadm" else "sadm/distance_encoder"):
            expected = pytest.approx(row[key], rel=1e-5, abs=1e-6)
            assert resumed[row["step"]][key] == expected, (row["step"], key)


def test_sadm_step_is_a_minimax(tmp_path: Path, tiny_shards: Path) -> None:
    """The encoder's step raises the distance it sees; the denoiser's step lowers it."""
    cfg = config(tmp_path, tiny_shards, "sadm", "sadm.lambda=100", "sadm.weighting=none", "disc.lr=1e-3",
                 "optim.lr=1e-4")
    trainer = Trainer(cfg, progress=False)
    trainer.build()
    objective = trainer.objective
    objective.denoiser.grad_clip = 1e9
    rng = torch.Generator().manual_seed(0)
    latents = torch.rand(8, 3, 16, 16, generator=rng) * 2 - 1
    labels = torch.arange(8) % 10
    ctx = StepContext(trainer.accelerator, cfg.run.seed, step=0)
    before = objective.denoise(latents, labels, ctx.draws(len(latents), latents.device))
    with torch.no_grad():
        distance_before = objective.distance(latents, before.x0_pred, before.t)
    objective.train_step(latents, labels, ctx)
    after = objective.denoise(latents, labels, ctx.draws(len(latents), latents.device))  # same t and noise
    with torch.no_grad():
        encoder_view = objective.distance(latents, before.x0_pred, before.t)
        denoiser_view = objective.distance(latents, after.x0_pred, after.t)
    assert torch.equal(before.t, after.t)
    assert encoder_view > distance_before
    assert denoiser_view < encoder_view


def test_exploding_discriminator_stops_with_the_term_named(tmp_path: Path, tiny_shards: Path) -> None:
    train(config(tmp_path, tiny_shards, "ddgan", "train.steps=2"), progress=False)
    # Resume with an absurd R1 weight: the discriminator's loss at step 2 (an R1 step) overflows.
    exploding = config(tmp_path, tiny_shards, "ddgan", "ddgan.r1_gamma=1e300", "train.steps=6")
    with pytest.raises(FloatingPointError, match=r"ddgan discriminator loss is (nan|inf) at step 2"):
        train(exploding, allow_config_change=True, progress=False)
    kept = complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step_00000002"]  # the last good state is still there
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.parametrize("parameterization", ["x0", "x0_tanh", "eps"])
def test_ddgan_reads_the_dit_output_as_configured(parameterization: str, tmp_path: Path,
                                                  tiny_shards: Path) -> None:
    settings = (["ddgan.parameterization=x0", "ddgan.x0_tanh=true"] if parameterization == "x0_tanh"
                else [f"ddgan.parameterization={parameterization}"])
    cfg = config(tmp_path, tiny_shards, "ddgan", *settings)
    trainer = Trainer(cfg, progress=False)
    trainer.build()
    chain, model = trainer.objective.chain, trainer.model
    for p in model.parameters():  # leave adaLN-Zero's all-zero output
        p.data.add_(0.02 * torch.randn_like(p))
    x_next, z = torch.randn(3, 3, 16, 16), torch.randn(3, 8)
    t, labels = torch.tensor([0, 1, 3]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        x0 = chain.predict_x0(model, x_next, t, z, labels)
        out = model(x_next, chain.dit_timesteps[t + 1], labels, z)[:, :3]
    if parameterization == "x0":
        assert torch.allclose(x0, out)
    elif parameterization == "x0_tanh":
        assert torch.allclose(x0, torch.tanh(out)) and x0.abs().max() < 1
        assert (x0 - out).abs().max() > 0.02  # outputs large enough that the tanh bends them
    else:
        acp = torch.as_tensor(chain.schedule.alphas_cumprod, dtype=torch.float32)[t + 1].view(-1, 1, 1, 1)
        assert torch.allclose(x0, (x_next - (1 - acp).sqrt() * out) / acp.sqrt(), rtol=1e-4, atol=1e-4)
    # The DiT timestep of each DDGAN level has the nearest alphas_cumprod of DiT's schedule.
    dit_acp = trainer.objective.denoiser.diffusion.alphas_cumprod[chain.dit_timesteps.numpy()]
    assert abs(dit_acp - chain.schedule.alphas_cumprod).max() < 0.01


def test_x0_tanh_needs_the_x0_parameterization() -> None:
    with pytest.raises(ConfigError, match="'ddgan.x0_tanh' squashes a predicted x0"):
        load_config(None, ["objective=ddgan", "ddgan.parameterization=eps", "ddgan.x0_tanh=true"])


def test_checkpoint_manifest_names_its_contents_and_refuses_another_objective(tmp_path: Path,
                                                                              tiny_shards: Path) -> None:
    train(config(tmp_path, tiny_shards, "diffusion_gan", "train.steps=2"), progress=False)
    folder = tmp_path / "checkpoints" / "step_00000002"
    meta = json.loads((folder / "meta.json").read_text())
    contents = meta["contents"]
    assert contents["denoiser"] == {"weights": "model.safetensors"}
    assert (folder / "model.safetensors").is_file()
    assert contents["adversaries"] == {"disc": {"folder": "disc"}} and (folder / "disc").is_dir()
    assert (folder / contents["ema"]).is_file() and "step" in contents["counters"]
    assert contents["objective_state"] == ["controller"] and set(meta["objective_state"]) == {"controller"}
    # Another objective's checkpoint is named as such, not skipped as damaged or loaded in part.
    sadm = config(tmp_path, tiny_shards, "sadm", "train.steps=4")
    with pytest.raises(CheckpointError, match=r"holds the adversaries \['disc'\], this objective trains "
                                              r"\['encoder'\]"):
        train(sadm, allow_config_change=True, progress=False)
    dit = tiny_config(tmp_path, tiny_shards, "train.steps=4")
    with pytest.raises(CheckpointError, match=r"holds the adversaries \['disc'\], this objective "
                                              r"trains \[\]"):
        train(dit, allow_config_change=True, progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
