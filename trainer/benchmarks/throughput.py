"""The training-step benchmark behind ``advdit bench``.

A contender is one trainer, built by :meth:`Trainer.build` exactly as ``advdit train`` builds it,
fed a fixed synthetic batch on its device; its step is :meth:`Trainer.train_step` (the objective's
forward, backward and optimizer step(s), and the EMA update), so the benchmark times what
training runs, without the data loader. Each timed step includes making its latents (a posterior
draw from stored moments, or with ``--data images`` the VAE encoder), also reported on its own
as the input time. Several contenders (ours and diffusers' DiT, or ours and
the same config with some keys changed) run in one process, alternating step by step with the
order swapped every round, so a shared or throttled machine slows them alike; their ratio is the
median of the per-round step-time ratios.

Model FLOPs follow DiT's accounting (its paper counts forward multiply-adds; the DiT repository's
issue #14 reconciles them with the parameter count): the denoiser's forward FLOPs for one image,
counted by torch's ``FlopCounterMode`` on the meta device (2 FLOPs per multiply-add; DiT-XL/2 at
256 px comes to 237.2 GFLOP, twice the paper's 118.6 G multiply-adds), times 3 for forward and
backward. Recomputation under activation checkpointing and the adversaries' FLOPs are not model
FLOPs. MFU = model FLOPs per image x images/s / peak FLOP/s of the device in the step's precision.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ...models.attention import resolve_backend
from ...models.dit import resolve_size
from ...models.vae import PixelCodec, SDVAECodec, load_codec, random_sd_vae_codec
from ..config import Config, ConfigError
from ..loop import Trainer, configure_tf32, peak_memory_gb
from ..objectives import build_denoiser
from ..runtime.engines import mixed_precision

# Dense (no sparsity) peaks from NVIDIA's data sheets, in TFLOP/s, by a part of the name torch
# reports ("NVIDIA H100 80GB HBM3" is the SXM part). Other devices use the measured matmul.
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
KNOWN_PEAK_TFLOPS = {
    "H100 80GB HBM3": _H100_SXM, "H100 SXM": _H100_SXM, "H200": _H100_SXM,
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32,
                 "fp32": torch.float32}
MATMUL_SIZE = {"cuda": 8192, "cpu": 4096}  # n of the n x n x n matmul that measures a peak
TRAINING_FLOPS_PER_FORWARD = 3  # backward costs two forwards (grads of inputs and of weights)


# diffusers' model as its users train it: eager, torch's default AdamW (a loop over parameters
# on CPU, foreach on CUDA), as DiT's train.py and diffusers' examples build it. Further --vs
# KEY=VALUE overrides apply on top (e.g. optim.fused=true for the same optimizer kernel as ours).
DIFFUSERS_STOCK = ("model.compile=none", "optim.fused=false")


@dataclass
class BenchOptions:
    steps: int = 10  # timed steps per contender
    warmup: int = 3  # untimed steps first (the first includes any compilation)
    data: str = "latents"  # latents: stored SD-VAE moments, no encoder; images: the configured codec
    random_vae: bool = False  # with data="images": the SD-VAE's architecture, random weights
    peak_tflops: float | None = None  # overrides the known or measured peak
    threads: int | None = None  # torch intra-op threads (default: torch's own)
    peak_matmul_size: int | None = None  # n of the measuring matmul (default MATMUL_SIZE)
    profile_steps: int = 0  # then profile this many more steps of the subject (torch.profiler)


@dataclass
class Side:
    """One contender: a config, and whose network runs it (``advdit`` or ``diffusers``)."""

    name: str
    cfg: Config
    network: str = "advdit"


class LatentStandIn(PixelCodec):
    """The input side of a latent-shard run without loading a VAE: batches carry SD-VAE posterior
    moments (4 channels, 8x smaller than the image), sampled per step as training does."""

    channels = 4
    downsample = 8
    sample_moments = staticmethod(SDVAECodec.sample_moments)


class DiffusersDiT(nn.Module):
    """diffusers' ``DiTTransformer2DModel`` of the configured size behind our DiT's call signature,
    with learned sigma (2C output channels) and the null class row, as ours has."""

    def __init__(self, cfg: Config, channels: int, latent_size: int) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel

        size, patch_size = resolve_size(cfg.model.arch, cfg.model.depth, cfg.model.hidden_size,
                                        cfg.model.num_heads)
        self.net = DiTTransformer2DModel(
            num_attention_heads=size.num_heads, attention_head_dim=size.hidden_size // size.num_heads,
            in_channels=channels, out_channels=2 * channels if cfg.model.learn_sigma else channels,
            num_layers=size.depth, sample_size=latent_size, patch_size=patch_size,
            num_embeds_ada_norm=cfg.model.num_classes)
        self.grad_checkpointing = cfg.model.grad_checkpointing
        if self.grad_checkpointing:
            self.net.enable_gradient_checkpointing()
        self.attention = cfg.model.attention

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, timestep=t, class_labels=y).sample

    def compile_for_training(self, scope: str) -> None:
        """As DiT.compile_for_training: the transformer blocks, or the whole forward pass."""
        if scope == "model":
            self.compile()
            return
        for block in self.net.transformer_blocks:
            block.compile()

    def use_attention_of(self, device: torch.device) -> None:
        """The attention kernel family ours resolves to on ``device`` (diffusers defaults to SDPA)."""
        from diffusers.models.attention_processor import AttnProcessor

        backend = resolve_backend(self.attention, device)
        if backend == "xformers":
            self.net.enable_xformers_memory_efficient_attention()
        elif backend == "math":
            self.net.set_attn_processor(AttnProcessor())


def forward_flops_per_image(model: nn.Module, channels: int, latent_size: int, z_dim: int) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on one image, counted on the meta device."""
    model = model.to("meta")
    x = torch.empty(1, channels, latent_size, latent_size, device="meta")
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    extra = {"z": torch.empty(1, z_dim, device="meta")} if z_dim else {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, labels, labels, **extra)
    return counter.get_total_flops()


