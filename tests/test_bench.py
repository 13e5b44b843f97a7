"""advdit bench on tiny configs: the command runs, and its figures agree with each other and with
FLOPs counted by hand."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from advdit.launchers.cli import main

# DiT-S/2 narrowed to 2 blocks of width 64 on 8x8x4 latents (64-px images): 16 tokens.
DEPTH, WIDTH, HEADS, CLASSES, LATENT, CHANNELS, PATCH = 2, 64, 2, 10, 8, 4, 2
TINY = ["model.arch=DiT-S/2", f"model.depth={DEPTH}", f"model.hidden_size={WIDTH}",
        f"model.num_heads={HEADS}", f"model.num_classes={CLASSES}", "data.image_size=64",
        "data.batch_size=4"]
STEPS = 3


def forward_macs(ours: bool) -> int:
    """Multiply-adds of one image's forward pass, layer by layer (DiT's own accounting)."""
    tokens, d = (LATENT // PATCH) ** 2, WIDTH
    patch_in, patch_out = CHANNELS * PATCH**2, 2 * CHANNELS * PATCH**2  # learned sigma: 2C out
    timestep_mlp = 256 * d + d * d  # 256 sinusoid frequencies -> d -> d, once per image
    attention = tokens * d * 3 * d + 2 * tokens**2 * d + tokens * d * d  # qkv, QK^T and AV, proj
    block = d * 6 * d + attention + 2 * tokens * d * 4 * d  # adaLN (per image), attention, MLP
    if not ours:  # diffusers embeds t and y inside every block (and once more for the output)
        block += timestep_mlp
    final = d * 2 * d + tokens * d * patch_out
    return tokens * patch_in * d + timestep_mlp + DEPTH * block + final


def run_bench(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    code = main(["bench", *TINY, "--steps", str(STEPS), "--warmup", "1", "--threads", "1",
                 "--json", str(out), *args])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_bench_vs_diffusers_reports_consistent_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, report = run_bench(tmp_path, "--vs", "diffusers", "--peak-matmul-size", "256")
    assert code == 0
    ours, theirs = report["contenders"]
    assert (ours["network"], theirs["network"]) == ("advdit", "diffusers")
    assert report["config"]["input"] == f"{CHANNELS}x{LATENT}x{LATENT}"
    peak = report["peak"]
    assert peak["source"].startswith("measured") and peak["tflops"] == peak["measured_matmul_tflops"] > 0
    for row, is_ours in ((ours, True), (theirs, False)):
        assert len(row["step_times_s"]) == STEPS
        assert row["median_step_s"] == statistics.median(row["step_times_s"])
        assert row["images_per_sec"] == pytest.approx(4 / row["median_step_s"])
        assert row["forward_flops_per_image"] == 2 * forward_macs(is_ours)
        assert row["flops_per_image"] == 3 * row["forward_flops_per_image"]
        assert row["mfu"] == pytest.approx(row["flops_per_image"] * row["images_per_sec"]
                                           / (peak["tflops"] * 1e12))
        assert row["peak_memory_gb"] > 0 and row["first_step_s"] > 0
    pairs = zip(ours["step_times_s"], theirs["step_times_s"], strict=True)
    ratio = statistics.median(a / b for a, b in pairs)
    assert report["ratios"] == {"advdit / diffusers": pytest.approx(ratio)}
    table = capsys.readouterr().out
    assert f"step time advdit / diffusers: {ratio:.3f}" in table


def test_bench_adversarial_objective_against_plain_dit(tmp_path: Path) -> None:
    code, report = run_bench(tmp_path, "objective=sadm", "--vs", "objective=dit", "--peak-tflops", "2.5",
                             "--profile", str(tmp_path / "profile.txt"))
    assert code == 0
    shares = report["profile"]["share"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["matmul and conv"] > 0
    assert "aten::mm" in (tmp_path / "profile.txt").read_text()
    subject, baseline = report["contenders"]
    assert report["config"]["objective"] == "sadm" and baseline["name"] == "objective=dit"
    # The same denoiser on both sides: model FLOPs do not count the adversary.
    assert subject["flops_per_image"] == baseline["flops_per_image"] == 6 * forward_macs(ours=True)
    assert report["peak"] == {"tflops": 2.5, "source": "--peak-tflops", "precision": "fp32"}
    assert "objective=dit" in " ".join(report["ratios"])


def test_bench_refuses_diffusers_for_an_adversarial_objective(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", *TINY, "objective=ddgan", "--vs", "diffusers"]) == 2
    assert "objective must be 'dit'" in capsys.readouterr().err


def test_bench_times_the_online_encoder_inside_the_step(tmp_path: Path, tiny_vae_dir: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    # The tiny VAE downsamples 2x: 16-px images give the same 8x8x4 latents as the other tests.
    code, report = run_bench(tmp_path, f"vae={tiny_vae_dir}", "data.image_size=16", "--data", "images",
                             "--peak-tflops", "1")
    assert code == 0
    assert report["config"]["data"] == "images" and report["config"]["vae"] == str(tiny_vae_dir)
    assert report["config"]["input"] == f"{CHANNELS}x{LATENT}x{LATENT}"
    (row,) = report["contenders"]
    assert len(row["input_times_s"]) == STEPS
    pairs = zip(row["input_times_s"], row["step_times_s"], strict=True)
    assert all(0 < encode < step for encode, step in pairs)
    assert row["median_input_s"] == statistics.median(row["input_times_s"])
    assert row["input_flops_per_image"] > 0  # counted by test_encoder_flops_are_those_of_a_real_encode
    assert f"{row['median_input_s']:.4f}" in capsys.readouterr().out


def test_bench_random_vae_needs_image_input(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", *TINY, "--random-vae"]) == 2
    assert "--random-vae times the VAE encoder, so it needs --data images" in capsys.readouterr().err


def test_encoder_flops_are_those_of_a_real_encode(tiny_vae_dir: Path) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from advdit.models.vae import load_codec
    from advdit.trainer.benchmarks.throughput import LatentStandIn, encoder_flops_per_image

    codec = load_codec(str(tiny_vae_dir))
    # The math attention kernel: FlopCounterMode does not count the CPU flash kernel's FLOPs.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        codec.vae.encode(torch.zeros(1, 3, 16, 16))
    assert encoder_flops_per_image(codec, 16) == counter.get_total_flops() > 0
    # Four times the pixels, four times the convolutions' work (all layers are convolutions or
    # per-pixel, except the mid-block attention over the pixels, which grows faster).
    assert encoder_flops_per_image(codec, 32) >= 4 * counter.get_total_flops()
    assert encoder_flops_per_image(LatentStandIn(), 256) == 0
