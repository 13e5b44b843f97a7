"""``advdit data digits``: scikit-learn's bundled handwritten digits as train and held-out shards
that the trainer's own reader decodes back to the original images."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from advdit.launchers.cli import main
from advdit.trainer.data import DataError, decode_sample, iter_records, resolve_shards
from advdit.trainer.data.digits import load_digit_arrays


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert main(["data", "digits", "--out", str(out)]) == 0
    return out


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