def encoder_flops_per_image(codec: nn.Module, image_size: int) -> int:
    """FLOPs of encoding one image to its posterior with the codec's VAE, counted on a meta copy
    built from its config; 0 when the step has no encoder (stored latents, pixels)."""
    if not isinstance(codec, SDVAECodec):
        return 0
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        copy = AutoencoderKL.from_config(codec.vae.config)
    images = torch.empty(1, 3, image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.encode(images)
    return counter.get_total_flops()


def compute_precision(cfg: Config, device: torch.device) -> str:
    """The precision the step's matmuls run in: bf16/fp16 under autocast, tf32 or fp32 otherwise."""
    precision = mixed_precision(cfg)
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if device.type == "cuda" and cfg.train.tf32 else "fp32"


class MatmulProbe:
    """An n x n x n matmul in the step's precision, timed once per round between the steps, so on
    a shared machine the peak is measured under the same load as the steps it is compared to."""

    def __init__(self, device: torch.device, precision: str, size: int) -> None:
        self.device, self.precision, self.size = device, precision, size
        self.a = torch.randn(size, size, device=device).to(MATMUL_DTYPES[precision])
        self.b = torch.randn(size, size, device=device).to(MATMUL_DTYPES[precision])
        self.rates: list[float] = []  # FLOP/s per round
        self.measure()  # warm-up (kernel selection, first-touch of the output), not kept
        self.rates.clear()

    def measure(self) -> None:
        previous = configure_tf32(self.precision == "tf32")
        try:
            seconds = _timed(lambda: torch.mm(self.a, self.b), self.device)
        finally:
            configure_tf32(previous)
        self.rates.append(2 * self.size**3 / seconds)


def known_peak_tflops(device: torch.device, precision: str) -> tuple[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return f"{key} data sheet", peaks[precision]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Contender:
    side: Side
    trainer: Trainer
    batch: dict[str, torch.Tensor]
    forward_flops: int
    input_flops: int = 0  # per image, of the VAE encoder when the step encodes images
    warmup_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    input_times: list[float] = field(default_factory=list)  # the part of each timed step making latents
    peak_cuda_bytes: int = 0

    @property
    def device(self) -> torch.device:
        return self.trainer.accelerator.device

    def step(self) -> tuple[float, float]:
        """One timed training step (the loop's step without the loader), its CUDA peak, and the
        seconds of it spent making the latents (the VAE encoder with ``--data images``)."""
        trainer = self.trainer
        configure_tf32(self.side.cfg.train.tf32)  # contenders may differ in this flag
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        start = time.perf_counter()
        latents = trainer.latents(self.batch)
        _sync(self.device)
        encoded = time.perf_counter()
        trainer.train_step(latents, self.batch["labels"])
        _sync(self.device)
        end = time.perf_counter()
        trainer.state.step += 1  # fresh draws per step, and step-dependent schedules (lazy R1) advance
        if self.device.type == "cuda":
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, torch.cuda.max_memory_allocated(self.device))
        return end - start, encoded - start


def synthetic_batch(cfg: Config, codec: nn.Module, data: str,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed batch of the shape training feeds: latent moments, or uint8 images for the codec."""
    generator = torch.Generator().manual_seed(cfg.run.seed)
    batch_size, size = cfg.data.batch_size, cfg.data.image_size
    labels = torch.randint(0, cfg.model.num_classes, (batch_size,), generator=generator)
    if data == "latents":
        latent = size // codec.downsample
        mean = torch.randn(batch_size, codec.channels, latent, latent, generator=generator)
        std = torch.full_like(mean, 0.1)
        moments = torch.stack([mean, std], dim=1)
        batch = {"moments": torch.stack([moments, moments.flip(-1)], dim=1)}  # image and mirror
    else:
        batch = {"images": torch.randint(0, 256, (batch_size, 3, size, size), generator=generator,
                                         dtype=torch.uint8)}
    return {key: value.to(device) for key, value in {**batch, "labels": labels}.items()}


def build_network(side: Side, channels: int, latent_size: int) -> nn.Module:
    if side.network == "diffusers":
        return DiffusersDiT(side.cfg, channels, latent_size)
    return build_denoiser(side.cfg, channels, latent_size)


def bench_codec(cfg: Config, options: BenchOptions) -> nn.Module:
    if options.data == "latents":
        return LatentStandIn()
    return random_sd_vae_codec(cfg.run.seed) if options.random_vae else load_codec(cfg.vae)


def bench_vae_name(cfg: Config, options: BenchOptions) -> str | None:
    if options.data == "latents":
        return None
    return "random SD-VAE architecture" if options.random_vae else cfg.vae


def build_contender(side: Side, options: BenchOptions) -> Contender:
    cfg, data = side.cfg, options.data
    trainer = Trainer(cfg, resume="none", progress=False)
    codec = bench_codec(cfg, options)
    channels, latent_size = codec.channels, cfg.data.image_size // codec.downsample
    with torch.device("meta"):  # a copy to count FLOPs on, without memory or compilation
        counted = build_network(side, channels, latent_size)
    flops = forward_flops_per_image(counted, channels, latent_size, getattr(counted, "z_dim", 0))
    network = build_network(side, channels, latent_size)
    if isinstance(network, DiffusersDiT):
        network.use_attention_of(trainer.accelerator.device)
    trainer.build(codec=codec, model=network)
    trainer.model.train()
    batch = synthetic_batch(cfg, trainer.codec, data, trainer.accelerator.device)
    return Contender(side, trainer, batch, flops, encoder_flops_per_image(trainer.codec, cfg.data.image_size))


def check_sides(sides: list[Side]) -> None:
    """Side-by-side runs share one process: refuse what cannot share it, with the reason."""
    if len(sides) == 1:
        return
    for side in sides:
        if side.cfg.distributed.strategy != "ddp":
            raise ConfigError(
                f"advdit bench --vs: {side.name} has distributed.strategy={side.cfg.distributed.strategy!r}; "
                "side-by-side runs need ddp (one DeepSpeed state per process); bench a ZeRO strategy alone")
        if side.network == "diffusers" and side.cfg.objective != "dit":
            raise ConfigError(f"advdit bench --vs diffusers: objective must be 'dit' (diffusers' DiT has no "
                              f"adversary or z input), got {side.cfg.objective!r}")
    precisions = {mixed_precision(side.cfg) for side in sides}
    if len(precisions) > 1:
        raise ConfigError(f"advdit bench --vs: the contenders resolve to different train.mixed_precision "
                          f"{sorted(precisions)}; accelerate holds one precision per process")


def alternate(contenders: list[Contender], steps: int, warmup: int, probe: MatmulProbe | None) -> None:
    """Warm-up, then ``steps`` rounds of one step each, the order reversed every other round, and
    the peak probe's matmul at the start of each round."""
    for _ in range(warmup):
        for contender in contenders:
            contender.warmup_times.append(contender.step()[0])
    for round_index in range(steps):
        if probe is not None:
            probe.measure()
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            seconds, input_seconds = contender.step()
            contender.step_times.append(seconds)
            contender.input_times.append(input_seconds)


def peak_probe(device: torch.device, precision: str, options: BenchOptions) -> MatmulProbe | None:
    if options.peak_tflops:
        return None
    return MatmulProbe(device, precision, options.peak_matmul_size or MATMUL_SIZE[device.type])


def choose_peak(precision: str, known: tuple[str, float] | None, options: BenchOptions,
                probe: MatmulProbe | None) -> dict[str, Any]:
    """The peak MFU is taken against: the flag, else the data-sheet peak, else the median of the
    matmuls measured between the steps (also measured next to a known peak, as a check)."""
    if probe is None:
        return {"tflops": options.peak_tflops, "source": "--peak-tflops", "precision": precision}
    measured = statistics.median(probe.rates) / 1e12
    rounds = f"median of {len(probe.rates)} {precision} matmuls, n={probe.size}, one per round"
    return {"tflops": known[1] if known else measured, "source": known[0] if known else f"measured: {rounds}",
            "precision": precision, "measured_matmul_tflops": measured,
            "matmul_tflops_per_round": [rate / 1e12 for rate in probe.rates]}


def contender_report(contender: Contender, peak: dict[str, Any]) -> dict[str, Any]:
    cfg = contender.side.cfg
    median = statistics.median(contender.step_times)
    images_per_sec = cfg.data.batch_size / median
    flops = TRAINING_FLOPS_PER_FORWARD * contender.forward_flops
    on_cuda = contender.device.type == "cuda"
    peak_gb = contender.peak_cuda_bytes / 2**30 if on_cuda else peak_memory_gb(contender.device)
    return {
        "name": contender.side.name,
        "network": contender.side.network,
        "num_params": sum(p.numel() for p in contender.trainer.model.parameters()),
        "median_step_s": median,
        "mean_step_s": statistics.fmean(contender.step_times),
        "step_times_s": contender.step_times,
        "first_step_s": contender.warmup_times[0] if contender.warmup_times else None,
        # Making the step's latents: the VAE encoder with --data images, a posterior draw otherwise.
        "median_input_s": statistics.median(contender.input_times),
        "input_times_s": contender.input_times,
        "input_flops_per_image": contender.input_flops,  # not part of the model FLOPs or the MFU
        "images_per_sec": images_per_sec,
        "forward_flops_per_image": contender.forward_flops,
        "flops_per_image": flops,
        "achieved_tflops": flops * images_per_sec / 1e12,
        "mfu": flops * images_per_sec / (peak["tflops"] * 1e12),
        "peak_memory_gb": peak_gb,
        # ru_maxrss cannot be reset: on CPU it is the whole process's peak, over all contenders.
        "peak_memory_kind": "cuda max allocated" if on_cuda else "process max RSS",
    }


def describe(cfg: Config, contender: Contender, options: BenchOptions) -> dict[str, Any]:
    model = contender.trainer.accelerator.unwrap_model(contender.trainer.model)
    device = contender.device
    return {
        "arch": cfg.model.arch, "depth": cfg.model.depth, "hidden_size": cfg.model.hidden_size,
        "num_heads": cfg.model.num_heads, "image_size": cfg.data.image_size,
        "input": f"{contender.trainer.codec.channels}x{model.input_size}x{model.input_size}"
        if hasattr(model, "input_size") else None,
        "batch_size": cfg.data.batch_size, "objective": cfg.objective,
        "strategy": cfg.distributed.strategy, "precision": compute_precision(cfg, device),
        "attention": resolve_backend(cfg.model.attention, device), "compile": cfg.model.compile,
        "grad_checkpointing": cfg.model.grad_checkpointing, "data": options.data,
        "vae": bench_vae_name(cfg, options),
        "fused_adamw": bool(contender.trainer.optimizer.defaults.get("fused")),
        "steps": options.steps, "warmup": options.warmup,
    }


def machine(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}


def run_benchmark(sides: list[Side], options: BenchOptions) -> dict[str, Any]:
    """Time ``sides`` (the first is the subject, any others its baselines) and report them."""
    if options.steps < 1 or options.warmup < 0:
        raise ConfigError("advdit bench: --steps must be >= 1 and --warmup >= 0")
    if options.data not in ("latents", "images"):
        raise ConfigError(f"advdit bench: --data must be 'latents' or 'images', got {options.data!r}")
    if options.random_vae and options.data != "images":
        raise ConfigError("advdit bench: --random-vae times the VAE encoder, so it needs --data images")
    check_sides(sides)
    if options.threads:
        torch.set_num_threads(options.threads)
    contenders = [build_contender(side, options) for side in sides]
    subject = contenders[0]
    precision = compute_precision(subject.side.cfg, subject.device)
    probe = peak_probe(subject.device, precision, options)
    alternate(contenders, options.steps, options.warmup, probe)
    peak = choose_peak(precision, known_peak_tflops(subject.device, precision), options, probe)
    report: dict[str, Any] = {
        "config": describe(subject.side.cfg, subject, options),
        "machine": machine(subject.device),
        "peak": peak,
        "contenders": [contender_report(c, peak) for c in contenders],
    }
    if len(contenders) > 1:
        report["ratios"] = {
            f"{subject.side.name} / {other.side.name}": statistics.median(
                a / b for a, b in zip(subject.step_times, other.step_times, strict=True))
            for other in contenders[1:]
        }
    if options.profile_steps:
        report["profile"] = profile_steps(subject, options.profile_steps)
    return report


# Where a step's time goes, by the names of the profiled ops (self time, so nothing is counted
# twice); everything else is "other".
PROFILE_KINDS = {
    "matmul and conv": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward"),
    "attention": ("scaled_dot_product", "attention"),
    "compiled kernels": ("CompiledFxGraph",),
    "optimizer": ("adam", "Optimizer."),
}


def profile_kind(name: str) -> str:
    for kind, parts in PROFILE_KINDS.items():
        if any(part.lower() in name.lower() for part in parts):
            return kind
    return "other"


def profile_steps(contender: Contender, steps: int) -> dict[str, Any]:
    """torch.profiler over ``steps`` more steps: each kind's share of the self time, and the table."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = contender.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            contender.step()
    events = profiler.key_averages()
    times: dict[str, float] = dict.fromkeys([*PROFILE_KINDS, "other"], 0.0)
    for event in events:
        self_time = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        times[profile_kind(event.key)] += self_time
    total = sum(times.values()) or 1.0
    sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    return {"steps": steps, "share": {kind: value / total for kind, value in times.items()},
            "table": events.table(sort_by=sort_by, row_limit=30, max_name_column_width=60)}


def format_table(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for the terminal."""
    config, peak = report["config"], report["peak"]
    lines = [
        f"{config['arch']} input {config['input']} batch {config['batch_size']} "
        f"objective {config['objective']} "
        f"{config['precision']} attention {config['attention']} compile {config['compile']} "
        f"checkpointing {config['grad_checkpointing']} on {report['machine']['device_name']} "
        f"({report['machine']['threads']} threads)",
        f"peak {peak['tflops']:.4g} TFLOP/s {peak['precision']} ({peak['source']})",
        f"{'contender':<28} {'median step s':>13} {'images/s':>9} {'GFLOP/img':>10} {'MFU':>6} "
        f"{'first step s':>12} {'peak GiB':>8} {'input s':>8}",
    ]
    for row in report["contenders"]:
        lines.append(
            f"{row['name']:<28} {row['median_step_s']:>13.4f} {row['images_per_sec']:>9.2f} "
            f"{row['flops_per_image'] / 1e9:>10.2f} {row['mfu']:>6.1%} {row['first_step_s'] or 0:>12.2f} "
            f"{row['peak_memory_gb']:>8.2f} {row['median_input_s']:>8.4f}")
    for name, ratio in report.get("ratios", {}).items():
        lines.append(f"step time {name}: {ratio:.3f} (median of per-round ratios)")
    if "profile" in report:
        shares = ", ".join(f"{kind} {share:.1%}" for kind, share in report["profile"]["share"].items())
        profiled = f"{report['profile']['steps']} more steps of {report['contenders'][0]['name']}"
        lines.append(f"profile of {profiled}: {shares}")
    return "\n".join(lines)
