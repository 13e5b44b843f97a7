"""Test helpers: small shard sets written by the project's own writer, tiny configs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import socket
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import torch

from advdit.trainer.config import Config, load_config
from advdit.trainer.data.demo import draw_shape
from advdit.trainer.data.writer import ShardWriter, encode_png
from advdit.trainer.evaluation.fid import ConvFeatureNet, FeatureSpec

TINY_SIZE = 16
# A feature network for FID tests: a small convnet, randomly initialised.
TINY_SPEC = FeatureSpec(name="tiny-convnet", arch="convnet", sha256="", feature_dim=16, num_logits=10,
                        input_size=32, file_name="tiny.pth", source="written by tests/test_fid.py",
                        widths=(8, 16))


def write_shape_shards(out_dir: Path, num_images: int, per_shard: int, size: int = TINY_SIZE,
                       seed: int = 0) -> Path:
    rng = random.Random(seed)
    writer = ShardWriter(out_dir, samples_per_shard=per_shard)
    for index in range(num_images):
        label = index % 10
        writer.write(f"{index:06d}", label, {"png": encode_png(draw_shape(label, size, rng))})
    writer.close()
    return out_dir


def gen(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def tiny_overrides(output_dir: Path, shards: Path) -> list[str]:
    """A DiT of 2 blocks, width 64, on 16x16 pixels: a training step takes milliseconds."""
    return [
        f"run.output_dir={output_dir}", "run.name=test", f"data.shards={shards}",
        f"data.image_size={TINY_SIZE}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=50", "model.arch=DiT-S/4", "model.depth=2", "model.hidden_size=64",
        "model.num_heads=2", "model.num_classes=10", "optim.lr=1e-3", "train.steps=6",
        "train.log_every=1", "train.ckpt_every=3", "train.sample_every=1000",
        "train.ema_decay=0.9", "sample.steps=5", "sample.grid_rows=1", "tracking.enabled=false",
    ]


def tiny_config(output_dir: Path, shards: Path, *overrides: str) -> Config:
    return load_config(None, [*tiny_overrides(output_dir, shards), *overrides])


def corrupt_copy(source: Path, target: Path, bad_key: str) -> None:
    """Copy a shard, replacing one sample's PNG bytes by garbage."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == f"{bad_key}.png":
                data = b"not a png at all"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all held open while choosing)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_healthy(uri: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until an MLflow server answers ``/health``; fail if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} did not answer /health within {timeout:.0f} s")


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def save_tiny_net(folder: Path) -> tuple[Path, Path]:
    """A randomly initialised convnet saved as a weights file, and its spec with the file's SHA-256."""
    torch.manual_seed(0)
    weights = folder / "tiny.pth"
    torch.save(ConvFeatureNet(TINY_SPEC).state_dict(), weights)
    spec = dataclasses.replace(TINY_SPEC, sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    return weights, spec.to_file(folder / "tiny.json")
