"""advdit sample: per-sample generators, the same set for 1 and 2 processes (real gloo) and for
any batch size, PNGs and the ADM .npz agree, exported files sample like their checkpoint, labels,
and DDGAN's fixed NFE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advdit.launchers.cli import main
from advdit.models.diffusion import build_diffusion, randn
from advdit.trainer.checkpointing.export import export_weights
from advdit.trainer.evaluation.fid import FidError
from advdit.trainer.evaluation.sampling import balanced_labels, image_rngs, read_labels
from advdit.trainer.loop import train
from advdit.trainer.objectives.ddgan import DDGANSchedule

from helpers import gen, tiny_config

ADVDIT = str(Path(sys.executable).with_name("advdit"))


def test_per_sample_generators_make_each_row_independent_of_its_batch() -> None:
    rows = randn((3, 2, 4), [gen(10), gen(11), gen(12)])
    np.testing.assert_array_equal(rows[1], torch.randn((2, 4), generator=gen(11)))
    # Through a whole DDPM loop: sample 1 drawn alone equals sample 1 drawn in a batch of 3.
    diffusion = build_diffusion(1000, learn_sigma=False, respacing=10)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)

    batch = diffusion.p_sample_loop(model_fn, (3, 1, 2, 2), generator=[gen(0), gen(1), gen(2)])
    alone = diffusion.p_sample_loop(model_fn, (1, 1, 2, 2), generator=[gen(1)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    # And through DDGAN's NFE = T sampler (z and posterior noise per sample).
    schedule = DDGANSchedule(num_steps=3)

    def generator_fn(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor:
        return 0.5 * x + z.mean(dim=1).reshape(-1, 1, 1, 1)

    batch = schedule.sample(generator_fn, (3, 1, 2, 2), None, [gen(0), gen(1), gen(2)], latent_dim=4)
    alone = schedule.sample(generator_fn, (1, 1, 2, 2), None, [gen(1)], latent_dim=4)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    # A generator's seed is (seed, sample number): not shifted by where the batch starts.
    first = image_rngs(7, range(2, 4), torch.device("cpu"))[0]
    again = image_rngs(7, range(0, 3), torch.device("cpu"))[2]
    assert torch.equal(torch.randn(5, generator=first), torch.randn(5, generator=again))


def test_labels_balanced_or_from_a_file(tmp_path: Path) -> None:
    labels = balanced_labels(25, 10)
    assert labels.tolist() == [i % 10 for i in range(25)]
    assert np.bincount(balanced_labels(50_000, 1000)).tolist() == [50] * 1000
    (tmp_path / "labels.txt").write_text("3\n1\n4\n1\n5\n")
    assert read_labels(tmp_path / "labels.txt", 4, 10).tolist() == [3, 1, 4, 1]
    with pytest.raises(FidError, match=r"labels\.txt holds 5 labels, 6 samples were requested"):
        read_labels(tmp_path / "labels.txt", 6, 10)
    np.save(tmp_path / "labels.npy", np.array([0, 12]))
    with pytest.raises(FidError, match=r"labels\.npy has classes outside \[0, 10\), e\.g\. 12"):
        read_labels(tmp_path / "labels.npy", 2, 10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> Path:
    out = tmp_path_factory.mktemp("sample-run")
    train(tiny_config(out, tiny_shards, "train.steps=2", "train.ckpt_every=2"), progress=False)
    return out / "checkpoints" / "step_00000002"


def sample_args(source: Path, npz: Path, *extra: str) -> list[str]:
    return ["sample", str(source), "--num-samples", "10", "--npz", str(npz), "--sampler", "ddpm",
            "--steps", "4", "--cfg-scale", "2.0", *extra]


@pytest.mark.slow
def test_sample_set_is_the_same_for_one_or_two_processes_and_any_batch_size(
        tmp_path: Path, checkpoint: Path) -> None:
    one = tmp_path / "one.npz"
    assert main(sample_args(checkpoint, one, "--batch-size", "3", "--png-dir", str(tmp_path / "png"))) == 0
    done = subprocess.run([ADVDIT, *sample_args(checkpoint, tmp_path / "two.npz", "--batch-size", "3",
                                                "--nproc", "2")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "images/s over 2 process(es)" in done.stdout
    with np.load(one) as first, np.load(tmp_path / "two.npz") as second:
        images = first["arr_0"]
        assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8
        assert first["arr_1"].tolist() == [i % 10 for i in range(10)]
        np.testing.assert_array_equal(second["arr_0"], images)  # bit for bit
        np.testing.assert_array_equal(second["arr_1"], first["arr_1"])
    assert not (tmp_path / "one.npz.parts").exists() and not (tmp_path / "two.npz.parts").exists()
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), images)
    # Other batches: each sample keeps its own noise, so the set agrees up to float rounding.
    assert main(sample_args(checkpoint, tmp_path / "b4.npz", "--batch-size", "4")) == 0
    other = np.load(tmp_path / "b4.npz")["arr_0"].astype(int)
    assert np.abs(other - images).max() <= 1
    # A different seed is a different set.
    assert main(sample_args(checkpoint, tmp_path / "seed1.npz", "--batch-size", "3", "--seed", "1")) == 0
    assert (np.load(tmp_path / "seed1.npz")["arr_0"] != images).mean() > 0.5


def test_exported_ema_weights_sample_like_the_checkpoint(tmp_path: Path, checkpoint: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    exported = export_weights(checkpoint, tmp_path / "ema.safetensors")
    (tmp_path / "labels.txt").write_text("\n".join(["7"] * 10))
    labels = ["--labels", str(tmp_path / "labels.txt"), "--batch-size", "5"]
    assert main(sample_args(checkpoint, tmp_path / "ckpt.npz", *labels)) == 0
    assert main(sample_args(exported, tmp_path / "file.npz", *labels)) == 0
    with np.load(tmp_path / "ckpt.npz") as ckpt, np.load(tmp_path / "file.npz") as file:
        np.testing.assert_array_equal(file["arr_0"], ckpt["arr_0"])
        assert file["arr_1"].tolist() == [7] * 10
    assert main(sample_args(checkpoint, tmp_path / "raw.npz", "--weights", "raw", *labels)) == 0
    assert not np.array_equal(np.load(tmp_path / "raw.npz")["arr_0"], np.load(tmp_path / "ckpt.npz")["arr_0"])
    capsys.readouterr()
    assert main(sample_args(exported, tmp_path / "x.npz", "--weights", "raw")) == 2
    assert "ema.safetensors holds the ema weights, raw were asked for" in capsys.readouterr().err
    # Pixels have 3 eps channels: guiding "all" is guiding the default 3; a fourth does not exist.
    assert main(sample_args(checkpoint, tmp_path / "all.npz", "--cfg-channels", "all", *labels)) == 0
    all_channels = np.load(tmp_path / "all.npz")["arr_0"]
    np.testing.assert_array_equal(all_channels, np.load(tmp_path / "ckpt.npz")["arr_0"])
    capsys.readouterr()
    assert main(sample_args(checkpoint, tmp_path / "y.npz", "--cfg-channels", "4", *labels)) == 2
    assert "'sample.cfg_channels' is 4, but the denoiser's eps has 3 channels" in capsys.readouterr().err


def test_ddgan_samples_with_its_own_nfe(tmp_path: Path, tiny_shards: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ddgan"
    train(tiny_config(out, tiny_shards, "objective=ddgan", "ddgan.num_steps=2", "disc.base_channels=8",
                      "train.steps=1", "train.ckpt_every=1"), progress=False)
    ddgan = out / "checkpoints" / "step_00000001"
    capsys.readouterr()
    assert main(["sample", str(ddgan), "--npz", str(tmp_path / "x.npz"), "--steps", "250"]) == 2
    assert ("is a DDGAN denoiser: it samples with NFE = ddgan.num_steps (2) and no guidance, so "
            "sample.steps do not apply") in capsys.readouterr().err
    sets = {}
    for batch_size in ("3", "6"):
        npz = tmp_path / f"ddgan{batch_size}.npz"
        assert main(["sample", str(ddgan), "--num-samples", "6", "--batch-size", batch_size,
                     "--npz", str(npz)]) == 0
        assert "DDGAN, NFE = ddgan.num_steps" in capsys.readouterr().out
        sets[batch_size] = np.load(npz)["arr_0"].astype(int)
    assert sets["3"].shape == (6, 16, 16, 3) and len({image.tobytes() for image in sets["3"]}) == 6
    assert np.abs(sets["3"] - sets["6"]).max() <= 1
    assert main(["sample", str(ddgan), "--num-samples", "4"]) == 2
    assert "needs --npz PATH and/or --png-dir DIR" in capsys.readouterr().err
