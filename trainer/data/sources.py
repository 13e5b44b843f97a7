"""Where shards are read from, opened as byte streams: local files, ``http(s)://`` URLs,
``pipe:COMMAND`` (webdataset's convention: COMMAND writes the tar to stdout) and the other URL
schemes (``s3://``, ``gs://``, ...) through fsspec, the optional ``remote`` extra.

A stream that fails part-way (a connection reset, an HTTP body shorter than its Content-Length, a
pipe command that exits non-zero) is opened again at the byte it had reached (an HTTP Range
request, a seek, or a re-read that skips the bytes already delivered) after an exponential
backoff, a bounded number of times; the tar reader above it sees one unbroken stream, so no
record is delivered twice. After the last try the stream raises a ShardError, which the record
reader turns into a skipped shard (named in a warning and counted).
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from .errors import DataError, ShardError

logger = logging.getLogger(__name__)

REMOTE_EXTRA = "pip install 'advdit[remote]'"
CHUNK = 1 << 20  # bytes asked of a remote source at a time (the tar reader's buffer)
TIMEOUT = 60.0  # seconds a connection may stall before it counts as failed (and is retried)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class SourceError(OSError):
    """A read that failed part-way and may succeed when tried again."""


def kind_of(url: str) -> str:
    """"local", "http", "pipe" or "fsspec"."""
    if url.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(url)
    if match is None or match.group(1).lower() == "file":
        return "local"
    return "http" if match.group(1).lower() in ("http", "https") else "fsspec"


def is_remote(url: str) -> bool:
    return kind_of(url) != "local"


def local_path(url: str) -> str:
    return url[len("file://"):] if url.lower().startswith("file://") else url


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a URL; a DataError naming the extra when it cannot be had."""
    scheme = url.split("://", 1)[0]
    try:
        import fsspec.core
    except ImportError as err:
        raise DataError(f"reading {url!r} needs fsspec, which is not installed: {REMOTE_EXTRA}") from err
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise DataError(f"reading {scheme}:// shards ({url!r}) needs fsspec's backend for {scheme}, "
                        f"which is not installed ({err}): {REMOTE_EXTRA}") from err
    except ValueError as err:
        raise DataError(f"no fsspec backend knows the scheme {scheme}:// of {url!r} ({err}); "
                        f"{REMOTE_EXTRA} brings s3:// and gs://, other schemes need their fsspec "
                        "package") from err


# ------------------------------------------------------------------ one attempt at a stream

class _Stream(Protocol):
    def read(self, size: int) -> bytes: ...
    def close(self) -> None: ...


class _HttpStream:
    """A GET from ``offset`` on; a body that ends before its announced length raises SourceError
    (http.client itself reads that as a normal end)."""

    def __init__(self, url: str, offset: int) -> None:
        self.url = url
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            self.response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                                   timeout=TIMEOUT)
        except urllib.error.HTTPError as err:
            if err.code in (408, 425, 429) or err.code >= 500:
                raise SourceError(f"{url}: HTTP {err.code} {err.reason}") from err
            raise ShardError(f"{url}: HTTP {err.code} {err.reason}") from err
        length = self.response.headers.get("Content-Length")
        self.remaining = int(length) if length is not None else None
        if offset and self.response.status == 206:
            content_range = self.response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                self.close()
                raise SourceError(f"{url}: asked for bytes {offset}- and got Content-Range {content_range!r}")
        elif offset:  # the server ignored the Range header: skip what was delivered before
            _skip(self, offset, url)

    def read(self, size: int) -> bytes:
        data = self.response.read1(size)  # what has arrived (read() would wait for all of size)
        if data:
            if self.remaining is not None:
                self.remaining -= len(data)
            return data
        if self.remaining:
            raise SourceError(f"{self.url}: the connection ended {self.remaining} bytes before the "
                              "end of the response")
        return data

    def close(self) -> None:
        self.response.close()


class _PipeStream:
    """COMMAND's stdout; its exit status is checked at the end, so a failed command is never read
    as a short shard."""

    def __init__(self, url: str, offset: int) -> None:
        self.command = url[len("pipe:"):]
        self.errors = tempfile.TemporaryFile()
        # A session of its own: closing the stream early ends the shell and what it started.
        self.process = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE,
                                        stderr=self.errors, stdin=subprocess.DEVNULL, start_new_session=True)
        self.delivered = 0
        if offset:
            _skip(self, offset, url)

    def read(self, size: int) -> bytes:
        data = self.process.stdout.read1(size)
        self.delivered += len(data)
        if data:
            return data
        status = self.process.wait()
        if status != 0:
            self.errors.seek(0)
            tail = self.errors.read()[-500:].decode(errors="replace").strip()
            raise SourceError(f"pipe command {self.command!r} exited with status {status} after "
                              f"{self.delivered} bytes" + (f": {tail}" if tail else ""))
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process.stdout.close()
        self.errors.close()


class _FileStream:
    def __init__(self, handle: Any, offset: int) -> None:
        self.handle = handle
        if offset:
            handle.seek(offset)

    def read(self, size: int) -> bytes:
        return self.handle.read(size)

    def close(self) -> None:
        self.handle.close()


def _skip(stream: _Stream, count: int, url: str) -> None:
    while count:
        data = stream.read(min(count, CHUNK))
        if not data:
            raise SourceError(f"{url} ended before byte {count} on a re-read")
        count -= len(data)


