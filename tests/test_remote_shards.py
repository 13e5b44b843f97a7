"""Shards read from where clusters keep them: a real HTTP server on 127.0.0.1 (Range requests,
connections dropped part-way on purpose), pipe: commands, fsspec URLs. No mocks."""

from __future__ import annotations

import logging
import os
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from advdit.trainer.data import DataError, iter_records, resolve_shards
from advdit.trainer.loop import train

from helpers import free_port, tiny_config

NAMES = [f"train-{k:06d}.tar" for k in range(4)]


class ShardServer:
    """Serves the files of ``root``; ``cuts[name]`` lists, request by request, the byte of the
    file after which a GET of ``name`` drops the connection (None: serve it whole); ``refusals``
    lists, GET by GET, an HTTP error status to answer with instead."""

    def __init__(self, root: Path, ranges: bool = True) -> None:
        self.root, self.ranges = root, ranges
        self.cuts: dict[str, list[int | None]] = {}
        self.refusals: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str, int, int]] = []  # (method, name, first byte, status)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                owner.serve(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                owner.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def pattern(self) -> str:
        return self.url("train-{000000..000003}.tar")

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        name = handler.path.lstrip("/")
        path = self.root / name
        if not path.is_file():
            self.requests.append((handler.command, name, 0, 404))
            handler.send_error(404)
            return
        refused = self.refusals.get(name) if body else None
        if refused:
            self.requests.append((handler.command, name, 0, refused[0]))
            handler.send_error(refused.pop(0))
            return
        size = path.stat().st_size
        start, status = 0, 200
        asked = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if asked and self.ranges:
            start, status = int(asked.group(1)), 206
        handler.send_response(status)
        handler.send_header("Content-Length", str(size - start))
        handler.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        self.requests.append((handler.command, name, start, status))
        if not body:
            return
        planned = self.cuts.get(name)
        cut = planned.pop(0) if planned else None
        end = size if cut is None else max(cut, start)
        with path.open("rb") as source:  # in pieces: the server's memory is not the reader's
            source.seek(start)
            while start < end:
                piece = source.read(min(1 << 16, end - start))
                handler.wfile.write(piece)
                start += len(piece)
        handler.wfile.flush()
        if cut is not None:
            handler.close_connection = True  # the body ends before its Content-Length

    def gets(self, name: str) -> list[tuple[int, int]]:
        return [(start, status) for method, got, start, status in self.requests
                if method == "GET" and got == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(tiny_shards: Path) -> Iterator[ShardServer]:
    shards = ShardServer(tiny_shards)
    yield shards
    shards.close()


def plain(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "__url__"} for r in records]


def losses(result) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in result.history}


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path):
    """6 steps from the local files."""
    return train(tiny_config(tmp_path_factory.mktemp("local"), tiny_shards), progress=False)


def test_training_from_http_urls_equals_training_from_local_files(
        local_run, server: ShardServer, tmp_path: Path, tiny_shards: Path) -> None:
    result = train(tiny_config(tmp_path, tiny_shards, f"data.shards={server.pattern()}"), progress=False)
    assert_same_losses(losses(result), losses(local_run))
    assert {name for _, name, _, _ in server.requests} <= set(NAMES)
    assert result.history[-1]["data/skipped_shards"] == 0


