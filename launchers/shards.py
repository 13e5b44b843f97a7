"""Writing webdataset shards, with a manifest, for every data set the trainer reads.

A sample is one tar member per field sharing a key: ``000042.png`` (or ``.jpg``) holds the encoded
image and ``000042.cls`` the class index as text. Each shard is written under a temporary name
and renamed when complete, so a crashed writer never leaves a shard that looks finished.
``manifest.json`` beside the shards lists them with sample counts and checksums, the class counts
and how the images were made; the loader reads it to find the shards.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from ..trainer.files import file_sha256, write_json_atomic

MANIFEST = "manifest.json"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ShardWriter:
    """Writes samples into ``{prefix}-{index:06d}.tar`` files of ``samples_per_shard`` each."""

    def __init__(self, out_dir: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                 preprocessing: dict[str, Any] | None = None) -> None:
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.preprocessing = preprocessing or {}
        self.shards: list[dict[str, Any]] = []
        self.class_counts: Counter[int] = Counter()
        self._tar: wds.TarWriter | None = None
        self._stream: io.BufferedWriter | None = None
        self._in_shard = 0

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open_next(self) -> None:
        tmp_path = self._shard_path(len(self.shards)).with_suffix(".tar.tmp")
        self._stream = tmp_path.open("wb")
        # A fixed member time makes shards byte-reproducible (same checksums on a rerun).
        self._tar = wds.TarWriter(self._stream, mtime=0.0)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._stream is not None
        self._tar.close()
        self._stream.close()
        final = self._shard_path(len(self.shards))
        os.replace(final.with_suffix(".tar.tmp"), final)
        self.shards.append(
            {"name": final.name, "samples": self._in_shard, "sha256": file_sha256(final)}
        )
        self._tar = self._stream = None

    def write(self, key: str, label: int, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``"png"``) to encoded bytes."""
        if self._tar is None:
            self._open_next()
        assert self._tar is not None
        self._tar.write({"__key__": key, "cls": str(label).encode(), **members})
        self.class_counts[label] += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def close(self, extra: dict[str, Any] | None = None, write_manifest: bool = True) -> dict[str, Any]:
        """Finish the last shard and (unless told not to) write the manifest; returns it."""
        if self._tar is not None:
            self._finish_shard()
        manifest = {
            "prefix": self.prefix,
            "num_samples": sum(shard["samples"] for shard in self.shards),
            "shards": self.shards,
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
            "preprocessing": self.preprocessing,
            **(extra or {}),
        }
        if write_manifest:
            write_manifest_file(self.out_dir, manifest)
        return manifest


def write_manifest_file(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically."""
    write_json_atomic(out_dir / MANIFEST, manifest)
