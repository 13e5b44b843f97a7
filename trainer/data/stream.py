"""Streaming class-conditional batches from webdataset shards, resumable to the exact batch.

How the stream is laid out, and why it can resume exactly:
- Each rank runs ``num_workers`` *logical streams*; stream ``s`` of rank ``r`` (global id
  ``g = r * num_workers + s``) owns shards ``g, g + G, g + 2G, ...`` (``G`` streams in all), so ranks
  and workers never read the same sample.
- A stream is a pure function of (seed, g): per epoch its shard order and shuffle buffer are driven
  by a generator seeded from (seed, g, epoch), and its batches are cut from consecutive raw records.
- Batch ``k`` of a rank always comes from logical stream ``k % num_workers``. The DataLoader hands
  out worker outputs round-robin starting at worker 0, so a loader restarted after ``k`` batches
  maps worker ``w`` to stream ``(w + k) % num_workers``, and each stream skips the raw records it had
  already batched (no decoding). The whole position is therefore one number: batches consumed.
- A sample that cannot be decoded is counted and replaced inside its batch by another sample of the
  same batch, so batch shapes and positions do not depend on decoding success.
- The loader draws nothing at random but the order: the horizontal flip is the trainer's draw
  (``mirrored``), per place in the global batch, so it does not depend on the layout either.
- A remote shard that fails part-way is re-opened at the byte reached (``sources``), so the records
  and their order do not depend on failures that a retry mends.
- A shard that cannot be read (empty, not a tar, truncated, a remote one failing every retry) is
  skipped from the damage on, named in a warning and counted (``skipped_shards`` of the next
  batch); a stream whose shards yield no sample at all in an epoch stops with a DataError naming
  them instead of spinning forever.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import decode_sample
from .errors import DataError
from .tar import iter_records

if TYPE_CHECKING:
    from .layout import DataPosition

logger = logging.getLogger(__name__)


def _stream_seed(*parts: int) -> int:
    # Not runtime.seeding.seed_of: these 32-bit seeds fix the sample order of every run so far, and
    # a run resumed after an upgrade must see the order it started with.
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])


@dataclass
class StreamSpec:
    shards: list[str]
    seed: int
    batch_size: int
    shuffle_buffer: int
    image_size: int
    num_classes: int
    latent_size: int | None = None  # the expected h = w of latent shards' moments
    retries: int = 3  # retries of a remote shard that fails part-way (sources.RetryingReader)
    retry_backoff: float = 1.0  # seconds before the first retry, doubled for each next one


def shuffled(records: Iterator[dict[str, Any]], buffer_size: int,
             rng: random.Random) -> Iterator[dict[str, Any]]:
    """Reservoir shuffle: fill the buffer, then emit a random element for each new record."""
    buffer: list[dict[str, Any]] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        index = rng.randrange(len(buffer))
        yield buffer[index]
        buffer[index] = record
    rng.shuffle(buffer)
    yield from buffer


def stream_shards(shards: list[str], stream_id: int, streams: int) -> list[str]:
    """The shards logical stream ``stream_id`` of ``streams`` owns."""
    return shards[stream_id::streams]


def epoch_records(spec: StreamSpec, shards: list[str], stream_id: int, epoch: int, layout_id: int,
                  skipped: list[str], read: Any = None) -> Iterator[dict[str, Any]]:
    """One epoch of a stream's raw records: its shards in a seeded order, through the seeded
    shuffle buffer. Layout 0 keeps the seeds of every run so far; a re-based layout (another world
    size, see layout.py) mixes its number in."""
    parts = (spec.seed, stream_id, epoch) if not layout_id else (spec.seed, stream_id, epoch, layout_id)
    rng = random.Random(_stream_seed(*parts))
    order = list(shards)
    rng.shuffle(order)
    records = (read(order, skipped) if read is not None
               else iter_records(order, skipped, spec.retries, spec.retry_backoff))
    yield from shuffled(records, spec.shuffle_buffer, rng)


def share_records(spec: StreamSpec, share: list[tuple[int, str, int]]) -> Iterator[dict[str, Any]]:
    """The records a stream inherits from an earlier layout (layout.py), in the share's order;
    ``spec`` holds the run's whole shard list. Each shard is read once, front to back; a record
    read before its turn waits in memory. The share follows the old streams' shuffled order, whose
    records run ahead of each other by at most about a shuffle buffer, so that is what waits."""
    wanted = {(shard, index) for shard, _key, index in share}
    readers: dict[int, Iterator[tuple[int, dict[str, Any]]]] = {}
    waiting: dict[tuple[int, int], dict[str, Any]] = {}
    for shard, key, index in share:
        reader = readers.setdefault(shard, enumerate(iter_records(
            [spec.shards[shard]], None, spec.retries, spec.retry_backoff)))
        while (shard, index) not in waiting:
            position, record = next(reader, (None, None))
            if record is None:
                raise DataError(f"{spec.shards[shard]} has no record {index} ({key}) any more: it "
                                "changed since the checkpoint; restore it or resume from scratch")
            if (shard, position) in wanted:
                waiting[shard, position] = record
        yield waiting.pop((shard, index))


def consumed_batches(batches: int, local: int, per_rank: int) -> int:
    """Batches stream ``local`` (of ``per_rank`` on its rank) has handed out when its rank has
    consumed ``batches``: batch k of a rank comes from stream k mod per_rank."""
    return max(0, -(-(batches - local) // per_rank))


Records = Iterator[dict[str, Any]]


def raw_batches(spec: StreamSpec, stream_id: int, layout_id: int = 0,
                inherited: Records | None = None) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Endless (``batch_size`` raw records, shards skipped since the last batch) of one logical
    stream: the records it inherits from an earlier layout, then epoch after epoch. An epoch
    without a single readable record is a DataError: the stream would otherwise spin forever."""
    pending: list[dict[str, Any]] = []
    skipped: list[str] = []
    reported = 0

    def epochs() -> Iterator[dict[str, Any]]:
        yield from inherited or ()
        for epoch in range(1 << 62):
            records = 0
            for record in epoch_records(spec, spec.shards, stream_id, epoch, layout_id, skipped):
                records += 1
                yield record
            if not records:
                reasons = "; ".join(skipped[-len(spec.shards):]) or "no samples in them"
                raise DataError(f"shards {', '.join(spec.shards)} yield no readable sample ({reasons}); "
                                "rewrite or remove them")

    for record in epochs():
        pending.append(record)
        if len(pending) == spec.batch_size:
            yield pending, len(skipped) - reported
            reported = len(skipped)
            pending = []


