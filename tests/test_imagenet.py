"""The ImageNet shard writer on a fake ILSVRC2012 tree and fake webdataset shards."""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from advdit.launchers.data import add_imagenet_parser
from advdit.trainer.data import DataError, check_manifest, decode_sample, iter_records, resolve_shards
from advdit.trainer.data.imagenet import adm_center_crop, write_imagenet_shards
from advdit.trainer.runtime.files import file_sha256

SIZE = 32
SYNSETS = ("n01000001", "n02000002", "n03000003", "n04000004")
# (synset, file, kind, (width, height), colour); sorted by synset then file, so the list index is
# the sample's key. CMYK (0, 255, 255, 0) is red; the grayscale one is mid-gray.
FILES = (
    ("n01000001", "a.JPEG", "rgb", (50, 40), (200, 30, 40)),
    ("n01000001", "b.JPEG", "rgb", (40, 70), (20, 180, 60)),
    ("n01000001", "c.JPEG", "cmyk", (60, 45), (255, 0, 0)),
    ("n02000002", "a.JPEG", "gray", (45, 45), (128, 128, 128)),
    ("n02000002", "b.JPEG", "rgb", (20, 15), (40, 60, 220)),
    ("n02000002", "c.JPEG", "truncated", (80, 60), None),
    ("n03000003", "a.JPEG", "png", (70, 50), (240, 200, 20)),
    ("n03000003", "b.JPEG", "rgb", (100, 33), (90, 20, 160)),
    ("n03000003", "c.JPEG", "rgb", (33, 100), (10, 130, 130)),
    ("n04000004", "a.JPEG", "rgb", (64, 64), (170, 90, 10)),
)
TRUNCATED = "train/n02000002/c.JPEG"


