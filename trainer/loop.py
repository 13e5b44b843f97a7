"""The training loop: set-up, resume, the step loop, logging, checkpoints and sample grids."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..models.diffusion import build_diffusion
from ..models.vae import load_codec
from .checkpoint import (
    CheckpointError,
    TrainState,
    changed_keys,
    checkpoint_dir,
    resume_from,
    save_checkpoint,
)
from .config import Config, config_hash, dump_yaml, flatten
from .data import StreamSpec, build_loader, check_manifest, normalize_images, resolve_shards
from .ema import EMA
from .engines import make_accelerator
from .evaluate import Sampler, TrainingFID, sample_grid
from .objectives import (
    VAE_STREAM,
    Denoiser,
    StepContext,
    build_denoiser,
    objective_class,
    step_generator,
)
from .preemption import PreemptionGuard
from .tracking import MlflowTracker, check_reachable, resolve_uri

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    checkpoint: Path | None = None
    grid: Path | None = None
    preempted: bool = False  # stopped by a signal, with a checkpoint at ``step``


def configure_tf32(enabled: bool) -> bool:
    """TF32 for fp32 matmuls and convolutions on CUDA (train.tf32); returns the previous setting.

    Through the flags accelerate and DiT's train.py set: torch refuses to mix them with the newer
    fp32_precision API."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    return previous


def build_optimizer(model: torch.nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    # null: torch's fused kernel on CUDA (one launch for all parameters) and on CPU.
    fused = cfg.optim.fused if cfg.optim.fused is not None else True
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused)
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's max allocated on GPU, the max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB


