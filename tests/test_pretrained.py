"""Starting from published weights (model.init_from) and giving weights back to diffusers: the
official and diffusers layouts load into advdit's DiT with the same outputs, every mismatch is a
named error, a 256 checkpoint starts a 512 run, pickled code is refused, a run records its source,
and ``advdit export --format diffusers`` round-trips."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from advdit.launchers.cli import main
from advdit.models.dit import DiT, build_dit, sincos_pos_embed_2d
from advdit.models.vae import load_codec
from advdit.models.weight_layouts import advdit_to_diffusers, advdit_to_official, diffusers_config, shape_of
from advdit.trainer.checkpointing.export import ema_state
from advdit.trainer.checkpointing.pretrained import PretrainedError, load_pretrained, read_pretrained
from advdit.trainer.loop import Trainer, train

from helpers import tiny_config

# A DiT small enough for milliseconds per forward: 2 blocks of width 32, 2 heads, on 8x8 latents.
NET = {"depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 4, "num_classes": 10}


def random_dit(seed: int = 0, arch: str = "DiT-S/2", **changes: object) -> DiT:
    """A DiT with every trained parameter random (adaLN-Zero would make the output zero)."""
    torch.manual_seed(seed)
    net = build_dit(arch, **{**NET, **changes})
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    return net.eval()


def inputs(num_classes: int = 10, size: int = 8) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, size, size, generator=generator)
    return x, torch.tensor([0, 421, 999]), torch.tensor([1, 7, num_classes])  # the last: the null class


def save_diffusers(net: DiT, folder: Path) -> Path:
    """``net`` as diffusers' DiTTransformer2DModel, saved by diffusers itself."""
    shape = shape_of(net.state_dict())
    config = {k: v for k, v in diffusers_config(shape, 2, 1).items() if not k.startswith(("_", "advdit"))}
    model = DiTTransformer2DModel(**config)
    model.load_state_dict(advdit_to_diffusers(net.state_dict()), strict=True)
    model.save_pretrained(folder)
    return folder


def loaded(source: Path, entry: str = "ema", **changes: object) -> DiT:
    net = build_dit("DiT-S/2", **{**NET, **changes})
    load_pretrained(net, read_pretrained(source, entry))
    return net.eval()


def test_a_diffusers_folder_loads_and_gives_diffusers_outputs(tmp_path: Path) -> None:
    reference = random_dit(timestep_freq_shift=1)
    folder = save_diffusers(reference, tmp_path / "dit")
    theirs = DiTTransformer2DModel.from_pretrained(folder).eval()
    ours = loaded(folder, timestep_freq_shift=1)
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(ours(x, t, y), expected, rtol=0, atol=1e-5)
        # The official DiT's frequencies (the default) are a different function of t.
        official = loaded(folder)
        assert (official(x, t, y) - expected).abs().max() > 1e-3


def test_the_official_layout_plain_and_nested_loads_as_the_diffusers_one(tmp_path: Path) -> None:
    ema, raw = random_dit(0), random_dit(1)
    folder = save_diffusers(ema, tmp_path / "dit")
    plain = tmp_path / "DiT-S-2.pt"
    torch.save(advdit_to_official(ema.state_dict()), plain)
    # As the official train.py saves: both weight sets, the optimizer and its argparse arguments.
    nested = tmp_path / "0400000.pt"
    torch.save({"model": advdit_to_official(raw.state_dict()), "ema": advdit_to_official(ema.state_dict()),
                "opt": {"state": {}, "param_groups": []}, "args": argparse.Namespace(model="DiT-S/2")},
               nested)
    assert read_pretrained(plain).format == read_pretrained(nested).format == "official"
    x, t, y = inputs()
    with torch.no_grad():
        expected = loaded(folder)(x, t, y)
        for source in (plain, nested):
            torch.testing.assert_close(loaded(source)(x, t, y), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(nested, "model")(x, t, y), raw(x, t, y), rtol=0, atol=0)
    with pytest.raises(PretrainedError, match=r"holds \['ema', 'model'\], not model.init_entry='raw'"):
        read_pretrained(nested, "raw")


