"""Small file helpers shared by checkpoints, shard writers and run logs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

HASH_CHUNK = 1 << 24


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename: a reader sees the old file or the new one whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
