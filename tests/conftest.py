"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_shape_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 16x16 shape images in 4 shards."""
    return write_shape_shards(tmp_path_factory.mktemp("shards"), 320, 80)