def encoded(kind: str, size: tuple[int, int], colour: tuple[int, int, int] | None) -> bytes:
    """The bytes of one fake source file; ``kind`` picks the awkward real-world cases."""
    buffer = io.BytesIO()
    if kind == "cmyk":
        Image.new("CMYK", size, (0, 255, 255, 0)).save(buffer, format="JPEG", quality=95)
    elif kind == "gray":
        Image.new("L", size, colour[0]).save(buffer, format="JPEG", quality=95)
    elif kind == "png":  # PNG data under a .JPEG name, with an alpha channel
        Image.new("RGBA", size, (*colour, 255)).save(buffer, format="PNG")
    elif kind == "truncated":  # noise, so that half the file ends inside the scan data
        noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()[: len(buffer.getvalue()) // 2]
    else:
        Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_ilsvrc(root: Path) -> Path:
    for synset, name, kind, size, colour in FILES:
        (root / "train" / synset).mkdir(parents=True, exist_ok=True)
        (root / "train" / synset / name).write_bytes(encoded(kind, size, colour))
    return root


def read_back(out: Path, num_classes: int = len(SYNSETS)) -> dict[int, tuple[int, np.ndarray]]:
    """key -> (label, mean RGB colour), through the project's loader; checks size and mode on the way."""
    samples = {}
    for record in iter_records(resolve_shards(str(out))):
        assert Image.open(io.BytesIO(record["jpg"])).mode == "RGB"
        pixels, label = decode_sample(record, SIZE, num_classes)
        key = int(record["__key__"])
        assert key not in samples
        samples[key] = (label, pixels.reshape(-1, 3).mean(0))
    return samples


def check_colours(samples: dict[int, tuple[int, np.ndarray]], expected: dict[int, tuple]) -> None:
    assert sorted(samples) == sorted(expected)
    for key, (label, colour) in expected.items():
        assert samples[key][0] == label, key
        assert np.abs(samples[key][1] - colour).max() < 8, (key, samples[key][1], colour)


def shard_files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


def convert(source: Path, out: Path, **kwargs) -> dict:
    return write_imagenet_shards(source, out, size=SIZE, samples_per_shard=4, workers=2,
                                 progress=False, **kwargs)


def test_adm_center_crop_by_hand() -> None:
    # 16x8 of constant 2x2 blocks, R = 30 * block column, G = 60 * block row. The short side is 2x
    # the target 4, so one BOX halving gives the 8x4 block grid exactly, the BICUBIC step has scale
    # 1 and the crop keeps columns 2..5.
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[..., 0] = 30 * (np.arange(16) // 2)[None, :]
    pixels[..., 1] = 60 * (np.arange(8) // 2)[:, None]
    out = np.asarray(adm_center_crop(Image.fromarray(pixels), 4))
    assert out.shape == (4, 4, 3)
    assert out[..., 0].tolist() == [[60, 90, 120, 150]] * 4
    assert out[..., 1].tolist() == [[0] * 4, [60] * 4, [120] * 4, [180] * 4]
    assert not out[..., 2].any()
    # Tall and smaller-than-target images: resized (up) so the short side fits, then cropped.
    for size in ((7, 5), (3, 2), (100, 10), (10, 37)):
        cropped = adm_center_crop(Image.new("RGB", size, (10, 200, 90)), 4)
        assert cropped.size == (4, 4)
        assert set(cropped.getdata()) == {(10, 200, 90)}


def test_every_readable_image_once_with_label_and_the_manifest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, out = make_ilsvrc(tmp_path / "ilsvrc"), tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = convert(source, out)
    expected = {key: (SYNSETS.index(synset), colour)
                for key, (synset, _, kind, _, colour) in enumerate(FILES) if kind != "truncated"}
    check_colours(read_back(out), expected)

    assert str(source / TRUNCATED) in caplog.text
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["path"] == TRUNCATED
    assert manifest["num_samples"] == len(FILES) - 1
    assert manifest["source_samples"] == len(FILES)
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 3, 2]
    assert [shard["source_range"] for shard in manifest["shards"]] == [[0, 4], [4, 8], [8, 10]]
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(out / shard["name"])
    assert manifest["class_counts"] == {"0": 3, "1": 2, "2": 3, "3": 1}
    assert manifest["class_names"] == list(SYNSETS)
    assert manifest["preprocessing"]["image_size"] == SIZE
    assert manifest["preprocessing"]["jpeg_quality"] == 95
    assert manifest["preprocessing"]["crop"].startswith("adm_center_crop")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.glob("*.tmp"))
    check_manifest(str(out), SIZE)


def test_restart_redoes_missing_and_half_written_shards_identically(tmp_path: Path) -> None:
    source, out = make_ilsvrc(tmp_path / "ilsvrc"), tmp_path / "out"
    first = convert(source, out)
    shards, manifest_text = shard_files(out), (out / "manifest.json").read_text()
    kept = (out / "train-000000.tar").stat().st_mtime_ns

    (out / "train-000001.tar").unlink()  # its .done sidecar stays: the tar is still missing
    (out / "train-000002.tar").unlink()  # a crash while writing shard 2: only a partial .tmp
    (out / "train-000002.tar.done").unlink()
    (out / "train-000002.tar.tmp").write_bytes(b"half a shard")
    assert convert(source, out) == first

    assert shard_files(out) == shards
    assert (out / "manifest.json").read_text() == manifest_text
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept
    assert not list(out.glob("*.tmp"))
    with pytest.raises(DataError, match="jpeg_quality"):
        convert(source, out, quality=80)


def write_tar(path: Path, samples: list[tuple[str, str, bytes, int]]) -> None:
    with path.open("wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for key, extension, data, label in samples:
            writer.write({"__key__": key, extension: data, "cls": str(label).encode(), "json": b"{}"})
        writer.close()


def test_webdataset_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, out = tmp_path / "wds", tmp_path / "out"
    source.mkdir()
    colours = [(200, 30, 40), (20, 180, 60), (40, 60, 220), (240, 200, 20), (0, 0, 0), (90, 20, 160)]
    images = [encoded("rgb", (50, 40), colours[0]), encoded("cmyk", (30, 40), None),
              encoded("rgb", (20, 15), colours[2]), encoded("png", (70, 50), colours[3]),
              encoded("truncated", (80, 60), None), encoded("gray", (45, 45), (128,) * 3)]
    labels = [3, 0, 2, 1, 1, 0]
    members = [(f"{i:08d}", "png" if i == 3 else "jpg", images[i], labels[i]) for i in range(6)]
    write_tar(source / "imagenet1k-train-0000.tar", members[:3])
    write_tar(source / "imagenet1k-train-0001.tar", members[3:])
    write_tar(source / "imagenet1k-validation-0000.tar", members[:2])  # another split: left out
    with caplog.at_level(logging.WARNING):
        manifest = convert(source, out)
    expected = {0: (3, colours[0]), 1: (0, (255, 0, 0)), 2: (2, colours[2]), 3: (1, colours[3]),
                5: (0, (128, 128, 128))}
    check_colours(read_back(out), expected)
    assert manifest["preprocessing"]["source_kind"] == "webdataset"
    assert manifest["skipped"][0]["path"] == "imagenet1k-train-0001.tar:00000004"
    assert "imagenet1k-train-0001.tar" in caplog.text
    assert manifest["source_samples"] == 6 and manifest["num_samples"] == 5


@pytest.mark.parametrize("labels_form", ["loc_val_solution_csv", "file_synset_lines_and_synsets_file"])
def test_val_split_with_a_mapping_file(tmp_path: Path, labels_form: str) -> None:
    source, out = tmp_path / "ilsvrc", tmp_path / "out"
    (source / "val").mkdir(parents=True)
    truth = {1: ("n02000002", (200, 30, 40)), 2: ("n01000001", (20, 180, 60)),
             3: ("n03000003", (40, 60, 220)), 4: ("n01000001", (240, 200, 20))}
    for number, (_, colour) in truth.items():
        (source / "val" / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(encoded("rgb", (60, 45), colour))
    extra = {}
    if labels_form == "loc_val_solution_csv":
        for synset in ("n01000001", "n02000002", "n03000003"):  # the class list comes from train/
            (source / "train" / synset).mkdir(parents=True)
        boxes = "10 20 30 40 {0} 1 2 3 4"  # a prediction string: synset and box, repeated
        lines = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{n:08d},{synset} {boxes.format(synset)}"
                                                for n, (synset, _) in truth.items()]
        classes = ["n01000001", "n02000002", "n03000003"]
    else:
        lines = [f"ILSVRC2012_val_{n:08d}.JPEG {synset}" for n, (synset, _) in truth.items()]
        classes = ["n03000003", "n01000001", "n02000002"]  # a synsets file sets any class order
        extra["synsets"] = tmp_path / "synsets.txt"
        extra["synsets"].write_text("".join(f"{synset} some name, another\n" for synset in classes))
    (tmp_path / "labels").write_text("\n".join(lines) + "\n")

    manifest = convert(source, out, split="val", val_labels=tmp_path / "labels", **extra)
    # Ordered by synset, then file name: files 2 and 4 (n01), 1 (n02), 3 (n03).
    order = [2, 4, 1, 3]
    expected = {key: (classes.index(truth[n][0]), truth[n][1]) for key, n in enumerate(order)}
    check_colours(read_back(out, num_classes=3), expected)
    assert manifest["prefix"] == "val" and manifest["shards"][0]["name"] == "val-000000.tar"
    assert manifest["class_names"] == classes


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = make_ilsvrc(tmp_path / "ilsvrc"), tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_imagenet_parser(parser.add_subparsers())
    args = parser.parse_args(["imagenet", "--source", str(source), "--out", str(out), "--size", str(SIZE),
                              "--samples-per-shard", "4", "--workers", "2", "--quality", "90"])
    assert args.func(args) == 0
    assert f"wrote 9 {SIZE}x{SIZE} images in 3 shards to {out}; 1 unreadable" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["jpeg_quality"] == 90


def non_octal_size(path: Path) -> None:
    """Overwrite the first header's size field with letters, with the header checksum made to fit."""
    data = bytearray(path.read_bytes())
    data[124:136] = b"0000000zz12\0"
    data[148:156] = b" " * 8
    data[148:155] = f"{sum(data[:512]):06o}\0".encode()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["non_octal_header", "truncated_tar", "symlink_loop"])
def test_damaged_sources_are_one_line_errors(damage: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from advdit.launchers.cli import main

    if damage == "symlink_loop":
        source = make_ilsvrc(tmp_path / "ilsvrc")
        (source / "train" / "n01000001" / "loop.JPEG").symlink_to("loop.JPEG")
        expected = f"cannot list the source at {source}/train/n01000001/loop.JPEG: Too many levels"
    else:
        source = tmp_path / "wds"
        source.mkdir()
        tar = source / "train-0000.tar"
        write_tar(tar, [(f"{i:08d}", "jpg", encoded("rgb", (20, 20), (1, 2, 3)), 1) for i in range(3)])
        if damage == "truncated_tar":
            tar.write_bytes(tar.read_bytes()[:1800])
        else:
            non_octal_size(tar)
        expected = f"source tar {tar} cannot be read"
    args = ["data", "imagenet", "--source", str(source), "--out", str(tmp_path / "out"), "--size", "16",
            "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"advdit: error: {expected}")
