"""The data rule of an elastic resume (trainer/data/layout.py), on real shards through the real
loader: after a change of world size, every old stream's current epoch is finished with no record
seen twice and none skipped, and the new layout resumes exactly."""

from __future__ import annotations

from collections import Counter

import pytest

from advdit.trainer.data import StreamSpec, build_loader, resolve_shards
from advdit.trainer.data.layout import DataPosition, rebase
from advdit.trainer.data.stream import consumed_batches

from helpers import write_shape_shards

BATCH = 4
PER_SHARD = 4
SHARDS = 12


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> StreamSpec:
    folder = write_shape_shards(tmp_path_factory.mktemp("shards"), SHARDS * PER_SHARD, PER_SHARD)
    return StreamSpec(shards=resolve_shards(str(folder)), seed=3, batch_size=BATCH, shuffle_buffer=6,
                      image_size=16, num_classes=10)


def batches(spec: StreamSpec, rank: int, world: int, workers: int, count: int, start: int = 0,
            position: DataPosition | None = None) -> list[list[str]]:
    loader = iter(build_loader(spec, rank, world, workers, start, position))
    return [next(loader)["keys"] for _ in range(count)]


def shard_keys(spec: StreamSpec, stream: int, streams: int) -> set[str]:
    """The keys of the shards one stream owns (shard i holds samples i*4 .. i*4+3)."""
    owned = range(stream, SHARDS, streams)
    return {f"{index:06d}" for shard in owned for index in range(shard * PER_SHARD, (shard + 1) * PER_SHARD)}


@pytest.mark.parametrize(("world", "workers", "steps", "new_world"),
                         [(2, 2, 3, 1), (2, 2, 7, 3), (1, 2, 5, 2)])
def test_after_a_world_size_change_each_stream_finishes_its_epoch_exactly_once(
        spec: StreamSpec, world: int, workers: int, steps: int, new_world: int) -> None:
    streams = world * workers
    epoch = {stream: len(shard_keys(spec, stream, streams)) for stream in range(streams)}
    # What each old stream put into the first `steps` batches of its rank (batch k: stream k mod W).
    consumed: dict[int, list[str]] = {stream: [] for stream in range(streams)}
    for rank in range(world):
        for k, keys in enumerate(batches(spec, rank, world, workers, steps)):
            consumed[rank * workers + k % workers] += keys
    position = rebase(spec, DataPosition(world, workers, BATCH), steps, new_world, 1)
    assert position.layout_id == 1 and position.base_step == steps
    # The new streams read the remainder first: its records, then their own epochs.
    inherited: list[str] = []
    for rank in range(new_world):
        share = len(position.share(rank))
        first = batches(spec, rank, new_world, 1, -(-share // BATCH), 0, position)
        read = [key for keys in first for key in keys]
        inherited += read[:share]
    assert sorted(inherited) == sorted(key for _, key, _ in position.remainder)
    assert len(set(inherited)) == len(inherited)  # nothing twice
    for stream in range(streams):
        done = len(consumed[stream]) % epoch[stream]
        current = consumed[stream][len(consumed[stream]) - done:]  # this epoch's records so far
        left = {key for shard, key, _ in position.remainder if key in shard_keys(spec, stream, streams)}
        if done:  # finished exactly once: what it had read of the epoch, and the rest
            assert Counter(current) + Counter(left) == Counter(shard_keys(spec, stream, streams)), stream
        else:  # at an epoch boundary nothing is left over
            assert not left


def test_the_new_layout_resumes_exactly(spec: StreamSpec) -> None:
    position = rebase(spec, DataPosition(2, 2, BATCH), 3, 1, 2)
    whole = batches(spec, 0, 1, 2, 8, 0, position)
    assert batches(spec, 0, 1, 2, 3, 5, position) == whole[5:]


def resized(spec: StreamSpec, batch: int) -> StreamSpec:
    return StreamSpec(**{**vars(spec), "batch_size": batch})


def global_batches(spec: StreamSpec, world: int, workers: int, count: int, start: int = 0,
                   position: DataPosition | None = None) -> list[list[str]]:
    """The keys of ``count`` global batches (rank 0's batch, then rank 1's, ...) of a layout."""
    per_rank = [batches(spec, rank, world, workers, count, start, position) for rank in range(world)]
    return [[key for rank in per_rank for key in rank[g]] for g in range(count)]


@pytest.mark.parametrize(("old", "new"), [((2, 1, 4), (1, 1, 8)), ((2, 1, 4), (1, 2, 8)),
                                          ((1, 2, 8), (2, 1, 4)), ((2, 2, 4), (4, 1, 2))])
def test_with_the_same_global_batch_the_new_layout_continues_the_old_one_batch_for_batch(
        spec: StreamSpec, old: tuple[int, int, int], new: tuple[int, int, int]) -> None:
    """(world, workers, batch per rank) -> another layout with the same global batch, after 2
    steps: while every old stream has whole batches of its epoch left, the new layout's global
    batches hold the old one's keys in the same places."""
    (world, workers, batch), steps = old, 2
    left = [SHARDS * PER_SHARD // (world * workers) // batch - consumed_batches(steps, local, workers)
            for local in range(workers)]  # whole batches each rank's stream `local` has left
    agree = 0
    while left[(steps + agree) % workers]:
        left[(steps + agree) % workers] -= 1
        agree += 1
    assert agree >= 3
    expected = global_batches(resized(spec, batch), world, workers, steps + agree)[steps:]
    position = rebase(resized(spec, new[2]), DataPosition(world, workers, batch), steps, new[0], new[1])
    assert global_batches(resized(spec, new[2]), new[0], new[1], agree, 0, position) == expected
