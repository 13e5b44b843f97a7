"""Latent shards: written from image shards with a tiny random AutoencoderKL, read by the loader,
trained on, and resumed after a partial run of the tool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from advdit.launchers.cli import main
from advdit.models.vae import LATENT_SCALE, load_codec
from advdit.trainer.data import (
    StreamSpec,
    build_loader,
    decode_sample,
    iter_records,
    mirrored,
    resolve_shards,
)
from advdit.trainer.loop import train

from helpers import TINY_SIZE, tiny_config


def write_latents(tiny_shards: Path, tiny_vae_dir: Path, out: Path) -> None:
    assert main(["data", "latents", "--source", str(tiny_shards), "--out", str(out),
                 "--vae", str(tiny_vae_dir), "--image-size", str(TINY_SIZE), "--batch-size", "16"]) == 0


def test_moments_of_image_and_mirror(tiny_shards: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    write_latents(tiny_shards, tiny_vae_dir, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 320 and len(manifest["shards"]) == 4
    assert manifest["preprocessing"]["latent_shape"] == [4, 8, 8]
    codec = load_codec(str(tiny_vae_dir))
    source = next(iter_records(resolve_shards(str(tiny_shards))[:1]))
    latent = next(iter_records(resolve_shards(str(tmp_path))[:1]))
    assert source["__key__"] == latent["__key__"]
    pixels, label = decode_sample(source, TINY_SIZE, 10)
    moments, latent_label = decode_sample(latent, TINY_SIZE, 10, latent_size=8)
    assert label == latent_label and moments.dtype == np.float16 and moments.shape == (2, 2, 4, 8, 8)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = codec.moments(torch.cat([image, image.flip(-1)]))
    assert torch.allclose(torch.from_numpy(moments.astype(np.float32)), expected, atol=2e-3)


def test_loader_picks_the_mirror_and_training_runs(tiny_shards: Path, tiny_vae_dir: Path,
                                                   tmp_path: Path) -> None:
    shards = tmp_path / "latents"
    write_latents(tiny_shards, tiny_vae_dir, shards)
    spec = StreamSpec(resolve_shards(str(shards)), seed=0, batch_size=8, shuffle_buffer=1,
                      image_size=TINY_SIZE, num_classes=10, latent_size=8)
    batch = next(iter(build_loader(spec, 0, 1, num_workers=0)))
    assert batch["moments"].shape == (8, 2, 2, 4, 8, 8) and "images" not in batch
    records = [r for _, r in zip(range(8), iter_records(resolve_shards(str(shards))), strict=False)]
    stored = [torch.from_numpy(decode_sample(r, TINY_SIZE, 10, 8)[0].astype(np.float32)) for r in records]
    assert all(torch.equal(got, want) for got, want in zip(batch["moments"], stored, strict=True))
    flip = torch.tensor([True, False] * 4)
    picked = mirrored(batch, flip, torch.device("cpu"))  # the trainer's flip: the stored mirror
    assert picked.shape == (8, 2, 4, 8, 8)
    assert all(torch.equal(picked[i], stored[i][int(flip[i])]) for i in range(8))
    assert torch.equal(mirrored(batch, None, torch.device("cpu")), torch.stack([m[0] for m in stored]))
    sample = load_codec(str(tiny_vae_dir)).sample_moments(picked, torch.Generator().manual_seed(0))
    assert sample.shape == (8, 4, 8, 8)
    assert torch.allclose(sample.mean(), (picked[:, 0] * LATENT_SCALE).mean(), atol=0.05)

    cfg = tiny_config(tmp_path / "run", shards, f"vae={tiny_vae_dir}", "model.arch=DiT-S/2",
                      "train.steps=3", "train.ckpt_every=3", "train.sample_every=3")
    result = train(cfg, progress=False)
    assert result.step == 3 and result.grid.is_file()


def test_rerun_redoes_only_missing_shards(tiny_shards: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    write_latents(tiny_shards, tiny_vae_dir, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    kept = tmp_path / "latents-000000-000000.tar"
    kept_stamp = kept.stat().st_mtime_ns
    (tmp_path / "latents-000002.json").unlink()  # as if the tool died while writing shard 2
    (tmp_path / "latents-000002-000000.tar").unlink()
    write_latents(tiny_shards, tiny_vae_dir, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == before
    assert kept.stat().st_mtime_ns == kept_stamp  # finished shards were not rewritten