@pytest.mark.parametrize(("changes", "message"), [
    ({"depth": 3}, r"depth 3 and hidden size 32 \(a custom DiT/2\), the run's depth 2"),
    ({"hidden_size": 48, "num_heads": 3}, r"hidden size 48 .* the run's depth 2 and hidden size 32"),
    ({"arch": "DiT-S/4"}, r"patch size 4 in the file, 2 in model.arch"),
    ({"in_channels": 3}, r"takes 3 input channels, the run's 4"),
    ({"learn_sigma": False}, r"does not learn sigma \(4 output channels\), model.learn_sigma=True"),
    ({"num_classes": 1000}, r"the file has 1000 classes \(\+ the null class\), model.num_classes=10"),
])
def test_each_mismatch_is_one_error_naming_both_sides(tmp_path: Path, changes: dict, message: str) -> None:
    arch = changes.pop("arch", "DiT-S/2")
    file = tmp_path / "other.pt"
    torch.save(advdit_to_official(random_dit(arch=arch, **changes).state_dict()), file)
    with pytest.raises(PretrainedError, match=message):
        loaded(file)


def test_a_diffusers_model_with_other_heads_or_untied_embedders_is_refused(tmp_path: Path) -> None:
    folder = save_diffusers(random_dit(), tmp_path / "dit")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4,
                                                    "attention_head_dim": 8}))
    with pytest.raises(PretrainedError, match="4 attention heads, the run's 2"):
        loaded(folder)
    # diffusers' own initialisation draws each block's embedders separately.
    untied = DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith(("_", "advdit"))})
    untied.save_pretrained(tmp_path / "untied")
    with pytest.raises(PretrainedError, match="block 1's copy of .* differs from block 0's"):
        read_pretrained(tmp_path / "untied")


def test_a_256_checkpoint_starts_a_512_run_with_the_table_of_the_larger_grid(tmp_path: Path) -> None:
    small = random_dit()  # 8x8 latents: a 4x4 grid
    file = tmp_path / "small.pt"
    torch.save(advdit_to_official(small.state_dict()), file)
    large = build_dit("DiT-S/2", **{**NET, "input_size": 16})
    notes = load_pretrained(large, read_pretrained(file))
    assert notes == ["position table computed for a 8x8 grid (the file's was 4x4)"]
    torch.testing.assert_close(large.pos_embed[0], sincos_pos_embed_2d(32, 8), rtol=0, atol=0)
    for key, value in small.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(large.state_dict()[key], value), key
    # A learned table of the same grid is not the fixed one: it cannot be dropped silently.
    learned = {**advdit_to_official(small.state_dict()), "pos_embed": torch.randn(1, 16, 32)}
    torch.save(learned, file)
    with pytest.raises(PretrainedError, match="not the fixed 2-D sin-cos table"):
        loaded(file)


