"""Shared fixtures, and one thread per process for the whole suite.

Every network here is tiny: intra-op threads only add overhead, and on a 2-core runner they
oversubscribe the cores (measured here: tests/test_objectives.py took 90 s with torch's default
threads and 6.5 s with one). Subprocesses (torchrun, the MLflow server) inherit the setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Test modules import mlflow before advdit.trainer.tracking turns its telemetry off.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import free_port, stop_process, wait_healthy, write_shape_shards  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 16x16 shape images in 4 shards."""
    return write_shape_shards(tmp_path_factory.mktemp("shards"), 320, 80)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-block AutoencoderKL (downsampling 2x) saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tracking server on 127.0.0.1, proxying artifacts; one for the whole session (it
    takes 10 to 50 s to start on 2 shared cores)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_healthy(uri, process)
        yield uri
    finally:
        stop_process(process, timeout=30)
        log.close()


@pytest.fixture
def tracking_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``advdit data digits``: the train and held-out shards of scikit-learn's digits."""
    from advdit.launchers.cli import main

    out = tmp_path_factory.mktemp("digits")
    assert main(["data", "digits", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def classifier(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits evaluator's spec JSON (its classifier trained with the fixed seed)."""
    from advdit.launchers.cli import main

    out = tmp_path_factory.mktemp("classifier")
    assert main(["digits", "classifier", "--data", str(digits_dir), "--out", str(out)]) == 0
    return out / "digits-classifier.json"