def test_dropped_connections_are_resumed_by_range_and_a_resumed_run_equals_the_local_one(
        local_run, server: ShardServer, tmp_path: Path, tiny_shards: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    sizes = {name: (tiny_shards / name).stat().st_size for name in NAMES}
    for name in NAMES:  # each shard: dropped in the middle, then again further on
        server.cuts[name] = [sizes[name] // 3, 2 * sizes[name] // 3]
    caplog.set_level(logging.WARNING)
    overrides = [f"data.shards={server.pattern()}", "data.retry_backoff=0.01"]
    first = train(tiny_config(tmp_path, tiny_shards, *overrides, "train.steps=3"), progress=False)
    resumed = train(tiny_config(tmp_path, tiny_shards, *overrides), resume="auto", progress=False)
    assert resumed.step == 6
    assert_same_losses({**losses(first), **losses(resumed)}, losses(local_run))
    assert resumed.history[-1]["data/skipped_shards"] == 0
    # The first shard read was dropped twice and read on from the byte reached, with Range.
    dropped = [name for name in NAMES if server.gets(name)[:3] == [
        (0, 200), (sizes[name] // 3, 206), (2 * sizes[name] // 3, 206)]]
    assert dropped, server.requests
    assert "retry 1 of 3" in caplog.text


def test_loader_workers_resumed_mid_epoch_read_http_shards_as_local_files(
        server: ShardServer, tiny_shards: Path) -> None:
    from advdit.trainer.data import StreamSpec, build_loader, next_batch

    def keys(shards: list[str], start: int) -> list[list[str]]:
        spec = StreamSpec(shards=shards, seed=3, batch_size=8, shuffle_buffer=20, image_size=16,
                          num_classes=10, retry_backoff=0.0)
        batches = iter(build_loader(spec, 0, 1, num_workers=2, start_batch=start))
        return [next_batch(batches)["keys"] for _ in range(6)]

    for name in NAMES:
        server.cuts[name] = [(tiny_shards / name).stat().st_size // 2]
    local = keys(resolve_shards(str(tiny_shards)), 0)
    assert keys(resolve_shards(server.pattern()), 0) == local  # 2 worker processes, dropped reads
    assert any(status == 206 for *_, status in server.requests)  # a dropped read was resumed
    assert keys(resolve_shards(server.pattern()), 3)[:3] == local[3:]  # restarted after 3 batches


def test_retried_shards_yield_each_record_once_with_or_without_range_support(tiny_shards: Path) -> None:
    expected = plain(list(iter_records(resolve_shards(str(tiny_shards)))))
    for ranges in (True, False):
        shards = ShardServer(tiny_shards, ranges=ranges)
        try:
            for name in NAMES:
                size = (tiny_shards / name).stat().st_size
                shards.cuts[name] = [1000, size // 2, size - 700]  # in a header, a body, the end blocks
            skipped: list[str] = []
            got = plain(list(iter_records([shards.url(n) for n in NAMES], skipped, backoff=0.0)))
            assert got == expected and skipped == []
            statuses = {status for name in NAMES for _, status in shards.gets(name)}
            assert statuses == ({200, 206} if ranges else {200})
        finally:
            shards.close()


def test_server_errors_are_retried_and_client_errors_are_not(server: ShardServer, tiny_shards: Path) -> None:
    server.refusals = {NAMES[0]: [503, 500], NAMES[1]: [404]}  # HEAD still finds both
    urls = resolve_shards(server.pattern())[:2]
    skipped: list[str] = []
    got = plain(list(iter_records(urls, skipped, backoff=0.0)))
    assert got == plain(list(iter_records(resolve_shards(str(tiny_shards))[:1])))
    assert [status for _, status in server.gets(NAMES[0])] == [503, 500, 200]
    assert [status for _, status in server.gets(NAMES[1])] == [404]  # not retried: skipped at once
    assert len(skipped) == 1 and "HTTP 404" in skipped[0] and NAMES[1] in skipped[0]


def test_a_shard_failing_every_try_is_skipped_named_and_counted(
        server: ShardServer, tmp_path: Path, tiny_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = "train-000002.tar"
    server.cuts[bad] = [0] * 100  # the connection drops before the first byte, every time
    caplog.set_level(logging.WARNING)
    # 3 good shards of 80 make 6 batches of 40; the skip is reported with the next batch.
    cfg = tiny_config(tmp_path, tiny_shards, f"data.shards={server.pattern()}", "data.retries=2",
                      "data.retry_backoff=0.01", "data.batch_size=40", "data.shuffle_buffer=1",
                      "train.steps=7", "train.ckpt_every=7")
    result = train(cfg, progress=False)
    assert result.step == 7
    assert result.history[-1]["data/skipped_shards"] >= 1
    assert len(server.gets(bad)) >= 3  # the first try and 2 retries (a second epoch may add more)
    assert f"skipping unreadable shard data: {server.url(bad)}" in caplog.text
    assert "after 2 retries" in caplog.text


def test_records_partly_read_before_the_last_try_stand_and_are_not_repeated(
        server: ShardServer, tiny_shards: Path) -> None:
    size = (tiny_shards / NAMES[0]).stat().st_size
    server.cuts[NAMES[0]] = [size // 2] * 10
    skipped: list[str] = []
    got = list(iter_records([server.url(NAMES[0])], skipped, retries=2, backoff=0.0))
    local = list(iter_records([str(tiny_shards / NAMES[0])]))
    assert 0 < len(got) < len(local) and plain(got) == plain(local)[:len(got)]
    assert len(skipped) == 1 and server.url(NAMES[0]) in skipped[0]


def test_pipe_cat_reads_the_records_of_the_file(tiny_shards: Path) -> None:
    paths = resolve_shards(str(tiny_shards))
    piped = resolve_shards(f"pipe:cat {tiny_shards}/train-{{000000..000003}}.tar")
    assert piped == [f"pipe:cat {path}" for path in paths]
    skipped: list[str] = []
    assert plain(list(iter_records(piped, skipped))) == plain(list(iter_records(paths)))
    assert skipped == []


def test_a_pipe_left_part_read_is_ended_with_what_it_started(tiny_shards: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "sleep.pid"
    start = time.monotonic()
    records = iter_records([f"pipe:sleep 60 & echo $! > {pidfile}; cat {tiny_shards / NAMES[0]}; wait"])
    next(records)  # delivered as the bytes arrive, though the sleep keeps the pipe open
    records.close()  # the reader stops early: the shell and the sleep it started are ended
    pid = int(pidfile.read_text())
    deadline = start + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"the pipe's child process {pid} still runs")


def member_boundary(path: Path, index: int) -> int:
    """The byte after the ``index``-th member's (padded) body."""
    with tarfile.open(path) as archive:
        member = archive.getmembers()[index]
    return member.offset_data + (member.size + 511) // 512 * 512


def test_a_failing_pipe_command_is_never_taken_for_a_short_shard(tiny_shards: Path) -> None:
    path = tiny_shards / NAMES[0]
    cut = member_boundary(path, 19)  # after 10 complete samples (a .cls and a .png each)
    # Without the exit status, the cut-off output reads as a complete shard of 10 samples.
    assert len(list(iter_records([f"pipe:head -c {cut} {path}"]))) == 10
    skipped: list[str] = []
    failing = f"pipe:head -c {cut} {path}; echo gone >&2; exit 3"
    records = list(iter_records([failing], skipped, retries=1, backoff=0.0))
    assert len(skipped) == 1
    assert "exited with status 3" in skipped[0] and "gone" in skipped[0]
    assert len(records) <= 10  # what was read stands; the shard is counted as skipped


def test_a_missing_url_is_a_clear_error_before_training(
        server: ShardServer, tmp_path: Path, tiny_shards: Path) -> None:
    pattern = server.url("train-{000000..000005}.tar")
    with pytest.raises(DataError, match=r"train-000004\.tar' does not exist \(2 missing"):
        resolve_shards(pattern)
    with pytest.raises(DataError, match=r"train-000004\.tar' does not exist"):
        train(tiny_config(tmp_path / "run", tiny_shards, f"data.shards={pattern}"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert all(method == "HEAD" for method, *_ in server.requests)  # nothing read before the check
    asked = len(server.requests)
    assert len(resolve_shards(pattern, check_remote=False)) == 6  # the other ranks: not asked again
    assert len(server.requests) == asked


def test_fsspec_urls_are_read_and_a_missing_backend_names_the_extra(tiny_shards: Path) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    for name in NAMES[:2]:
        memory.pipe(f"/advdit-test/{name}", (tiny_shards / name).read_bytes())
    urls = resolve_shards("memory://advdit-test/train-{000000..000001}.tar")
    assert plain(list(iter_records(urls))) == plain(list(iter_records(resolve_shards(str(tiny_shards))[:2])))
    with pytest.raises(DataError, match=r"memory://advdit-test/train-000009\.tar' does not exist"):
        resolve_shards("memory://advdit-test/train-000009.tar")
    with pytest.raises(DataError, match=r"gcs.*pip install 'advdit\[remote\]'"):
        resolve_shards("gs://bucket/train-{000000..000001}.tar")  # gcsfs is not installed here
    with pytest.raises(DataError, match=r"no fsspec backend knows the scheme nosuchscheme://"):
        resolve_shards("nosuchscheme://bucket/train-000000.tar")


def test_advdit_data_imagenet_and_latents_read_http_sources_as_local_files(
        tmp_path: Path, tiny_shards: Path, tiny_vae_dir: Path) -> None:
    from advdit.trainer.data.imagenet import write_imagenet_shards
    from advdit.trainer.data.latents import write_latent_shards

    def files(out: Path) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}

    shards = ShardServer(tiny_shards)
    try:
        for name in NAMES:
            shards.cuts[name] = [5000]  # the listing's first read of each tar is dropped
        made = {}
        for where, source in (("local", f"{tiny_shards}/train-{{000000..000003}}.tar"),
                              ("http", shards.pattern())):
            made[where] = write_imagenet_shards(source, tmp_path / where, size=16, samples_per_shard=100,
                                                workers=1, progress=False)
            assert made[where]["num_samples"] == 320
        assert files(tmp_path / "http") == files(tmp_path / "local")
        ranged = [(name, start) for method, name, start, status in shards.requests if status == 206]
        assert len(ranged) >= 320  # each image read by a worker with its own Range request
        for where, source in (("local", str(tiny_shards)), ("http", shards.pattern())):
            write_latent_shards(source, tmp_path / f"latents-{where}", str(tiny_vae_dir), 16,
                                batch_size=40, progress=False)
        assert files(tmp_path / "latents-http") == files(tmp_path / "latents-local")
    finally:
        shards.close()
    with pytest.raises(DataError, match="pipe: command cannot"):
        write_imagenet_shards(f"pipe:cat {tiny_shards}/train-000000.tar", tmp_path / "pipe", size=16,
                              progress=False)


def test_reference_statistics_from_http_shards_equal_those_of_the_local_files(
        server: ShardServer, tmp_path: Path, tiny_shards: Path) -> None:
    import torch

    from advdit.trainer.evaluation.fid import ConvFeatureNet, shard_stats

    from helpers import TINY_SPEC

    torch.manual_seed(0)
    net = ConvFeatureNet(TINY_SPEC).eval()
    local = shard_stats(str(tiny_shards), 16, net, TINY_SPEC, tmp_path / "local", num_workers=0)
    remote = shard_stats(server.pattern(), 16, net, TINY_SPEC, tmp_path / "http", num_workers=0)
    assert remote.meta["images"] == local.meta["images"] == 320
    assert remote.meta["shards"][0] == [server.url(NAMES[0]), (tiny_shards / NAMES[0]).stat().st_size]
    torch.testing.assert_close(torch.as_tensor(remote.mu), torch.as_tensor(local.mu))
    torch.testing.assert_close(torch.as_tensor(remote.sigma), torch.as_tensor(local.sigma))


def test_memory_is_bounded_by_the_largest_member_not_the_shard(tmp_path: Path) -> None:
    import tracemalloc

    from advdit.trainer.data.writer import ShardWriter

    writer = ShardWriter(tmp_path / "big", samples_per_shard=1000)
    for index in range(24):  # a 24 MiB shard of 1 MiB members
        writer.write(f"{index:06d}", index, {"npy": os.urandom(1 << 20)})
    writer.close()
    shard = tmp_path / "big" / "train-000000.tar"
    shards = ShardServer(tmp_path / "big")
    try:
        for source in (str(shard), shards.url(shard.name), f"pipe:cat {shard}"):
            tracemalloc.start()
            count = sum(1 for _ in iter_records([source]))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert count == 24
            assert peak < 6 * (1 << 20), (source, peak)  # the 1 MiB buffer and a member or two
    finally:
        shards.close()


def test_reference_statistics_are_not_made_from_part_of_the_shards(
        server: ShardServer, tmp_path: Path, tiny_shards: Path) -> None:
    import torch

    from advdit.trainer.evaluation.fid import ConvFeatureNet, FidError, shard_stats

    from helpers import TINY_SPEC

    server.cuts[NAMES[1]] = [5000] * 10  # every try of one shard is dropped
    net = ConvFeatureNet(TINY_SPEC).eval()
    torch.manual_seed(0)
    with pytest.raises(FidError, match=r"cannot be read to the end: .*train-000001\.tar"):
        shard_stats(server.pattern(), 16, net, TINY_SPEC, tmp_path / "cache", num_workers=0,
                    retries=1, retry_backoff=0.0)
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_latent_shards_list_an_input_shard_read_only_in_part(tmp_path: Path, tiny_shards: Path,
                                                             tiny_vae_dir: Path) -> None:
    from advdit.trainer.data.latents import write_latent_shards

    source = tmp_path / "source"
    source.mkdir()
    data = (tiny_shards / NAMES[0]).read_bytes()
    cut = member_boundary(tiny_shards / NAMES[0], 19) + 700  # inside the 11th sample
    (source / NAMES[0]).write_bytes(data[:cut])  # as a source failing every retry leaves it
    manifest = write_latent_shards(str(source), tmp_path / "latents", str(tiny_vae_dir), 16, batch_size=40,
                                   progress=False)
    assert manifest["num_samples"] == 9  # the 10th, still open when the damage is met, is dropped
    assert any("the rest of the shard" in entry and NAMES[0] in entry for entry in manifest["skipped"])