class RunsCode:
    """Unpickling this would create a file: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_file_holding_anything_but_tensors_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "payload": RunsCode(marker)}, hostile)
    with pytest.raises(PretrainedError, match="refused, it is not a file of tensors"):
        read_pretrained(hostile)
    assert not marker.exists()
    listing = tmp_path / "plain.pt"
    torch.save({"weights": [1.0, 2.0]}, listing)  # readable, but no tensors
    with pytest.raises(PretrainedError, match="expected a state dict of tensors"):
        read_pretrained(listing)
    with pytest.raises(PretrainedError, match="no such file or folder"):
        read_pretrained(tmp_path / "missing.pt")


def test_a_ddgan_denoiser_starts_from_a_plain_dit_with_its_z_input_silent(tmp_path: Path) -> None:
    file = tmp_path / "dit.pt"
    source = random_dit()
    torch.save(advdit_to_official(source.state_dict()), file)
    generator_net = build_dit("DiT-S/2", **NET, z_dim=8).eval()
    notes = load_pretrained(generator_net, read_pretrained(file))
    assert any("latent z" in note for note in notes)
    x, t, y = inputs()
    with torch.no_grad():
        with_z = generator_net(x, t, y, torch.randn(3, 8))
        torch.testing.assert_close(with_z, source(x, t, y), rtol=0, atol=1e-6)


def run_overrides(vae: Path, *extra: str) -> list[str]:
    # 16 px through the tiny 2x VAE: 8x8 latents of 4 channels, as NET.
    return [f"vae={vae}", "model.arch=DiT-S/2", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
            "train.ema_decay=0.5", *extra]


def test_a_run_starts_from_init_from_records_it_and_a_resume_ignores_it(
        tmp_path: Path, tiny_shards: Path, tiny_vae_dir: Path, tracking_uri: str) -> None:
    source = random_dit()
    file = tmp_path / "DiT-S-2.pt"
    torch.save(advdit_to_official(source.state_dict()), file)
    cfg = tiny_config(tmp_path / "run", tiny_shards, *run_overrides(
        tiny_vae_dir, f"model.init_from={file}", "train.steps=2", "train.ckpt_every=2",
        "tracking.enabled=true", f"tracking.uri={tracking_uri}"))
    trainer = Trainer(cfg)
    trainer.build()
    for key, value in source.state_dict().items():  # the EMA starts from the loaded weights too
        assert torch.equal(trainer.accelerator.unwrap_model(trainer.model).state_dict()[key], value), key
        assert torch.equal(trainer.ema.model.state_dict()[key], value), key
    result = train(cfg)
    params = mlflow.get_run(result.mlflow_run_id).data.params
    assert params["model.init_from.sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert params["model.init_from.format"] == "official" and params["model.init_from"] == str(file)
    file.unlink()  # a resumed run reads its checkpoint, never the (moved) source
    resumed = train(tiny_config(tmp_path / "run", tiny_shards, *run_overrides(
        tiny_vae_dir, f"model.init_from={file}", "train.steps=3", "train.ckpt_every=3")))
    assert resumed.step == 3
    fresh = tiny_config(tmp_path / "other", tiny_shards,
                        *run_overrides(tiny_vae_dir, f"model.init_from={file}"))
    with pytest.raises(PretrainedError, match="no such file or folder"):
        train(fresh)


def test_export_to_diffusers_loads_there_samples_there_and_comes_back_lossless(
        tmp_path: Path, tiny_shards: Path, tiny_vae_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_shards, *run_overrides(
        tiny_vae_dir, "model.timestep_freq_shift=1", "train.steps=2", "train.ckpt_every=2"))
    checkpoint = train(cfg).checkpoint
    out = tmp_path / "diffusers"
    assert main(["export", str(checkpoint), "--format", "diffusers", "--out", str(out)]) == 0
    theirs = DiTTransformer2DModel.from_pretrained(out).eval()
    ours = build_dit("DiT-S/2", **NET, timestep_freq_shift=1).eval()
    ours.load_state_dict(ema_state(checkpoint))
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=y).sample, ours(x, t, y),
                                   rtol=0, atol=1e-5)
    back = read_pretrained(out).state
    for key, value in ema_state(checkpoint).items():
        if key != "pos_embed":
            assert torch.equal(back[key], value), key
    # A DiTPipeline of the export, its scheduler config and the VAE folder runs (no guidance: the
    # pipeline's null class is ImageNet's 1000).
    pipe = DiTPipeline(transformer=theirs, vae=load_codec(str(tiny_vae_dir)).vae,
                       scheduler=DDPMScheduler.from_pretrained(out, subfolder="scheduler"))
    images = pipe(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_advdit_sample_draws_from_published_weights_without_a_run(
        tmp_path: Path, tiny_vae_dir: Path, capsys: pytest.CaptureFixture) -> None:
    folder = save_diffusers(random_dit(), tmp_path / "dit")
    npz = tmp_path / "samples.npz"
    assert main(["sample", str(folder), "--num-samples", "2", "--npz", str(npz)]) != 0
    assert "is a DiT on 4-channel latents: pass --vae DIR" in capsys.readouterr().err
    assert main(["sample", str(folder), "--vae", str(tiny_vae_dir), "--num-samples", "3", "--steps", "2",
                 "--cfg-scale", "1.5", "--npz", str(npz)]) == 0
    with np.load(npz) as samples:
        assert samples["arr_0"].shape == (3, 16, 16, 3) and samples["arr_1"].tolist() == [0, 1, 2]


def test_a_named_size_is_recognised_and_its_image_size_follows_grid_and_vae(tmp_path: Path) -> None:
    """An official file records neither its size's name nor its head count: both follow from the
    depth and width of a named size; the image size from the position table and the VAE's
    downsampling (8 for the SD-VAE's four resolution levels)."""
    from advdit.trainer.checkpointing.pretrained import network_settings

    file = tmp_path / "DiT-S-2-256.pt"
    torch.save(advdit_to_official(build_dit("DiT-S/2", input_size=32, num_classes=1000).state_dict()), file)
    sd_vae = tmp_path / "sd-vae"
    sd_vae.mkdir()
    (sd_vae / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    settings = network_settings(read_pretrained(file), str(sd_vae))
    assert settings == {"objective": "dit", "vae": str(sd_vae), "model.arch": "DiT-S/2",
                        "model.num_classes": 1000, "model.learn_sigma": True, "data.image_size": 256}
    with pytest.raises(PretrainedError, match="pass --vae DIR"):
        network_settings(read_pretrained(file), None)