def collate(spec: StreamSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode a raw batch; corrupt samples are replaced by good ones of the same batch.

    Image batches hold ``images``, (B, 3, H, W) uint8 (4x less to move than floats; the trainer
    normalises on its device with :func:`normalize_images`); latent batches hold ``moments``
    (B, 2, 2, C, h, w): the mean and std of the image and of its mirror, for ``mirrored`` to pick.
    """
    images, labels, keys, bad = [], [], [], []
    for record in records:
        try:
            pixels, label = decode_sample(record, spec.image_size, spec.num_classes, spec.latent_size)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt sample
            bad.append(f"{record.get('__url__', '?')}:{record.get('__key__', '?')} ({err})")
            continue
        images.append(pixels)
        labels.append(label)
        keys.append(record["__key__"])
    for where in bad:
        logger.warning("skipping corrupt sample %s", where)
    if not images:
        raise DataError(f"every sample of a batch is corrupt, e.g. {bad[0]}; check the shards")
    fill = len(records) - len(images)
    images += images[:fill] * (fill // max(len(images), 1) + 1)
    labels += labels[:fill] * (fill // max(len(labels), 1) + 1)
    keys += keys[:fill] * (fill // max(len(keys), 1) + 1)
    samples = images[: len(records)]
    batch: dict[str, Any] = {"labels": torch.tensor(labels[: len(records)], dtype=torch.long),
                             "keys": keys[: len(records)], "corrupt": len(bad)}
    if samples[0].ndim == 5:  # latent moments of the image and of its mirror
        batch["moments"] = torch.from_numpy(np.stack(samples)).float()
    else:  # HWC -> CHW as views; np.stack makes the one copy
        batch["images"] = torch.from_numpy(np.stack([pixels.transpose(2, 0, 1) for pixels in samples]))
    return batch


def mirrored(batch: dict[str, Any], flip: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The batch's ``images`` (uint8) or ``moments`` on ``device``, mirrored left-right where
    ``flip`` (B,) is true: images flipped, latents taken from the mirror's stored moments (a flipped
    latent is not the latent of the flipped image). ``flip`` None: as stored."""
    if "moments" in batch:
        moments = batch["moments"].to(device, non_blocking=True)
        if flip is None:
            return moments[:, 0]
        return moments[torch.arange(len(moments), device=device), flip.long()]
    images = batch["images"].to(device, non_blocking=True)
    if flip is None:
        return images
    return torch.where(flip.reshape(-1, 1, 1, 1), images.flip(-1), images)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


class ShardStream(IterableDataset):
    """Yields whole decoded batches; see the module docstring for the resume contract."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int, num_workers: int,
                 start_batch: int = 0, position: DataPosition | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.rank = rank
        self.streams_per_rank = max(num_workers, 1)
        self.start_batch = start_batch  # batches this rank consumed since its layout began
        self.position = position  # what earlier layouts left over; None for a run's first layout
        total = world_size * self.streams_per_rank
        if len(spec.shards) < total:
            raise DataError(
                f"{len(spec.shards)} shards cannot feed {world_size} process(es) x "
                f"{self.streams_per_rank} loader worker(s) = {total} streams without repeats; "
                "write more shards or lower data.num_workers"
            )
        self.total_streams = total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.start_batch) % self.streams_per_rank
        stream_id = self.rank * self.streams_per_rank + local
        own = stream_shards(self.spec.shards, stream_id, self.total_streams)
        spec = dataclasses.replace(self.spec, shards=own)
        layout_id, inherited = 0, None
        if self.position is not None:
            layout_id = self.position.layout_id
            inherited = share_records(self.spec, self.position.share(stream_id))
        # Batches this stream handed out before the restart: k < start_batch with k % W == local.
        already = consumed_batches(self.start_batch, local, self.streams_per_rank)
        for index, (records, skipped) in enumerate(raw_batches(spec, stream_id, layout_id, inherited)):
            if index < already:
                continue
            batch = collate(spec, records)
            batch["skipped_shards"] = skipped
            yield batch


def next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The loader's next batch. A DataError raised in a loader worker comes back with the worker's
    traceback folded into its message: keep the message the worker raised."""
    try:
        return next(batches)
    except DataError as err:
        text = str(err)
        if "Traceback" not in text:
            raise
        raise DataError(text.rstrip().rpartition("DataError: ")[2]) from None


def build_loader(spec: StreamSpec, rank: int, world_size: int, num_workers: int,
                 start_batch: int = 0, position: DataPosition | None = None) -> DataLoader:
    """An endless DataLoader of batches, positioned after ``start_batch`` batches of this rank in
    the layout of ``position`` (layout.py)."""
    dataset = ShardStream(spec, rank, world_size, num_workers, start_batch, position)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