def open_at(url: str, offset: int = 0) -> _Stream:
    """One attempt at reading ``url`` from byte ``offset``."""
    kind = kind_of(url)
    if kind == "http":
        return _HttpStream(url, offset)
    if kind == "pipe":
        return _PipeStream(url, offset)
    if kind == "fsspec":
        fs, path = _filesystem(url)
        return _FileStream(fs.open(path, "rb"), offset)
    return _FileStream(open(local_path(url), "rb"), offset)  # noqa: SIM115 - closed by its owner


# ------------------------------------------------------------------ retries

RETRYABLE = (OSError, http.client.HTTPException)


class RetryingReader(io.RawIOBase):
    """The bytes of ``url`` as one stream; failures are retried at the byte reached, at most
    ``retries`` times for the whole stream, after ``backoff * 2**k`` seconds (k = 0, 1, ...)."""

    def __init__(self, url: str, retries: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        self.url, self.retries, self.backoff, self.sleep = url, retries, backoff, sleep
        self.position = 0
        self.failures = 0
        self._stream: _Stream | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            try:
                if self._stream is None:
                    self._stream = open_at(self.url, self.position)
                data = self._stream.read(len(buffer))
            except FileNotFoundError as err:
                self._drop()
                raise ShardError(f"{self.url}: {err}") from err
            except RETRYABLE as err:
                self._drop()
                self.failures += 1
                if self.failures > self.retries:
                    raise ShardError(f"{self.url}: {err} (gave up at byte {self.position} after "
                                     f"{self.retries} retries)") from err
                delay = self.backoff * 2 ** (self.failures - 1)
                logger.warning("reading %s failed at byte %d (%s); retry %d of %d in %.1f s", self.url,
                               self.position, err, self.failures, self.retries, delay)
                self.sleep(delay)
                continue
            buffer[:len(data)] = data
            self.position += len(data)
            return len(data)

    def finish(self) -> None:
        """Read to the end (the tar's trailing blocks), so a pipe's exit status is checked."""
        while self.readinto(bytearray(CHUNK)):
            pass

    def _drop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, retries: int = 3, backoff: float = 1.0) -> io.BufferedReader:
    """A buffered, retrying byte stream of ``url``; ``.raw`` is the RetryingReader."""
    return io.BufferedReader(RetryingReader(url, retries, backoff), buffer_size=CHUNK)


def read_range(url: str, offset: int, length: int, retries: int = 3, backoff: float = 1.0) -> bytes:
    """``length`` bytes of ``url`` from ``offset`` (a Range request, a seek), with retries; a
    ShardError if the source ends before. Not for pipe: sources (each call would rerun the
    command and read up to ``offset``)."""
    if kind_of(url) == "pipe":
        raise DataError(f"{url!r}: a pipe: source can only be read from its start")
    reader = RetryingReader(url, retries, backoff)
    reader.position = offset
    with reader:
        data = bytearray(length)
        view, filled = memoryview(data), 0
        while filled < length:
            count = reader.readinto(view[filled:])
            if not count:
                raise ShardError(f"{url} ends before byte {offset + length}")
            filled += count
    return bytes(data)


# ------------------------------------------------------------------ before training

def _exists(url: str) -> bool | None:
    """Whether ``url`` exists; None where that cannot be asked cheaply (pipe:)."""
    kind = kind_of(url)
    if kind == "pipe":
        return None
    if kind == "local":
        return Path(local_path(url)).is_file()
    if kind == "fsspec":
        fs, path = _filesystem(url)
        return bool(fs.exists(path))
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT):
            return True
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            return False
        if err.code not in (403, 405, 501):  # HEAD refused: ask for the first byte instead
            raise DataError(f"shard {url!r} cannot be checked: HTTP {err.code} {err.reason}") from err
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-0"}),
                                    timeout=TIMEOUT):
            return True
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            return False
        raise DataError(f"shard {url!r} cannot be checked: HTTP {err.code} {err.reason}") from err


def check_sources(urls: list[str]) -> None:
    """A DataError naming the first missing shard (pipe: sources are not checked: only running the
    command would tell)."""
    def exists(url: str) -> bool | None:
        try:
            return _exists(url)
        except (OSError, http.client.HTTPException) as err:
            raise DataError(f"shard {url!r} cannot be reached: {err}") from err

    with ThreadPoolExecutor(max_workers=min(16, max(len(urls), 1))) as pool:
        found = list(pool.map(exists, urls))
    missing = [url for url, ok in zip(urls, found, strict=True) if ok is False]
    if missing:
        raise DataError(f"shard {missing[0]!r} does not exist ({len(missing)} missing in all)")


def source_sizes(urls: list[str]) -> list[int | None]:
    """:func:`source_size` of each URL, asked in parallel."""
    with ThreadPoolExecutor(max_workers=min(16, max(len(urls), 1))) as pool:
        return list(pool.map(source_size, urls))


def source_size(url: str) -> int | None:
    """The size in bytes of a shard where it is known without reading it (None for pipe:)."""
    kind = kind_of(url)
    if kind == "local":
        return Path(local_path(url)).stat().st_size
    if kind == "fsspec":
        fs, path = _filesystem(url)
        return fs.size(path)
    if kind == "http":
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else None
    return None
