"""One raw sample (a dict of member bytes) -> an RGB image or latent moments, and its label."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
# Latent shards: SD-VAE posterior moments of the image and of its mirror, (2 flips, 2 moments, C, h, w).
MOMENTS_KEY = "moments.npy"


def decode_label(record: dict[str, Any], num_classes: int) -> int:
    if "cls" not in record:
        raise ValueError("no 'cls' member")
    label = int(record["cls"].decode().strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside [0, {num_classes})")
    return label


def decode_moments(record: dict[str, Any], latent_size: int | None) -> np.ndarray:
    moments = np.load(io.BytesIO(record[MOMENTS_KEY]), allow_pickle=False)
    if moments.ndim != 5 or moments.shape[:2] != (2, 2):
        raise ValueError(f"moments have shape {moments.shape}, expected (2, 2, C, h, w)")
    if latent_size is not None and moments.shape[-2:] != (latent_size, latent_size):
        raise ValueError(f"latents are {moments.shape[-1]}x{moments.shape[-2]}, expected {latent_size}^2")
    return moments


def decode_sample(record: dict[str, Any], image_size: int, num_classes: int,
                  latent_size: int | None = None) -> tuple[np.ndarray, int]:
    """A raw tar record -> (HWC uint8 RGB image, or (2, 2, C, h, w) latent moments; label).

    Raises ValueError on anything wrong.
    """
    label = decode_label(record, num_classes)
    if MOMENTS_KEY in record:
        return decode_moments(record, latent_size), label
    image_key = next((key for key in IMAGE_KEYS if key in record), None)
    if image_key is None:
        raise ValueError(f"no image member (one of {IMAGE_KEYS}) and no {MOMENTS_KEY}")
    with Image.open(io.BytesIO(record[image_key])) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape[:2] != (image_size, image_size):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected {image_size}^2")
    return pixels, label
