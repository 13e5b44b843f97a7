"""Real images that ship offline: the UCI handwritten digits bundled with scikit-learn (1,797
grayscale images of 8x8 pixels, 10 classes, read from the package, never downloaded), written as
webdataset shards through the normal shard writer.

Two splits, fixed by a seeded stratified shuffle: ``train`` and ``heldout`` (``heldout_fraction``
of each class), the held-out one for evaluators and quality benchmarks. The 17 grey levels (0-16)
are scaled to 0-255 and the 8x8 image is upscaled by pixel repetition to ``image_size`` (16 by
default: each original pixel becomes a 2x2 block, so the upscale adds nothing and loses nothing),
in RGB with three equal channels, as every image the trainer reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError
from .writer import ShardWriter, encode_png

SOURCE = "scikit-learn load_digits (UCI ML handwritten digits, 1,797 images, 8x8, 10 classes)"
SPLITS = ("train", "heldout")


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images as N x 8 x 8 uint8 in 0-255, labels) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the digits data set comes with scikit-learn, which is not installed: "
                        "pip install 'advdit[digits]' (or scikit-learn)") from err
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, heldout_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A stratified split: of each class, the first ``heldout_fraction`` of a seeded shuffle is
    held out (rounded to the nearest image), the rest is train; indices sorted."""
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    heldout = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        heldout.extend(members[: round(len(members) * heldout_fraction)])
    held = np.zeros(len(labels), dtype=bool)
    held[heldout] = True
    return {"train": np.flatnonzero(~held), "heldout": np.flatnonzero(held)}


def upscale(image: np.ndarray, image_size: int) -> Image.Image:
    """An 8x8 grey image as an RGB image of ``image_size`` pixels, by pixel repetition."""
    if image_size % image.shape[0]:
        raise DataError(f"image_size {image_size} is not a multiple of the digits' {image.shape[0]} pixels")
    factor = image_size // image.shape[0]
    big = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return Image.fromarray(np.stack([big] * 3, axis=-1))


def write_digit_shards(out_dir: str | Path, image_size: int = 16, heldout_fraction: float = 0.2,
                       seed: int = 0, samples_per_shard: int = 200) -> dict[str, dict[str, Any]]:
    """``out_dir/train`` and ``out_dir/heldout`` as shards with manifests; returns the manifests."""
    images, labels = load_digit_arrays()
    manifests = {}
    for split, indices in split_indices(labels, heldout_fraction, seed).items():
        writer = ShardWriter(Path(out_dir) / split, prefix=split, samples_per_shard=samples_per_shard,
                             preprocessing={"source": SOURCE, "image_size": image_size, "split": split,
                                            "heldout_fraction": heldout_fraction, "seed": seed,
                                            "upscale": "pixel repetition", "format": "png"})
        for index in indices:  # the key is the image's index in load_digits, so splits never share one
            png = encode_png(upscale(images[index], image_size))
            writer.write(f"{index:06d}", int(labels[index]), {"png": png})
        manifests[split] = writer.close({"class_names": [str(d) for d in range(10)]})
    return manifests