class MetricWindow:
    """Per-metric sums since the last log (a metric may be reported only on some steps, e.g. a
    lazy R1), and the images and time of the window for images/s."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.corrupt = 0  # corrupt samples this rank skipped in the window
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], images: int, corrupt: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.images += images
        self.corrupt += corrupt

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], int]:
        """(window means, corrupt samples) over all ranks: the one host-device sync and collective
        of a logging interval."""
        keys = sorted(self.sums)
        local = [torch.as_tensor(self.sums[key], dtype=torch.float32, device=accelerator.device)
                 / self.counts[key] for key in keys]
        # Carried as a mean like the rest; times the world size it is the sum over ranks.
        local.append(torch.tensor(float(self.corrupt), device=accelerator.device))
        values = accelerator.reduce(torch.stack(local), reduction="mean").tolist()
        corrupt = round(values.pop() * accelerator.num_processes)
        return dict(zip(keys, values, strict=True)), corrupt

    def images_per_sec(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """One training run. ``Trainer(cfg).run()`` trains to ``train.steps`` and returns a summary."""

    def __init__(self, cfg: Config, resume: str = "auto", allow_config_change: bool = False,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.progress = progress
        self.output_dir = Path(cfg.run.output_dir)
        self.accelerator = make_accelerator(cfg)
        self.state = TrainState()
        self.tracker: MlflowTracker | None = None
        self.preemption = PreemptionGuard(self.accelerator)
        self.fid: TrainingFID | None = None
        self.config_changes: dict[str, tuple[Any, Any]] = {}
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ set-up
    def _check_inputs(self) -> list[str]:
        """Fail on bad data paths or an unreachable tracking server before building anything."""
        shards = resolve_shards(self.cfg.data.shards)
        check_manifest(self.cfg.data.shards, self.cfg.data.image_size)
        if self.cfg.tracking.enabled and self.accelerator.is_main_process:
            check_reachable(resolve_uri(self.cfg.tracking.uri, self.output_dir))
        # The feature network and reference statistics are loaded (and checked) before training.
        self.fid = TrainingFID.from_config(self.cfg, self.accelerator)
        return shards

    def build(self, codec: torch.nn.Module | None = None, model: torch.nn.Module | None = None) -> None:
        """Networks, optimizers and the objective (called by run; public for tools and tests).

        ``codec`` and ``model`` replace the configured ones (the benchmark's synthetic latents and
        its diffusers contender); everything else is built as for training."""
        cfg, accelerator = self.cfg, self.accelerator
        configure_tf32(cfg.train.tf32)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.codec = (load_codec(cfg.vae) if codec is None else codec).to(accelerator.device)
        latent_size = cfg.data.image_size // self.codec.downsample
        if model is None:
            model = build_denoiser(cfg, self.codec.channels, latent_size)
        self.ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
        if cfg.model.compile != "none":  # after the EMA copy, which only samples
            model.compile_for_training(cfg.model.compile)
        self.ema.model.to(accelerator.device)
        optimizer, scheduler = build_optimizer(model, cfg)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        diffusion = build_diffusion(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                    cfg.diffusion.beta_end, cfg.model.learn_sigma)
        # The objective prepares its own adversaries: after the denoiser, so the denoiser stays
        # accelerate's model 0 in every checkpoint.
        denoiser = Denoiser(self.model, self.optimizer, self.scheduler, diffusion, self.codec.channels,
                            latent_size)
        self.objective = objective_class(cfg.objective)(cfg, accelerator, denoiser)
        accelerator.register_for_checkpointing(self.ema, self.state, *self.objective.checkpoint_objects())
        self.num_params = sum(p.numel() for p in model.parameters())

    def _check_resumed_config(self, meta: dict[str, Any]) -> None:
        saved_world = meta.get("world_size", self.accelerator.num_processes)
        sharded = meta.get("config", {}).get("distributed.strategy", "ddp") != "ddp"
        if sharded and saved_world != self.accelerator.num_processes:
            raise CheckpointError(
                f"checkpoint {meta['step']} was written by {saved_world} processes with sharded "
                f"(ZeRO) state, this run has {self.accelerator.num_processes}: resume with --nproc "
                f"{saved_world}, or start a new run from its consolidated weights (advdit export "
                "CHECKPOINT --weights raw)"
            )
        changes = changed_keys(meta.get("config", {}), flatten(self.cfg))
        if changes and not self.allow_config_change:
            listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
            raise CheckpointError(
                f"the config differs from the checkpoint's at step {meta['step']}: {listing}. "
                "Pass --allow-config-change to continue anyway (the changes are logged to MLflow)"
            )
        self.config_changes = changes

    def _open_tracker(self) -> None:
        cfg = self.cfg
        if not (cfg.tracking.enabled and self.accelerator.is_main_process):
            return
        uri = resolve_uri(cfg.tracking.uri, self.output_dir)
        self.tracker = MlflowTracker.open(uri, cfg.tracking.experiment, cfg.run.name,
                                          self.output_dir, resume_run_id=self.state.mlflow_run_id)
        if self.state.mlflow_run_id is None:
            self.state.mlflow_run_id = self.tracker.run_id
            self.tracker.log_params(flatten(cfg))
            self.tracker.log_params({"model.num_params": self.num_params,
                                     "world_size": self.accelerator.num_processes})
            self.tracker.log_artifact(self.output_dir / "config.yaml")
        if self.config_changes:
            listing = {key: f"{old!r} -> {new!r}" for key, (old, new) in self.config_changes.items()}
            self.tracker.set_tag(f"config_changes_at_step_{self.state.step}", json.dumps(listing))

    # ------------------------------------------------------------------ steps
    def _log(self, window: MetricWindow, bar: tqdm | None) -> None:
        metrics, corrupt = window.reduce(self.accelerator)
        # The same total on every rank, so rank 0's checkpoint restores every rank's count.
        self.state.corrupt_samples += corrupt
        bad = [key for key, value in metrics.items() if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} at step {self.state.step}; the last good checkpoint "
                f"is in {checkpoint_dir(self.output_dir)}"
            )
        metrics.update({
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_sec": window.images_per_sec(),
            "images_seen": self.state.images_seen,
            "data/corrupt_samples": self.state.corrupt_samples,
            "memory/peak_gb": peak_memory_gb(self.accelerator.device),
        })
        if self.accelerator.is_main_process:
            self.history.append({"step": self.state.step, **metrics})
            with (self.output_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": self.state.step, **metrics}) + "\n")
            if self.tracker:
                self.tracker.log_metrics(metrics, self.state.step)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                img_s=f"{metrics['images_per_sec']:.1f}")

    def _parts(self) -> dict[str, Accelerator]:
        """Checkpoint sub-folders: each adversary is saved by its own Accelerator."""
        return {name: adversary.accelerator for name, adversary in self.objective.adversaries().items()}

    def _checkpoint(self) -> Path:
        meta = {"config": flatten(self.cfg), "config_hash": config_hash(self.cfg),
                "mlflow_run_id": self.state.mlflow_run_id, "images_seen": self.state.images_seen,
                "world_size": self.accelerator.num_processes, "stopped_by": self.preemption.stopped_by}
        self.ema.gather()
        path = save_checkpoint(self.accelerator, self.output_dir, self.state.step, meta, self._parts(),
                               self.cfg.train.keep_last)
        logger.info("checkpoint %s", path)
        return path

    def _grid(self) -> Path | None:
        self.ema.gather()  # on every rank: under ZeRO-3 a collective
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"step_{self.state.step:08d}.png"
        sample_grid(self.ema.model, self.objective, self.cfg, self.codec, self.accelerator.device, path)
        if self.tracker:
            self.tracker.log_artifact(path, "samples")
        return path

    def _fid(self, step: int, last: bool) -> None:
        """FID of the EMA weights when due, drawn by every rank; logged by the main process."""
        if not self.fid.due(step, last):
            return
        self.ema.gather()
        sampler = Sampler(self.ema.model, self.objective, self.codec, self.accelerator.device,
                          self.accelerator.autocast)
        metrics = self.fid.after_step(step, last, sampler)
        if metrics and self.accelerator.is_main_process:
            with (self.output_dir / "fid.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
            if self.tracker:
                self.tracker.log_metrics(metrics, step)

    def run(self) -> TrainResult:
        with self.preemption:  # SIGUSR1 / SIGTERM: checkpoint after the current step, then stop
            return self._run()

    def _run(self) -> TrainResult:
        cfg, accelerator = self.cfg, self.accelerator
        shards = self._check_inputs()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.build()
        resumed = resume_from(accelerator, self.resume, self.output_dir, self._parts(),
                              self._check_resumed_config)
        self._open_tracker()
        result = TrainResult(self.output_dir, self.state.step, self.history,
                             self.state.mlflow_run_id, checkpoint=resumed)
        status = "FAILED"
        try:
            if self.state.step >= cfg.train.steps:
                logger.info("checkpoint is at step %d >= train.steps=%d: nothing to train",
                            self.state.step, cfg.train.steps)
            else:
                result.checkpoint, result.grid = self._train(shards)
            status = "KILLED" if self.preemption.stopped else "FINISHED"
        finally:
            if self.tracker:
                self.tracker.finish(status)
        result.step, result.preempted = self.state.step, self.preemption.stopped
        return result

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The denoiser's input: encoded images, or a posterior sample from stored moments."""
        device = self.accelerator.device
        generator = step_generator(self.cfg.run.seed, self.accelerator.process_index, self.state.step,
                                   device, VAE_STREAM)
        if "moments" in batch:
            return self.codec.sample_moments(batch["moments"].to(device, non_blocking=True), generator)
        images = normalize_images(batch["images"].to(device, non_blocking=True))
        return self.codec.encode(images, generator=generator)

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The objective's step (forward, backward, optimizer steps) and the EMA update: what the
        loop runs per batch and ``advdit bench`` times."""
        ctx = StepContext(self.accelerator, self.cfg.run.seed, self.state.step, self.cfg.optim.grad_clip)
        metrics = self.objective.train_step(latents, labels, ctx)
        self.ema.update(self.accelerator.unwrap_model(self.model))  # under ZeRO-3 on this rank's slices
        return metrics

    def _train(self, shards: list[str]) -> tuple[Path | None, Path | None]:
        cfg, accelerator = self.cfg, self.accelerator
        spec = StreamSpec(shards=shards, seed=cfg.run.seed, batch_size=cfg.data.batch_size,
                          shuffle_buffer=cfg.data.shuffle_buffer, image_size=cfg.data.image_size,
                          num_classes=cfg.model.num_classes, random_flip=cfg.data.random_flip,
                          latent_size=cfg.data.image_size // self.codec.downsample)
        loader = build_loader(spec, accelerator.process_index, accelerator.num_processes,
                              cfg.data.num_workers, start_batch=self.state.step)
        batches = iter(loader)
        bar = tqdm(total=cfg.train.steps, initial=self.state.step, desc="train", unit="step",
                   disable=not (self.progress and accelerator.is_main_process))
        window = MetricWindow()
        checkpoint = grid = None
        self.model.train()
        while self.state.step < cfg.train.steps:
            batch = next(batches)
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            metrics = self.train_step(self.latents(batch), labels)
            self.state.step += 1
            self.state.images_seen += len(labels) * accelerator.num_processes
            window.add(metrics, len(labels) * accelerator.num_processes, batch["corrupt"])
            bar.update(1)
            step, last = self.state.step, self.state.step == cfg.train.steps
            preempted = not last and self.preemption.should_stop()
            if step % cfg.train.log_every == 0 or last or preempted:
                self._log(window, bar)
                window = MetricWindow()
            if step % cfg.train.ckpt_every == 0 or last or preempted:
                checkpoint = self._checkpoint()
            if preempted:
                break
            if step % cfg.train.sample_every == 0 or last:
                grid = self._grid() or grid
            if self.fid is not None:
                self._fid(step, last)
        bar.close()
        # Every rank's own peak, for comparing strategies (the metric above is rank 0's).
        record = {"rank": accelerator.process_index, "peak_gb": peak_memory_gb(accelerator.device)}
        (self.output_dir / f"peak_memory_rank{accelerator.process_index}.json").write_text(json.dumps(record))
        return checkpoint, grid


def train(cfg: Config, resume: str = "auto", allow_config_change: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` to ``train.steps``; see :class:`Trainer`."""
    return Trainer(cfg, resume, allow_config_change, progress).run()

