"""Latent space through a tiny randomly initialised diffusers AutoencoderKL (no weights download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advdit.models.vae import LATENT_SCALE, PixelCodec, load_codec, random_sd_vae_codec
from advdit.trainer.loop import train

from helpers import tiny_config


def test_codec_encodes_with_the_latent_scale(tiny_vae_dir: Path) -> None:
    codec = load_codec(str(tiny_vae_dir))
    assert codec.channels == 4 and codec.downsample == 2
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    generator = torch.Generator().manual_seed(1)
    latents = codec.encode(images, generator=generator)
    assert latents.shape == (2, 4, 8, 8)
    posterior = codec.vae.encode(images).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(1)) * LATENT_SCALE
    assert torch.allclose(latents, expected, atol=1e-6)
    decoded = codec.decode(latents)
    assert decoded.shape == (2, 3, 16, 16) and decoded.abs().max() <= 1


def test_pixel_codec_is_identity() -> None:
    x = torch.randn(1, 3, 4, 4)
    assert load_codec("none").encode(x) is x and isinstance(load_codec("none"), PixelCodec)


def test_missing_vae_names_the_files_needed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json and diffusion_pytorch_model"):
        load_codec(str(tmp_path / "sd-vae-ft-ema"))


def test_training_in_latent_space(tiny_vae_dir: Path, tmp_path: Path, tiny_shards: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_shards, f"vae={tiny_vae_dir}", "model.arch=DiT-S/2",
                      "train.steps=3", "train.ckpt_every=3", "train.sample_every=3")
    result = train(cfg, progress=False)
    assert result.step == 3 and all(r["loss"] > 0 for r in result.history)
    ema = load_file(result.checkpoint / "ema.safetensors")
    assert ema["x_embedder.proj.weight"].shape[1] == 4  # the DiT saw 4 latent channels
    assert result.grid is not None and result.grid.is_file()


def test_random_sd_vae_has_the_sd_vae_shape() -> None:
    codec = random_sd_vae_codec()
    assert codec.channels == 4 and codec.downsample == 8
    # The encoder's stages: a conv_in to 128 channels, then the four blocks' widths.
    widths = [block.resnets[-1].conv2.out_channels for block in codec.vae.encoder.down_blocks]
    assert codec.vae.encoder.conv_in.out_channels == 128 and widths == [128, 256, 512, 512]
    latents = codec.encode(torch.rand(1, 3, 64, 64) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
