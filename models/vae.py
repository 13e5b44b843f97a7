"""Where the denoiser's inputs come from: pixels as they are, or SD-VAE latents.

The latent scale factor of Stable Diffusion's VAE (0.18215) lives here and nowhere else: every
encode multiplies by it and every decode divides by it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .diffusion import Generators, randn

LATENT_SCALE = 0.18215

# The architecture of Stable Diffusion's VAE (the config.json of stabilityai/sd-vae-ft-ema and
# sd-vae-ft-mse): 4 encoder blocks, 8x downsampling, 4 latent channels, about 83.7M parameters.
SD_VAE_ARCHITECTURE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 256,
}


class PixelCodec(nn.Module):
    """Identity codec: the denoiser works on [-1, 1] pixels (the CPU demo)."""

    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor, generator: Generators | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class SDVAECodec(nn.Module):
    """A frozen diffusers ``AutoencoderKL``; encode samples the posterior and scales by 0.18215."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.channels = int(vae.config.latent_channels)
        # Each encoder block but the last halves the resolution: 8x for the SD-VAE's four blocks.
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Generators | None = None) -> torch.Tensor:
        return self.sample_moments(self.moments(images), generator)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, h, w): the posterior's mean and std, unscaled (what latent shards store)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return torch.stack([posterior.mean, posterior.std], dim=1).float()

    @staticmethod
    def sample_moments(moments: torch.Tensor, generator: Generators | None = None) -> torch.Tensor:
        """Scaled latents drawn from stored posterior moments: a fresh posterior sample per epoch."""
        mean, std = moments[:, 0].float(), moments[:, 1].float()
        noise = randn(mean.shape, generator, mean.device)
        return (mean + std * noise) * LATENT_SCALE

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / LATENT_SCALE).to(self.vae.dtype)).sample
        return images.float().clamp(-1, 1)


def random_sd_vae_codec(seed: int = 0) -> SDVAECodec:
    """The SD-VAE's architecture with random weights: for timing the online encoder (its cost does
    not depend on the weights) where the weights file is not at hand; its latents mean nothing."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return SDVAECodec(AutoencoderKL(**SD_VAE_ARCHITECTURE))


def codec_downsample(vae: str) -> int:
    """How many pixels per latent side the codec ``vae`` gives, from its config.json alone (8 for
    the SD-VAE); 8 where the folder cannot be read, which load_codec then reports."""
    if vae == "none":
        return 1
    try:
        config = json.loads((Path(vae) / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 8


def load_codec(vae: str) -> PixelCodec | SDVAECodec:
    """``"none"`` -> pixels; otherwise a local diffusers AutoencoderKL folder (or a cached hub id).

    Nothing is downloaded: a missing folder is an error that names the files a VAE folder holds.
    """
    if vae == "none":
        return PixelCodec()
    from diffusers import AutoencoderKL

    path = Path(vae)
    try:
        model = AutoencoderKL.from_pretrained(vae, local_files_only=True)
    except (OSError, ValueError) as err:
        where = f"local folder {str(path)!r}" if path.exists() else f"{vae!r} (not a local folder)"
        raise FileNotFoundError(
            f"vae: could not load a diffusers AutoencoderKL from {where}: {err}. Expected a folder "
            "with config.json and diffusion_pytorch_model.safetensors, e.g. a local copy of "
            "stabilityai/sd-vae-ft-ema (huggingface-cli download stabilityai/sd-vae-ft-ema "
            "--local-dir PATH on a machine with internet access), or vae=none for pixel space"
        ) from err
    return SDVAECodec(model)
