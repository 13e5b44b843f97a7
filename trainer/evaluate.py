"""Sampling from a trained denoiser: class-conditional sample grids (FID comes with its own issue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..models.vae import PixelCodec, SDVAECodec
from .config import Config
from .objectives import DiffusionObjective


def grid_labels(cfg: Config) -> list[int]:
    """Up to 10 classes per grid row: the configured ones, or spread evenly over all classes."""
    if cfg.sample.grid_classes:
        return list(cfg.sample.grid_classes)
    count = min(cfg.model.num_classes, 10)
    return [int(c) for c in np.linspace(0, cfg.model.num_classes - 1, count).round()]


@torch.no_grad()
def sample_images(model: nn.Module, objective: DiffusionObjective, codec: PixelCodec | SDVAECodec,
                  labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Images in [-1, 1] for ``labels``, drawn the way the objective samples (diffusion or DDGAN)."""
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    # Pixels live in [-1, 1], so clipping the x0 estimate at each step is safe there (ADM does it);
    # latents have no fixed range and are left alone.
    latents = objective.sample(model, labels, generator, clip_denoised=isinstance(codec, PixelCodec))
    model.train(was_training)
    return codec.decode(latents).clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, columns: int, path: str | Path, scale: int = 1) -> Path:
    """Tile images row by row into one PNG (nearest-neighbour upscaled by ``scale``)."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    rows = -(-count // columns)
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        row, col = divmod(index, columns)
        canvas[row * height:(row + 1) * height, col * width:(col + 1) * width] = image
    picture = Image.fromarray(canvas)
    if scale > 1:
        picture = picture.resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                 Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def sample_grid(model: nn.Module, objective: DiffusionObjective, cfg: Config,
                codec: PixelCodec | SDVAECodec, device: torch.device, path: str | Path) -> Path:
    """A grid with one column per class and ``sample.grid_rows`` rows; the same seed every time,
    so grids of successive steps show the same noise developing."""
    classes = grid_labels(cfg)
    labels = torch.tensor(classes * cfg.sample.grid_rows, device=device)
    images = sample_images(model, objective, codec, labels, seed=cfg.run.seed)
    scale = max(1, 128 // cfg.data.image_size)
    return save_grid(images, len(classes), path, scale=scale)
