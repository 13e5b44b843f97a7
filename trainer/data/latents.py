"""SD-VAE latent shards from image shards (``advdit data latents``).

Each output sample holds the VAE posterior's mean and std of the image and of its mirror image
(``moments.npy``, float16, shape (2 flips, 2 moments, C, h, w)) with its label. The trainer draws
a fresh posterior sample and a random mirror each time it sees the sample, so pre-extraction keeps
the augmentation that online encoding has (fast-DiT freezes both at extraction time). The latent
scale (0.18215) is applied at training time, in ``models/vae.py``.

Input shard k becomes output shard ``latents-k``: a finished output shard is skipped on a rerun,
so the tool resumes after a crash. Under ``torchrun`` each rank encodes the shards k with
k % world == rank, on its own GPU, and rank 0 writes the manifest after all are done.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ...models.vae import SDVAECodec, load_codec
from .decode import MOMENTS_KEY, decode_sample
from .manifest import resolve_shards, write_manifest_file
from .tar import iter_records
from .writer import ShardWriter

ANY_LABEL = 1 << 30  # labels are checked by the trainer against its model.num_classes


def encode_batch(codec: SDVAECodec, pixels: list[np.ndarray], device: torch.device) -> np.ndarray:
    """(B, 2, 2, C, h, w) float16 moments of the images and of their mirrors."""
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device).float().div(127.5).sub(1.0)
    both = codec.moments(torch.cat([images, images.flip(-1)]))
    plain, mirrored = both.chunk(2)
    return torch.stack([plain, mirrored], dim=1).half().cpu().numpy()


def encode_shard(codec: SDVAECodec, source: str, out_dir: Path, index: int, image_size: int,
                 batch_size: int, device: torch.device) -> dict[str, Any]:
    """Encode one input shard into ``latents-{index}``; returns its summary."""
    writer = ShardWriter(out_dir, prefix=f"latents-{index:06d}", samples_per_shard=1 << 40)
    keys, labels, pixels, skipped = [], [], [], []

    def flush() -> None:
        for key, label, moments in zip(keys, labels, encode_batch(codec, pixels, device), strict=True):
            buffer = io.BytesIO()
            np.save(buffer, moments)
            writer.write(key, label, {MOMENTS_KEY: buffer.getvalue()})
        keys.clear()
        labels.clear()
        pixels.clear()

    unreadable: list[str] = []
    for record in iter_records([source], unreadable):
        try:
            image, label = decode_sample(record, image_size, ANY_LABEL)
        except Exception as err:  # noqa: BLE001 - a sample that cannot be decoded is skipped, counted
            skipped.append(f"{source}:{record.get('__key__', '?')} ({err})")
            continue
        keys.append(record["__key__"])
        labels.append(label)
        pixels.append(image)
        if len(pixels) == batch_size:
            flush()
    if pixels:
        flush()
    summary = writer.close(write_manifest=False)
    # An input shard unreadable from some byte on (damaged, or remote and failing every retry):
    # what it held from there on is listed as skipped, not silently missing.
    summary["skipped"] = skipped + [f"{source}: the rest of the shard ({reason})" for reason in unreadable]
    (out_dir / f"latents-{index:06d}.json").write_text(json.dumps(summary))
    return summary


def merge_manifest(out_dir: Path, count: int, preprocessing: dict[str, Any]) -> dict[str, Any]:
    parts = [json.loads((out_dir / f"latents-{k:06d}.json").read_text()) for k in range(count)]
    class_counts: dict[str, int] = {}
    for part in parts:
        for label, n in part["class_counts"].items():
            class_counts[label] = class_counts.get(label, 0) + n
    manifest = {
        "prefix": "latents",
        "num_samples": sum(part["num_samples"] for part in parts),
        "shards": [shard for part in parts for shard in part["shards"]],
        "class_counts": dict(sorted(class_counts.items(), key=lambda item: int(item[0]))),
        "skipped": [where for part in parts for where in part["skipped"]],
        "preprocessing": preprocessing,
    }
    write_manifest_file(out_dir, manifest)
    return manifest


def write_latent_shards(source: str, out_dir: str | Path, vae: str, image_size: int, batch_size: int = 64,
                        progress: bool = True) -> dict[str, Any] | None:
    """Encode every image shard of ``source``; returns the manifest (on rank 0), else None."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    codec = load_codec(vae)
    if not isinstance(codec, SDVAECodec):
        raise ValueError("--vae must name an AutoencoderKL folder; latent shards need a VAE")
    codec.to(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = resolve_shards(source)
    mine = [k for k in range(len(inputs)) if k % world == rank]
    for k in tqdm(mine, desc=f"encoding shards (rank {rank})", disable=not progress):
        if not (out_dir / f"latents-{k:06d}.json").is_file():  # written last: the shard is complete
            encode_shard(codec, inputs[k], out_dir, k, image_size, batch_size, device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        torch.distributed.barrier()
    if rank != 0:
        return None
    latent_size = image_size // codec.downsample
    preprocessing = {"source": str(source), "vae": vae, "image_size": image_size,
                     "latent_shape": [codec.channels, latent_size, latent_size], "dtype": "float16",
                     "stored": "posterior mean and std of the image and of its mirror, unscaled"}
    return merge_manifest(out_dir, len(inputs), preprocessing)

