"""``advdit data digits``: scikit-learn's bundled handwritten digits as train and held-out shards
that the trainer's own reader decodes back to the original images; the digits evaluator (a fixed
classifier: FID in its feature space, class consistency, precision and recall)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from advdit.launchers.cli import main
from advdit.trainer.config import ConfigError, load_config
from advdit.trainer.data import DataError, decode_sample, iter_records, resolve_shards
from advdit.trainer.data.digits import load_digit_arrays
from advdit.trainer.evaluation.digits import score_digits
from advdit.trainer.evaluation.fid import FidError
from advdit.trainer.loop import train

from helpers import tiny_config


def read_split(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (HWC uint8 pixels, label), through the loader's reader and decoder."""
    records = iter_records(resolve_shards(str(folder)))
    return {record["__key__"]: decode_sample(record, 16, 10, None) for record in records}


def test_the_splits_hold_every_digit_once_stratified(digits_dir: Path) -> None:
    images, labels = load_digit_arrays()
    train, heldout = read_split(digits_dir / "train"), read_split(digits_dir / "heldout")
    assert len(train) + len(heldout) == len(labels) == 1797
    assert not set(train) & set(heldout)
    per_class = Counter(label for _, label in heldout.values())
    totals = Counter(labels.tolist())
    for digit in range(10):  # 20% of each class, to the nearest image
        assert per_class[digit] == round(totals[digit] * 0.2), digit


