"""FID and IS: the Fréchet distance against scipy's closed form, float64 statistics against numpy,
IS against the ADM evaluator's formula, the ADM .npz format, reference and weights checks, the
whole path with a tiny random feature network loaded like the real one, 1 vs 2 processes, and
FID during training logged to a real MLflow server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import linalg

from advdit.launchers.cli import main
from advdit.trainer.data import iter_records, resolve_shards
from advdit.trainer.evaluation.fid import (
    INCEPTION_V3_TF,
    WEIGHTS_ENV,
    FeatureSpec,
    FeatureStats,
    FidError,
    Statistics,
    check_reference,
    frechet_distance,
    load_feature_net,
    npz_images,
    npz_member_shape,
    read_stats,
    write_npz_images,
    write_stats,
)
from advdit.trainer.loop import train

from helpers import TINY_SPEC, save_tiny_net, tiny_config

ADVDIT = str(Path(sys.executable).with_name("advdit"))
def random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T + 0.1 * np.eye(dim)


def closed_form(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """W2^2 between Gaussians in its symmetric form: tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    root = linalg.sqrtm(s1).real
    cross = linalg.sqrtm(root @ s2 @ root).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * cross))


def test_frechet_distance_equals_the_closed_form_on_known_gaussians() -> None:
    rng = np.random.default_rng(0)
    for dim in (1, 5, 64):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = random_spd(dim, rng), random_spd(dim, rng)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-9)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2 plus the squared mean gap.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-12)


def test_float64_sums_give_numpy_mean_and_covariance() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(3.0, 2.0, size=(1000, 8)) @ rng.normal(size=(8, 8))
    stats = FeatureStats(8)
    for chunk in np.array_split(features, 7):
        stats.add(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    as_fed = features.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, as_fed.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(as_fed, rowvar=False), rtol=1e-9, atol=1e-12)


def adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """The ADM evaluator's compute_inception_score on softmax outputs, in numpy."""
    preds = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_follows_the_adm_evaluator() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(12_000, 10))  # splits of 5000, 5000 and 2000
    stats = FeatureStats(4, num_logits=10, num_splits=3)
    order = rng.permutation(len(logits))  # sums do not care in which order samples arrive
    for chunk in np.array_split(order, 9):
        stats.add(torch.zeros(len(chunk), 4), torch.from_numpy(logits[chunk]), torch.from_numpy(chunk))
    assert stats.inception_score()[0] == pytest.approx(adm_inception_score(logits), rel=1e-9)
    # Confident predictions spread evenly over K classes score K; identical ones score 1.
    confident = np.eye(10)[np.arange(100) % 10] * 60.0
    one = FeatureStats(4, num_logits=10, num_splits=1)
    one.add(torch.zeros(100, 4), torch.from_numpy(confident), torch.arange(100))
    assert one.inception_score()[0] == pytest.approx(10.0, rel=1e-6)
    same = FeatureStats(4, num_logits=10, num_splits=1)
    same.add(torch.zeros(100, 4), torch.from_numpy(np.tile(confident[:1], (100, 1))), torch.arange(100))
    assert same.inception_score()[0] == pytest.approx(1.0, rel=1e-6)


