"""Reading webdataset shards: a tar reader of its own and the grouping of members into samples.

A sample is the run of neighbouring members that share a key (the name up to the first dot of its
last component, as webdataset groups them); the rest of the name, lower-cased, is the field.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard that cannot be read on (empty, not a tar, truncated); its earlier records stand."""


def _tar_size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes beyond the octal field's range
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ") or b"0", 8)


def _header_checksum_ok(header: bytes) -> bool:
    """The tar header checksum: the byte sum with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _pax_path(body: bytes) -> str | None:
    """The ``path`` record of a PAX extended header ("<len> path=<value>\n" lines)."""
    for line in body.split(b"\n"):
        _, _, record = line.partition(b" ")
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode()
    return None


def _member_header(data: memoryview, offset: int, path: str) -> tuple[bytes, int] | None:
    """(header, body size) of the member at ``offset``; None at the end of the archive."""
    if offset == len(data) and offset:
        return None  # ends after a complete member, without the end-of-archive blocks
    if offset + 512 > len(data):
        what = f"is truncated at byte {len(data)} (inside a header)" if len(data) else "is empty (0 bytes)"
        raise ShardError(f"{path} {what}")
    header = bytes(data[offset:offset + 512])
    if not header.strip(b"\0"):
        return None  # the end-of-archive blocks
    if not _header_checksum_ok(header):
        raise ShardError(f"{path} has no valid tar header at byte {offset} (not a tar file, or damaged)")
    try:
        size = _tar_size(header[124:136])
    except ValueError as err:
        raise ShardError(f"{path}: the tar header at byte {offset} has a non-octal size field") from err
    if offset + 512 + size > len(data):
        raise ShardError(f"{path} is truncated at byte {len(data)} (inside a member of {size} bytes)")
    return header, size


def tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar archive, in order; a ShardError where it cannot
    be read on (the members before it are yielded).

    A reader of its own rather than ``tarfile``: it parses the 512-byte headers of a file read at
    once, several times faster per member, which is what keeps small-member shards (latents)
    from being loader-bound. PAX and GNU long names are understood; other entries are skipped.
    """
    data = memoryview(Path(path).read_bytes())
    offset, long_name = 0, None
    while (found := _member_header(data, offset, path)) is not None:
        header, size = found
        kind = header[156:157]
        body = data[offset + 512:offset + 512 + size]
        offset += 512 + (size + 511) // 512 * 512
        if kind == b"x":
            long_name = _pax_path(bytes(body))
        elif kind == b"L":
            long_name = bytes(body).rstrip(b"\0").decode()
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), bytes(body)
            long_name = None


def split_member_name(name: str) -> tuple[str, str | None]:
    """(key, lower-cased extension) of a member name, the key running to the first dot of the base
    name; the extension is None where the base name has no dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, extension.lower() if dot else None


def iter_records(paths: list[str], skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes keyed by extension, plus ``__key__`` and ``__url__``).

    Members sharing a key and standing next to each other form one sample. A shard that cannot be
    read (on) is named in a warning and in ``skipped``; its readable records before the damage are
    kept.
    """
    for path in paths:
        record: dict[str, Any] = {}
        try:
            for name, payload in tar_members(path):
                key, extension = split_member_name(name)
                if extension is None or key.rpartition("/")[2].startswith("__"):
                    continue  # no extension, or webdataset's metadata members
                if record and record["__key__"] != key:
                    yield record
                    record = {}
                if not record:
                    record = {"__key__": key, "__url__": path}
                record[extension] = payload
        except (ShardError, OSError, UnicodeDecodeError) as err:
            logger.warning("skipping unreadable shard data: %s", err)
            if skipped is not None:
                skipped.append(str(err))
            continue  # the record being assembled may be incomplete: dropped
        if record:
            yield record