def test_the_shards_decode_back_to_the_original_digits(digits_dir: Path) -> None:
    images, labels = load_digit_arrays()
    for key, (pixels, label) in read_split(digits_dir / "heldout").items():
        index = int(key)
        assert label == labels[index]
        assert pixels.shape == (16, 16, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        np.testing.assert_array_equal(pixels[::2, ::2, 0], images[index])  # 2x2 blocks of the 8x8 digit
    assert images.max() == 255 and images.min() == 0


def test_without_scikit_learn_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what an absent package raises
    with pytest.raises(DataError, match=r"pip install 'advdit\[digits\]'"):
        load_digit_arrays()


# ---------------------------------------------------------------------- the evaluator
def heldout(digits_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from advdit.trainer.evaluation.digits import read_images

    return read_images(digits_dir / "heldout")


def test_the_classifier_reads_held_out_digits_and_its_file_is_checked(
        digits_dir: Path, classifier: Path, tmp_path: Path) -> None:
    spec = json.loads(classifier.read_text())
    weights = classifier.with_name(spec["file_name"])
    assert spec["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    accuracy = float(re.search(r"held-out accuracy (\d\.\d+)", spec["source"]).group(1))
    assert accuracy > 0.9
    tampered = tmp_path / "tampered"
    shutil.copytree(classifier.parent, tampered)
    with (tampered / spec["file_name"]).open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    with pytest.raises(FidError, match="a different or damaged file"):
        score_digits(*heldout(digits_dir), digits_dir, tampered / classifier.name)


def test_scores_separate_real_digits_from_noise_and_from_wrong_labels(
        digits_dir: Path, classifier: Path) -> None:
    images, labels = heldout(digits_dir)
    real = score_digits(images, labels, digits_dir, classifier)
    assert abs(real.fid) < 1e-6 and real.precision == real.recall == 1.0  # the reference itself
    assert real.class_consistency > 0.9
    generator = torch.Generator().manual_seed(0)
    noise = score_digits(torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8),
                         labels, digits_dir, classifier)
    assert noise.fid > 100 * max(real.fid, 1.0) and noise.precision < 0.05 and noise.class_consistency < 0.3
    shuffled = score_digits(images, labels[torch.randperm(len(labels), generator=generator)], digits_dir,
                            classifier)
    assert shuffled.class_consistency < 0.3 and shuffled.precision == 1.0  # the images are still real


def test_precision_and_recall_count_points_inside_the_other_sets_balls() -> None:
    from advdit.trainer.evaluation.digits import precision_recall

    # Ten points on a line: the distance to the 3rd neighbour is 2 (3 at the two ends).
    real = torch.tensor([[float(i), 0.0] for i in range(10)], dtype=torch.float64)
    fake = torch.tensor([[2.0, 1.0], [5.0, 1.5], [40.0, 0.0], [41.0, 0.0]], dtype=torch.float64)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.5  # the two near the line; the far pair lies in no real ball
    # Fake radii (3rd neighbour): 39.0, 36.0, 38.0, 39.0: every real point lies in some fake ball.
    assert recall == 1.0
    assert precision_recall(real, real[:5] + 100, k=3) == (0.0, 0.0)


def test_training_logs_the_class_metrics_with_fid_to_mlflow(
        tmp_path: Path, digits_dir: Path, classifier: Path, tracking_uri: str) -> None:
    spec = json.loads(classifier.read_text())
    cfg = tiny_config(tmp_path / "run", digits_dir / "train", "train.steps=2", "train.ckpt_every=2",
                      "eval.fid_every=2", "eval.fid_samples=30", f"eval.reference={digits_dir / 'heldout'}",
                      f"eval.feature_net={classifier}",
                      f"eval.inception_weights={classifier.with_name(spec['file_name'])}",
                      "eval.class_metrics=true", "tracking.enabled=true", f"tracking.uri={tracking_uri}")
    result = train(cfg)
    logged = mlflow.get_run(result.mlflow_run_id).data.metrics
    for name in ("fid30", "class_consistency30", "precision30", "recall30"):
        assert name in logged, name
    assert 0 <= logged["class_consistency30"] <= 1 and 0 <= logged["precision30"] <= 1
    row = json.loads((tmp_path / "run" / "fid.jsonl").read_text().splitlines()[-1])
    assert row["class_consistency30"] == pytest.approx(logged["class_consistency30"])


def test_class_metrics_need_a_classifier_as_feature_network() -> None:
    with pytest.raises(ConfigError, match="eval.class_metrics needs eval.feature_net"):
        load_config(None, ["eval.class_metrics=true"])


# ---------------------------------------------------------------------- learning (a regression test)
REPO = Path(__file__).resolve().parents[1]
# configs/digits.yaml (the digits demo's settings) cut to the first QUICK_STEPS of its 4,000, scored
# at the end by the evaluator above on 200 samples (25 DDIM steps, guidance 3). Measured on the
# 2-core development machine (2026-12-03, nearly idle: 2,000 steps with 8 evaluations in 3.6 min),
# run.seed 0 / 1 / 2, as the 1,500-step evaluation of 2,000-step runs (a run to 1,500 steps computes
# the same first 1,500 steps: the learning rate is flat after warm-up and every draw is seeded by
# the step):
#   advdit train --config configs/digits.yaml --resume none train.steps=2000 run.seed=S
#     eval.fid_every=250 eval.fid_samples=200 eval.batch_size=200 sample.steps=25
#     eval.class_metrics=true eval.reference=data/digits/heldout
#     eval.feature_net=models/digits/digits-classifier.json ...
#   step                 1,000               1,250               1,500               2,000
#   class consistency    0.145/0.175/0.135   0.225/0.32/0.24     0.495/0.51/0.455    0.71/0.775/0.625
#   digits-FID (200)     530/518/584         471/438/494         283/302/340         227/238/271
# (chance: class consistency 0.1.) Class conditioning appears between steps 1,250 and 1,500, hence
# 1,500 steps. The bounds leave a margin of 0.155 below the worst seed's consistency and 100 above
# its FID; a run that stops learning at step 1,000 scores below both.
QUICK_STEPS = 1500
MIN_CLASS_CONSISTENCY = 0.3
MAX_DIGITS_FID = 440.0


@pytest.mark.slow
def test_a_short_dit_run_learns_the_digits(tmp_path: Path, digits_dir: Path, classifier: Path) -> None:
    spec = json.loads(classifier.read_text())
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "digits.yaml"), "--resume", "none",
                 f"run.output_dir={out}", f"data.shards={digits_dir / 'train'}", f"train.steps={QUICK_STEPS}",
                 "train.sample_every=100000", "train.ckpt_every=100000",  # neither changes a step
                 "tracking.enabled=false", "eval.final_fid_samples=200", "eval.batch_size=200",
                 "sample.steps=25", "eval.class_metrics=true", f"eval.reference={digits_dir / 'heldout'}",
                 f"eval.feature_net={classifier}",
                 f"eval.inception_weights={classifier.with_name(spec['file_name'])}",
                 f"eval.cache_dir={tmp_path / 'cache'}"]) == 0
    row = json.loads((out / "fid.jsonl").read_text().splitlines()[-1])
    assert row["step"] == QUICK_STEPS
    assert row["class_consistency200"] >= MIN_CLASS_CONSISTENCY, row
    assert row["fid200"] <= MAX_DIGITS_FID, row
