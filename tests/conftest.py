"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import write_shape_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 16x16 shape images in 4 shards."""
    return write_shape_shards(tmp_path_factory.mktemp("shards"), 320, 80)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """For modules of small-tensor tests: intra-op threads only add overhead there, and under CPU
    contention (other jobs on a 2-core runner) every parallel op can stall for milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-block AutoencoderKL (downsampling 2x) saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path