def test_adm_npz_format_is_written_and_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 8, 6, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    path = write_npz_images(tmp_path / "samples.npz", images.shape, iter(np.array_split(images, 4)), labels)
    with np.load(path) as data:  # what the ADM evaluator does with a sample batch
        assert sorted(data.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    np.testing.assert_array_equal(npz_images(path), images)
    assert isinstance(npz_images(path), np.memmap)  # read in place, not loaded
    # ADM / DiT files come from np.savez (stored) or could be compressed: both are read.
    np.savez(tmp_path / "dit.npz", arr_0=images)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    np.testing.assert_array_equal(npz_images(tmp_path / "dit.npz"), images)
    np.testing.assert_array_equal(npz_images(tmp_path / "packed.npz"), images)
    with pytest.raises(ValueError, match="5 images written"):
        write_npz_images(tmp_path / "short.npz", (6, 8, 6, 3), iter([images[:5]]))
    assert not (tmp_path / "short.npz").exists()


def adm_reference(path: Path, dim: int, image_size: int) -> Path:
    """A file shaped like VIRTUAL_imagenet256_labeled.npz: mu, sigma and arr_0 reference images."""
    rng = np.random.default_rng(4)
    np.savez(path, mu=rng.normal(size=dim), sigma=random_spd(dim, rng),
             arr_0=np.zeros((3, image_size, image_size, 3), np.uint8))
    return path


def test_adm_reference_batch_is_read_and_checked(tmp_path: Path) -> None:
    ref_path = adm_reference(tmp_path / "VIRTUAL_ref.npz", 16, 32)
    assert npz_member_shape(ref_path, "arr_0") == (3, 32, 32, 3)
    ref = read_stats(ref_path)
    assert ref.mu.shape == (16,) and ref.meta["image_size"] == 32
    check_reference(ref, 32, TINY_SPEC)
    with pytest.raises(FidError, match=r"VIRTUAL_ref\.npz were made from 32x32 images, but the samples are"):
        check_reference(ref, 16, TINY_SPEC)
    with pytest.raises(FidError, match=r"VIRTUAL_ref\.npz have 16-d features .* gives 2048-d"):
        check_reference(ref, 32, INCEPTION_V3_TF)
    ours = write_stats(tmp_path / "ours.npz", Statistics(ref.mu, ref.sigma, {"feature_net": "other-net"}))
    with pytest.raises(FidError, match=r"ours\.npz were made with the feature network 'other-net'"):
        check_reference(read_stats(ours), 32, TINY_SPEC)
    np.savez(tmp_path / "no_stats.npz", arr_0=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(FidError, match=r"no_stats\.npz holds no 'mu' and 'sigma'"):
        read_stats(tmp_path / "no_stats.npz")


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_net(tmp_path_factory.mktemp("tiny-net"))


def test_weights_file_missing_or_wrong_is_a_clear_error(tmp_path: Path, tiny_net: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FidError) as missing:
        load_feature_net(None)
    for needed in ("pt_inception-2015-12-05-6726825d.pth", INCEPTION_V3_TF.sha256, WEIGHTS_ENV,
                   "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"):
        assert needed in str(missing.value)
    with pytest.raises(FidError, match=r"nope\.pth' does not exist; expected pt_inception"):
        load_feature_net(tmp_path / "nope.pth")
    weights, spec_file = tiny_net
    damaged = tmp_path / "damaged.pth"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    damaged.write_bytes(bytes(blob))
    digest = hashlib.sha256(damaged.read_bytes()).hexdigest()
    spec = FeatureSpec.from_file(spec_file)
    with pytest.raises(FidError, match=rf"damaged\.pth' has sha256 {digest} .* expected {spec.sha256}"):
        load_feature_net(damaged, spec)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))  # the environment variable names the file
    net = load_feature_net(None, spec)
    pool, logits = net(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert pool.shape == (2, 16) and logits.shape == (2, 10)


@pytest.mark.slow
def test_the_inception_path_loads_a_file_in_the_layout_of_the_fid_weights(tmp_path: Path) -> None:
    """torch-fidelity's network through load_feature_net, from a file laid out like
    pt_inception-2015-12-05-6726825d.pth (pytorch-fid saves torchvision's Inception3 with 1008
    classes and no aux head), with random weights and the spec's checksum made to match."""
    import torchvision

    weights = tmp_path / "random-inception.pth"
    layout = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                             init_weights=False)
    torch.save(layout.state_dict(), weights)
    spec = dataclasses.replace(INCEPTION_V3_TF, sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    net = load_feature_net(weights, spec)
    pool, logits = net(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    # IS reads the logits without the bias, as the TF evaluators do.
    torch.testing.assert_close(logits, pool @ net.fc.weight.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(FidError, match="sha256"):
        load_feature_net(weights)  # the real spec's checksum: refused


def shard_images(shards: Path) -> np.ndarray:
    """Every image of the shards, decoded as the reference statistics see them."""
    import io

    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(record["png"])).convert("RGB"))
                     for record in iter_records(resolve_shards(str(shards)))])


def fid_args(samples: Path, reference: Path | str, net: tuple[Path, Path], cache: Path,
             *extra: str) -> list[str]:
    weights, spec = net
    return ["fid", str(samples), "--reference", str(reference), "--inception-weights", str(weights),
            "--feature-net", str(spec), "--cache-dir", str(cache), "--batch-size", "7", "--workers", "0",
            *extra]


def test_fid_path_with_a_tiny_network_from_shards_to_score(tmp_path: Path, tiny_shards: Path,
                                                          tiny_net: tuple[Path, Path]) -> None:
    images = shard_images(tiny_shards)
    same = write_npz_images(tmp_path / "same.npz", images.shape, iter([images]))
    cache = tmp_path / "cache"
    assert main(fid_args(same, tiny_shards, tiny_net, cache, "--json", str(tmp_path / "same.json"))) == 0
    [cached] = cache.glob("ref-16px-*.npz")  # computed once, named by the hash of its recipe
    meta = read_stats(cached).meta
    assert meta["images"] == len(images) and meta["feature_net"] == "tiny-convnet"
    assert meta["hash"] in cached.name
    same_fid = json.loads((tmp_path / "same.json").read_text())
    assert same_fid["num_samples"] == len(images)
    before = cached.stat().st_mtime_ns  # the next runs must read the cache, not recompute it
    half = write_npz_images(tmp_path / "half.npz", images[::2].shape, iter([images[::2]]))
    noise = np.random.default_rng(5).integers(0, 256, size=images.shape, dtype=np.uint8)
    other = write_npz_images(tmp_path / "noise.npz", noise.shape, iter([noise]))
    fids = {}
    for name, samples in (("half", half), ("noise", other)):
        assert main(fid_args(samples, tiny_shards, tiny_net, cache, "--json", str(tmp_path / "r.json"))) == 0
        fids[name] = json.loads((tmp_path / "r.json").read_text())["fid"]
    assert cached.stat().st_mtime_ns == before and len(list(cache.glob("*.npz"))) == 1
    # The reference's own images score zero (up to rounding), half of them little, noise far more.
    assert abs(same_fid["fid"]) < 1e-6 * fids["noise"]
    assert 0 < fids["half"] < fids["noise"] / 10


