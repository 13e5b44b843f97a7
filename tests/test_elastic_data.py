"""The data rule of an elastic resume (trainer/data/layout.py), on real shards through the real
loader: after a change of world size, every old stream's current epoch is finished with no record
seen twice and none skipped, and the new layout resumes exactly."""

from __future__ import annotations

from collections import Counter

import pytest

from advdit.trainer.data import StreamSpec, build_loader, resolve_shards
from advdit.trainer.data.layout import DataPosition, rebase

from helpers import write_shape_shards

BATCH = 4
PER_SHARD = 4
SHARDS = 12


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> StreamSpec:
    folder = write_shape_shards(tmp_path_factory.mktemp("shards"), SHARDS * PER_SHARD, PER_SHARD)
    return StreamSpec(shards=resolve_shards(str(folder)), seed=3, batch_size=BATCH, shuffle_buffer=6,
                      image_size=16, num_classes=10, random_flip=False)


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
