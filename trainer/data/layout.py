"""Where the data stream stands, and how it carries over to another number of processes.

A *layout* is the number of processes times loader workers per process: the logical streams of
the stream module (``G = world_size x num_workers``; stream ``g`` reads shards ``g, g + G, ...``).
Within one layout the position is a single number, the batches each rank has consumed since the
layout began, and a resume is exact.

When a run resumes with another layout (more or fewer nodes, other ``data.num_workers``), the
position is *re-based*: every old stream finishes the epoch it was in. The records of that epoch
it had not yet put into a consumed batch (its *remainder*) are found by replaying its order (the
same seeded shard order and shuffle, reading the records but decoding nothing; the processes
share the replay out). The remainders are put in the order the old layout would have consumed
them: global batch after global batch, each the ranks' next batches in rank order (``global_order``).
The new layout cuts that list into its own global batches, in order, rank ``r`` taking its rows of
each (``DataPosition.share``), and then starts epochs of its own, seeded with the layout's number
so they differ from the old layout's. So no record of a stream's current epoch is seen twice and
none is skipped; and while the old streams had whole batches left, a global batch of the new
layout holds the records the old layout's would have held, in the same places, whenever the
global batch size is the same (e.g. 2 x 16 -> 1 x 32): with the trainer's per-place random draws,
the continued run computes the losses the uninterrupted run would have. Later epochs follow the
new layout. The remainder is stored in the checkpoint, so a second resume, with the same or yet
another layout, is handled the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .stream import StreamSpec, consumed_batches, epoch_records, stream_shards
from .tar import iter_records

# (shard index in the run's shard list, sample key, the sample's position in its shard)
Entry = tuple[int, str, int]


@dataclass
class DataPosition:
    """The layout the stream runs in, the step at which it began, and the records left over from
    the layouts before it (read before the new streams' own epochs)."""

    world_size: int
    num_workers: int
    batch_size: int  # per rank: what a consumed batch held
    base_step: int = 0
    layout_id: int = 0  # 0: the run's first layout; +1 at every re-base
    shards_digest: str = ""  # of the shard list the entries index into
    remainder: list[Entry] = field(default_factory=list)

    @property
    def streams(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def same_layout(self, world_size: int, num_workers: int) -> bool:
        return (self.world_size, max(self.num_workers, 1)) == (world_size, max(num_workers, 1))

    def share(self, stream_id: int) -> list[Entry]:
        """Stream ``stream_id``'s part of the remainder, in the order it reads it: the remainder is
        cut into global batches of ``world_size x batch_size``; global batch ``g`` is rank batch
        ``g`` of every rank, which comes from the rank's stream ``g mod workers``."""
        per_rank = max(self.num_workers, 1)
        rank, local = divmod(stream_id, per_rank)
        width = self.world_size * self.batch_size
        mine: list[Entry] = []
        for start in range(local * width + rank * self.batch_size, len(self.remainder), per_rank * width):
            mine += self.remainder[start:start + self.batch_size]
        return mine

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "remainder": [list(entry) for entry in self.remainder]}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> DataPosition:
        return cls(**{**state, "remainder": [tuple(entry) for entry in state.get("remainder", [])]})


def shards_digest(shards: list[str]) -> str:
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def indexed_records(paths: list[str], shard_index: dict[str, int], retries: int = 3,
                    backoff: float = 1.0) -> Iterator[dict[str, Any]]:
    """The records of ``paths`` with their shard's index and their position in it."""
    counts: dict[str, int] = {}
    for record in iter_records(paths, None, retries, backoff):
        url = record["__url__"]
        record["__shard__"], record["__index__"] = shard_index[url], counts.get(url, 0)
        counts[url] = counts.get(url, 0) + 1
        yield record


def _entry(record: dict[str, Any]) -> Entry:
    return record["__shard__"], record["__key__"], record["__index__"]


def stream_remainder(spec: StreamSpec, position: DataPosition, stream_id: int, consumed: int) -> list[Entry]:
    """The records of stream ``stream_id``'s current epoch (or of its share of the remainder, which
    belongs to the epoch before) not among its first ``consumed`` records."""
    share = position.share(stream_id)
    if consumed < len(share):
        return share[consumed:]
    consumed -= len(share)
    shards = stream_shards(spec.shards, stream_id, position.streams)
    index = {url: spec.shards.index(url) for url in shards}

    def read(order: list[str], _skipped: list[str]) -> Iterator[dict[str, Any]]:
        return indexed_records(order, index, spec.retries, spec.retry_backoff)

    epoch_size = sum(1 for _ in read(shards, []))
    if not epoch_size:
        return []
    epoch, done = divmod(consumed, epoch_size)
    if not done:
        return []  # at an epoch boundary: no epoch in progress to finish
    order = [_entry(r) for r in epoch_records(spec, shards, stream_id, epoch, position.layout_id, [], read)]
    return order[done:]


def rebase(spec: StreamSpec, position: DataPosition, step: int, world_size: int, num_workers: int,
           rank: int = 0, ranks: int = 1,
           gather: Callable[[dict[int, list[Entry]]], list[dict[int, list[Entry]]]] = lambda part: [part],
           ) -> DataPosition:
    """The position for a run resumed at ``step`` with another layout (see the module docstring).
    The replay is shared out: process ``rank`` of ``ranks`` replays the old streams ``rank``,
    ``rank + ranks``, ... and ``gather`` collects every process's part (all-gather)."""
    per_rank = max(position.num_workers, 1)
    batches = step - position.base_step
    mine = {}
    for stream_id in range(rank, position.streams, ranks):
        consumed = consumed_batches(batches, stream_id % per_rank, per_rank) * position.batch_size
        mine[stream_id] = stream_remainder(spec, position, stream_id, consumed)
    parts = {stream_id: left for part in gather(mine) for stream_id, left in part.items()}
    return DataPosition(world_size, num_workers, spec.batch_size, base_step=step,
                        layout_id=position.layout_id + 1, shards_digest=shards_digest(spec.shards),
                        remainder=global_order(parts, position, batches))


def global_order(parts: dict[int, list[Entry]], position: DataPosition, batches: int) -> list[Entry]:
    """The old streams' remainders (``parts``, by stream) in the order the old layout would have
    consumed them after each rank's ``batches`` batches: global batch after global batch, each
    holding rank by rank the rank's next batch, from its stream ``(batches + g) mod workers``. A
    stream out of records is passed over (its next batch would have begun a new epoch)."""
    per_rank, size = max(position.num_workers, 1), position.batch_size
    taken = dict.fromkeys(parts, 0)  # records of each stream already placed
    order: list[Entry] = []
    g = 0
    while any(taken[stream] < len(left) for stream, left in parts.items()):
        for rank in range(position.world_size):
            stream = rank * per_rank + (batches + g) % per_rank
            order += parts[stream][taken[stream]:taken[stream] + size]
            taken[stream] += size
        g += 1
    return order
