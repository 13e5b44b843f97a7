"""Which shards make a data set: ``manifest.json`` beside them (written by the shard writers),
else the ``*.tar`` files of a folder, a brace pattern / glob, or a list; or remote sources
(``http(s)://``, ``pipe:COMMAND``, fsspec URLs such as ``s3://``), brace-expanded, no manifest
needed."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import braceexpand

from ..runtime.files import write_json_atomic
from .errors import DataError
from .sources import check_sources, is_remote

MANIFEST = "manifest.json"


def resolve_shards(spec: str | list[str], check_remote: bool = True) -> list[str]:
    """Shard paths or URLs from a directory, a brace pattern / glob, a remote brace pattern, or a
    list; each must exist (pipe: commands are not run to check; remote shards only where
    ``check_remote``, so that one process of a large job asks the server, not all of them)."""
    if isinstance(spec, list):
        paths = [str(p) for p in spec]
        paths = [u for p in paths for u in (braceexpand.braceexpand(p) if is_remote(p) else [p])]
    elif is_remote(spec):
        paths = list(braceexpand.braceexpand(spec))
    else:
        path = Path(spec)
        if path.is_dir():
            manifest = path / MANIFEST
            if manifest.is_file():
                shards = json.loads(manifest.read_text())["shards"]
                paths = [str(path / shard["name"]) for shard in shards]
            else:
                paths = sorted(glob.glob(str(path / "*.tar")))
            if not paths:
                raise DataError(
                    f"shard directory {str(path)!r} holds no {MANIFEST} and no *.tar files; "
                    "expected webdataset shards (make them with `advdit data demo` or "
                    "`advdit data imagenet`)"
                )
        else:
            paths = sorted(p for pattern in braceexpand.braceexpand(spec) for p in glob.glob(pattern))
            if not paths:
                raise DataError(
                    f"data.shards {spec!r} matches no file; expected a shard directory, a brace "
                    "pattern such as 'data/train-{000000..000007}.tar', or a list of .tar paths"
                )
    if any(is_remote(p) for p in paths):
        if check_remote:
            check_sources(paths)
        return paths
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"shard file {missing[0]!r} does not exist ({len(missing)} missing in all)")
    return paths


def check_manifest(spec: str | list[str], image_size: int) -> None:
    """Compare a shard directory's manifest with the configured image size, before any training.

    Without this, a mismatch would surface only as every sample being "corrupt".
    """
    manifest = Path(spec) / MANIFEST if isinstance(spec, str) and not is_remote(spec) else None
    if manifest is None or not manifest.is_file():
        return
    made_at = json.loads(manifest.read_text()).get("preprocessing", {}).get("image_size")
    if made_at is not None and made_at != image_size:
        raise DataError(
            f"shards in {str(manifest.parent)!r} hold {made_at}x{made_at} images ({MANIFEST}), but "
            f"data.image_size is {image_size}; rewrite the shards or set data.image_size={made_at}"
        )


def write_manifest_file(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically: a reader never sees half of one."""
    write_json_atomic(out_dir / MANIFEST, manifest)