def test_fewer_samples_than_requested_and_wrong_resolution_are_refused(
        tmp_path: Path, tiny_net: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    images = np.zeros((5, 16, 16, 3), np.uint8)
    samples = write_npz_images(tmp_path / "five.npz", images.shape, iter([images]))
    reference = adm_reference(tmp_path / "ref32.npz", 16, 32)
    assert main(fid_args(samples, reference, tiny_net, tmp_path, "--num-samples", "50")) == 2
    assert "five.npz holds 5 images, but 50 were requested" in capsys.readouterr().err
    assert main(fid_args(samples, reference, tiny_net, tmp_path)) == 2
    assert "ref32.npz were made from 32x32 images, but the samples are 16x16" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_statistics_of_one(tmp_path: Path, tiny_net: tuple[Path, Path]) -> None:
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(45, 16, 16, 3), dtype=np.uint8)
    samples = write_npz_images(tmp_path / "samples.npz", images.shape, iter([images]))
    reference = adm_reference(tmp_path / "ref.npz", 16, 16)
    assert main(fid_args(samples, reference, tiny_net, tmp_path, "--save-stats", str(tmp_path / "one.npz"),
                         "--json", str(tmp_path / "one.json"))) == 0
    done = subprocess.run([ADVDIT, *fid_args(samples, reference, tiny_net, tmp_path, "--nproc", "2",
                                             "--save-stats", str(tmp_path / "two.npz"),
                                             "--json", str(tmp_path / "two.json"))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = read_stats(tmp_path / "one.npz"), read_stats(tmp_path / "two.npz")
    assert one.meta["images"] == two.meta["images"] == 45
    np.testing.assert_allclose(two.mu, one.mu, rtol=1e-12)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-10, atol=1e-12)
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert second["inception_score"] == pytest.approx(first["inception_score"], rel=1e-9)
    # And the sums are the statistics of the features themselves.
    net = load_feature_net(tiny_net[0], FeatureSpec.from_file(tiny_net[1]))
    features = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()
    np.testing.assert_allclose(one.mu, features.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(one.sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_training_logs_fid_to_a_real_mlflow_server(tracking_uri: str, tmp_path: Path,
                                                   tiny_shards: Path, tiny_net: tuple[Path, Path]) -> None:
    weights, spec = tiny_net
    out = tmp_path / "run"
    cfg = tiny_config(out, tiny_shards, "tracking.enabled=true", "tracking.experiment=fid-test",
                      "train.steps=4", "eval.fid_every=2", "eval.fid_samples=12", "eval.final_fid_samples=20",
                      f"eval.reference={tiny_shards}", f"eval.inception_weights={weights}",
                      f"eval.feature_net={spec}", f"eval.cache_dir={tmp_path / 'cache'}", "eval.batch_size=5")
    result = train(cfg, progress=False)
    client = MlflowClient(tracking_uri)
    history = {name: client.get_metric_history(result.mlflow_run_id, name)
               for name in ("fid12", "is12", "fid20")}
    assert [m.step for m in history["fid12"]] == [2, 4]
    assert [m.step for m in history["is12"]] == [2, 4]
    assert [m.step for m in history["fid20"]] == [4]
    assert all(m.value > 0 and np.isfinite(m.value) for ms in history.values() for m in ms)
    lines = [json.loads(line) for line in (out / "fid.jsonl").open()]
    assert [line["step"] for line in lines] == [2, 4]
    assert lines[1]["fid20"] == pytest.approx(history["fid20"][0].value)
    # The final FID is the offline pipeline's: advdit sample (same seed, sampler, batches) + advdit fid.
    samples = tmp_path / "final.npz"
    checkpoint = out / "checkpoints" / "step_00000004"
    assert main(["sample", str(checkpoint), "--num-samples", "20", "--batch-size", "5",
                 "--npz", str(samples)]) == 0
    assert main(fid_args(samples, tiny_shards, tiny_net, tmp_path / "cache",
                         "--json", str(tmp_path / "f.json"))) == 0
    # (features in batches of 7 here, of 5 in training: equal up to float32 rounding)
    assert json.loads((tmp_path / "f.json").read_text())["fid"] == pytest.approx(lines[1]["fid20"], rel=1e-5)
