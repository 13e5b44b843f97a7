"""Writing webdataset shards, with a manifest, for every data set the trainer reads.

A sample is one tar member per field sharing a key: ``000042.png`` (or ``.jpg``, ``.moments.npy``)
holds the encoded data and ``000042.cls`` the class index as text. Each shard is written under a
temporary name and renamed when complete, so a crashed writer never leaves a shard that looks
finished. ``manifest.json`` beside the shards lists them with sample counts and checksums, the
class counts and how the samples were made; the loader reads it to find the shards.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from ..runtime.files import file_sha256
from .manifest import write_manifest_file


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ShardFile:
    """One shard being written: ``NAME.tar.tmp``, renamed to ``NAME.tar`` by :meth:`finish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream = self._tmp_path.open("wb")
        # A fixed member time (not the clock) makes shards byte-reproducible: a rerun or a redone
        # shard has the same checksum.
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=0)
        self.class_counts: Counter[int] = Counter()
        self.samples = 0

    @property
    def _tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def write(self, key: str, label: int, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``"png"``) to encoded bytes."""
        self._tar.write({"__key__": key, "cls": str(label).encode(), **members})
        self.class_counts[label] += 1
        self.samples += 1

    def finish(self) -> dict[str, Any]:
        """Close and rename the shard; returns its manifest entry (name, samples, sha256)."""
        self._tar.close()
        self._stream.close()
        os.replace(self._tmp_path, self.path)
        return {"name": self.path.name, "samples": self.samples, "sha256": file_sha256(self.path)}


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
        self._shard: ShardFile | None = None

    def _finish_shard(self) -> None:
        assert self._shard is not None
        self.shards.append(self._shard.finish())
        self.class_counts += self._shard.class_counts
        self._shard = None

    def write(self, key: str, label: int, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``"png"``) to encoded bytes."""
        if self._shard is None:
            self._shard = ShardFile(self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        self._shard.write(key, label, members)
        if self._shard.samples == self.samples_per_shard:
            self._finish_shard()

    def close(self, extra: dict[str, Any] | None = None, write_manifest: bool = True) -> dict[str, Any]:
        """Finish the last shard and (unless told not to) write the manifest; returns it."""
        if self._shard is not None:
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
