"""Shards written by the project's writer, read back by the streaming loader."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from advdit.trainer.data import (
    DataError,
    StreamSpec,
    build_loader,
    iter_records,
    mirrored,
    normalize_images,
    resolve_shards,
)
from advdit.trainer.data.demo import CLASSES, write_demo_shards
from advdit.trainer.data.tar import ShardError, tar_members
from advdit.trainer.runtime.files import file_sha256

from helpers import TINY_SIZE, corrupt_copy, tiny_overrides, write_shape_shards

ADVDIT = str(Path(sys.executable).with_name("advdit"))


def spec_for(shards: list[str], batch_size: int = 8) -> StreamSpec:
    return StreamSpec(shards=shards, seed=3, batch_size=batch_size, shuffle_buffer=50,
                      image_size=TINY_SIZE, num_classes=10)


def take(loader: torch.utils.data.DataLoader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_manifest_counts_and_checksums(tiny_shards: Path) -> None:
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["num_samples"] == 320
    assert [s["samples"] for s in manifest["shards"]] == [80] * 4
    assert manifest["class_counts"] == {str(c): 32 for c in range(10)}
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(tiny_shards / shard["name"])
    assert not list(tiny_shards.glob("*.tmp"))


def test_one_epoch_sees_every_sample_once_with_its_label(tiny_shards: Path) -> None:
    shards = resolve_shards(str(tiny_shards))
    batches = take(build_loader(spec_for(shards, batch_size=10), 0, 1, num_workers=2), 32)
    images = torch.cat([b["images"] for b in batches])
    assert images.dtype == torch.uint8
    assert normalize_images(images).min() >= -1 and normalize_images(images).max() <= 1
    labels = torch.cat([b["labels"] for b in batches])
    assert images.shape == (320, 3, TINY_SIZE, TINY_SIZE)
    assert torch.bincount(labels, minlength=10).tolist() == [32] * 10
    assert len({img.numpy().tobytes() for img in images}) == 320  # no sample twice


def test_ranks_and_workers_read_disjoint_samples(tiny_shards: Path) -> None:
    shards = resolve_shards(str(tiny_shards))
    seen = []
    for rank in range(2):
        batches = take(build_loader(spec_for(shards, batch_size=10), rank, 2, num_workers=2), 16)
        seen.append({img.numpy().tobytes() for b in batches for img in b["images"]})
    assert len(seen[0]) == len(seen[1]) == 160
    assert not seen[0] & seen[1]


def test_restored_position_yields_the_same_next_batches(tiny_shards: Path) -> None:
    shards = resolve_shards(str(tiny_shards))
    spec = spec_for(shards, batch_size=6)
    uninterrupted = take(build_loader(spec, 0, 1, num_workers=2), 20)
    for start in (7, 8, 13):  # after an odd and an even number of batches, across an epoch end
        resumed = take(build_loader(spec, 0, 1, num_workers=2, start_batch=start), 20 - start)
        for a, b in zip(uninterrupted[start:], resumed, strict=True):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_epochs_are_reshuffled(tiny_shards: Path) -> None:
    shards = resolve_shards(str(tiny_shards))
    batches = take(build_loader(spec_for(shards, batch_size=40), 0, 1, num_workers=0), 16)
    first = torch.cat([b["labels"] for b in batches[:8]])
    second = torch.cat([b["labels"] for b in batches[8:]])
    assert torch.bincount(second, minlength=10).tolist() == [32] * 10
    assert not torch.equal(first, second)


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path, tiny_shards: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    shard = tmp_path / "bad.tar"
    corrupt_copy(tiny_shards / "train-000000.tar", shard, "000005")
    spec = spec_for([str(shard)], batch_size=10)
    batches = take(build_loader(spec, 0, 1, num_workers=0), 8)
    assert sum(b["corrupt"] for b in batches) == 1
    assert all(b["images"].shape[0] == 10 for b in batches)
    assert "000005" in caplog.text and "skipping corrupt sample" in caplog.text


def test_missing_and_empty_shard_paths_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="matches no file"):
        resolve_shards(str(tmp_path / "nowhere-{000..003}.tar"))
    with pytest.raises(DataError, match="holds no manifest.json and no"):
        resolve_shards(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards([str(tmp_path / "gone.tar")])


def test_too_few_shards_for_the_streams(tiny_shards: Path) -> None:
    shards = resolve_shards(str(tiny_shards))
    with pytest.raises(DataError, match="4 shards cannot feed 2 process"):
        build_loader(spec_for(shards), 0, 2, num_workers=3)


def test_wrong_image_size_counts_as_corrupt(tmp_path: Path) -> None:
    write_shape_shards(tmp_path, 10, 10, size=8)
    spec = spec_for(resolve_shards(str(tmp_path)), batch_size=5)
    with pytest.raises(DataError, match="every sample of a batch is corrupt.*expected 16"):
        take(build_loader(spec, 0, 1, num_workers=0), 1)


def test_demo_set_is_balanced(tmp_path: Path) -> None:
    manifest = write_demo_shards(tmp_path, num_images=40, image_size=32, samples_per_shard=20,
                                 progress=False)
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 2
    assert manifest["class_names"] == [name for name, _ in CLASSES]
    assert set(manifest["class_counts"].values()) == {4}


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_agrees_with_tarfile(tmp_path: Path, tar_format: int) -> None:
    path = tmp_path / "mixed.tar"
    long_folder = "d" * 60 + "/" + "e" * 60  # > 100 characters: prefix field, PAX or GNU long name
    members = {"a.cls": b"3", f"{long_folder}/b.png": b"\x89PNG" * 300, "c.moments.npy": b"x" * 513}
    with tarfile.open(path, "w", format=tar_format) as archive:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    assert dict(tar_members(str(path))) == members


def test_records_group_members_as_webdataset_does(tiny_shards: Path) -> None:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    shard = str(tiny_shards / "train-000001.tar")
    with open(shard, "rb") as handle:
        expected = [{k: v for k, v in r.items() if k != "__url__"} for r in group_by_keys(
            {**m, "__url__": shard} for m in tar_file_iterator(handle))]
    got = [{k: v for k, v in r.items() if k != "__url__"} for r in iter_records([shard])]
    assert got == expected and len(got) == 80


def test_loader_benchmark_command_reports_a_rate(capsys: pytest.CaptureFixture) -> None:
    from advdit.launchers.cli import main

    assert main(["data", "bench", "--synthetic", "latents", "--count", "300", "--batches", "2",
                 "--batch-size", "32", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["source"] == "latents" and report["median_samples_per_sec_per_core"] > 0
    assert len(report["samples_per_sec"]) == 1


def _stream_keys(rank: int, shards: list[str], out: str) -> None:
    """One of two real processes: an epoch of this rank's keys, then the keys after a restart."""
    spec = spec_for(shards, batch_size=10)
    epoch = [key for b in take(build_loader(spec, rank, 2, num_workers=2), 16) for key in b["keys"]]
    restored = build_loader(spec, rank, 2, num_workers=2, start_batch=5)
    resumed = [key for b in take(restored, 3) for key in b["keys"]]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"epoch": epoch, "resumed": resumed}))


def test_two_processes_split_the_epoch_and_restore_positions(tiny_shards: Path, tmp_path: Path) -> None:
    shards = resolve_shards(str(tiny_shards))
    torch.multiprocessing.spawn(_stream_keys, args=(shards, str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    epochs = [set(s["epoch"]) for s in seen]
    assert len(epochs[0]) == len(epochs[1]) == 160 and not epochs[0] & epochs[1]
    assert epochs[0] | epochs[1] == {f"{i:06d}" for i in range(320)}
    for s in seen:  # a loader restored after 5 batches yields batches 5, 6, 7 of the uninterrupted one
        assert s["resumed"] == s["epoch"][50:80]


def test_writer_benchmark_converts_every_synthetic_image(capsys: pytest.CaptureFixture) -> None:
    from advdit.launchers.cli import main

    assert main(["data", "bench", "--writer", "--count", "12", "--workers", "2", "--image-size", "64",
                 "--samples-per-shard", "5", "--repeats", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 12 and report["workers"] == 2 and len(report["images_per_sec"]) == 2
    assert report["median_images_per_sec"] > 0
    assert report["median_images_per_sec_per_worker"] == pytest.approx(report["median_images_per_sec"] / 2,
                                                                       abs=0.1)


def test_benchmark_refuses_a_zero_count(capsys: pytest.CaptureFixture) -> None:
    from advdit.launchers.cli import main

    assert main(["data", "bench", "--writer", "--count", "0"]) == 2
    assert "--count" in capsys.readouterr().err


def damaged_copies(source: Path, folder: Path) -> dict[str, Path]:
    """Broken shards as disks and interrupted copies leave them."""
    data = source.read_bytes()
    with tarfile.open(source) as archive:
        second_body = archive.getmembers()[1].offset_data
    damaged = {
        "empty": b"",
        "few-hundred-bytes": data[:300],
        "not-a-tar": b"<html>503 Service Unavailable</html>" * 60,
        "cut-mid-member": data[:second_body + 100],  # inside the second member's bytes
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, payload in damaged.items():
        paths[name] = folder / f"{name}.tar"
        paths[name].write_bytes(payload)
    return paths


def readable_prefix(path: Path) -> list[str]:
    names = []
    with pytest.raises(ShardError):
        for name, _ in tar_members(str(path)):
            names.append(name)
    return names


def test_tar_reader_names_each_kind_of_damage(tiny_shards: Path, tmp_path: Path) -> None:
    paths = damaged_copies(tiny_shards / "train-000000.tar", tmp_path)
    expected = {"empty": r"is empty \(0 bytes\)", "not-a-tar": "has no valid tar header at byte 0",
                "few-hundred-bytes": r"is truncated at byte 300 \(inside a header",
                "cut-mid-member": r"is truncated at byte \d+ \(inside a member"}
    for name, message in expected.items():
        with pytest.raises(ShardError, match=message):
            list(tar_members(str(paths[name])))
    assert readable_prefix(paths["cut-mid-member"]) == ["000000.cls"]  # members before the damage


def test_non_octal_size_field_is_a_shard_error(tiny_shards: Path, tmp_path: Path) -> None:
    header = bytearray((tiny_shards / "train-000000.tar").read_bytes()[:512])
    header[124:136] = b"0000000zz12\0"  # a size a broken writer produced, with a valid checksum
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    path = tmp_path / "bad-size.tar"
    path.write_bytes(bytes(header) + b"\0" * 1536)
    with pytest.raises(ShardError, match="non-octal size field"):
        list(tar_members(str(path)))


def test_unreadable_shards_in_a_good_set_are_skipped_named_and_counted(
        tiny_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = resolve_shards(str(tiny_shards))
    bad = [str(path) for path in damaged_copies(tiny_shards / "train-000000.tar", tmp_path).values()]
    caplog.set_level("WARNING")
    skipped: list[str] = []
    assert len(list(iter_records(good + bad, skipped))) == 320
    assert len(skipped) == 4 and all(any(path in entry for entry in skipped) for path in bad)
    assert all(path in caplog.text for path in bad)
    # Through the loader: 32 batches of 10 per epoch; each epoch meets the 4 shards again, and a
    # skip is reported with the batch after it, so after two epochs and a batch 8 to 12 are counted.
    batches = take(build_loader(spec_for(good + bad, batch_size=10), 0, 1, num_workers=0), 65)
    assert len({key for batch in batches[:32] for key in batch["keys"]}) == 320
    assert 8 <= sum(batch["skipped_shards"] for batch in batches) <= 12


def test_a_stream_without_readable_samples_stops_with_the_shard_names(tiny_shards: Path,
                                                                      tmp_path: Path) -> None:
    """Before, the loader spun forever at step 0; now the trainer stops at once with one line."""
    shards = tmp_path / "shards"
    shards.mkdir()
    bad = damaged_copies(tiny_shards / "train-000000.tar", tmp_path / "bad")
    # Sorted, a b c d; with 2 loader workers stream 0 reads a and c, stream 1 only the holes b and d.
    (shards / "a-good.tar").write_bytes((tiny_shards / "train-000000.tar").read_bytes())
    (shards / "b-hole.tar").write_bytes(bad["empty"].read_bytes())
    (shards / "c-good.tar").write_bytes((tiny_shards / "train-000001.tar").read_bytes())
    (shards / "d-hole.tar").write_bytes(bad["few-hundred-bytes"].read_bytes())
    run = subprocess.run([ADVDIT, "train", *tiny_overrides(tmp_path / "run", shards), "data.num_workers=2"],
                         capture_output=True, text=True, timeout=120)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2, run.stderr[-2000:]
    assert last.startswith("advdit: error: shards ") and "yield no readable sample" in last
    assert "b-hole.tar" in last and "d-hole.tar" in last and "good" not in last


def test_the_trainer_mirrors_exactly_the_rows_its_flip_draw_names(tiny_shards: Path) -> None:
    batch = next(iter(build_loader(spec_for(resolve_shards(str(tiny_shards))), 0, 1, num_workers=0)))
    flip = torch.arange(8) % 3 == 0
    images = mirrored(batch, flip, torch.device("cpu"))
    assert torch.equal(images[flip], batch["images"][flip].flip(-1))
    assert torch.equal(images[~flip], batch["images"][~flip])
    assert not torch.equal(images, batch["images"])  # the shapes are not all symmetric
    assert torch.equal(mirrored(batch, None, torch.device("cpu")), batch["images"])
