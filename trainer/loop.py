"""The training loop: set-up, resume, the step loop, logging, checkpoints and sample grids."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..models.diffusion import rand
from ..models.vae import load_codec
from .checkpointing.pretrained import Pretrained, load_pretrained, read_pretrained
from .checkpointing.store import (
    Checkpointed,
    Checkpointer,
    CheckpointError,
    TrainState,
    changed_keys,
    checkpoint_dir,
    complete_checkpoints,
    read_meta,
    record_stop,
    remove_stale_tmp,
    resume_from,
)
from .config import Config, config_hash, dump_yaml, flatten
from .data import (
    DataError,
    StreamSpec,
    build_loader,
    check_manifest,
    mirrored,
    next_batch,
    normalize_images,
    resolve_shards,
)
from .data.layout import DataPosition, rebase, shards_digest
from .ema import EMA
from .evaluation.fid import metric_name
from .evaluation.sampling import EvaluationInterrupted, GridWriter, Sampler, TrainingFID
from .objectives import build_denoiser, objective_class
from .objectives.base import (
    FLIP_STREAM,
    VAE_STREAM,
    Denoiser,
    LatentSampler,
    Objective,
    StepContext,
    diffusion_of,
)
from .runtime.distributed import all_ranks, from_main, gather_objects
from .runtime.engines import make_accelerator
from .runtime.preemption import PreemptionGuard
from .runtime.runlock import RunLock, RunLockedError
from .tracking import (
    BackgroundTracker,
    JsonLines,
    MlflowTracker,
    TrackingError,
    check_reachable,
    resolve_uri,
    unsent_rows,
)

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


# Bytes a checkpoint takes per trained parameter, for the free-space check before the first one:
# fp32 weights, the EMA, Adam's two moments and ZeRO's fp32 master copy.
CHECKPOINT_BYTES_PER_PARAM = 20


class Deadline:
    """train.max_minutes from the start of the step loop. Every rank stops after the same step:
    the check is true once any rank's clock has passed the budget (with several processes one
    small all-reduce per step on the preemption guard's CPU group, only when a budget is set)."""

    def __init__(self, minutes: float | None, max_over_ranks: Callable[[int], int]) -> None:
        self.minutes = minutes
        self.max_over_ranks = max_over_ranks
        self.end = time.monotonic() + minutes * 60 if minutes is not None else math.inf

    def passed(self, step: int) -> bool:
        if self.minutes is None:
            return False
        passed = bool(self.max_over_ranks(int(time.monotonic() >= self.end)))
        if passed:
            logger.info("train.max_minutes=%g spent at step %d: the run ends here as at train.steps",
                        self.minutes, step)
        return passed


class MetricWindow:
    """Per-metric sums since the last log (a metric may be reported only on some steps, e.g. a
    lazy R1), and the images and time of the window for images/s. The sums stay on the device:
    a non-finite loss or gradient norm makes its sum non-finite, which the log and the checkpoint
    read, so finiteness is checked every step without a host sync per step."""

    def __init__(self, every: int) -> None:
        self.every = every  # train.log_every
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.corrupt = 0  # corrupt samples this rank skipped in the window
        self.skipped_shards = 0  # unreadable shards this rank's loader skipped in the window
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], images: int, batch: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.images += images
        self.corrupt += batch["corrupt"]
        self.skipped_shards += batch.get("skipped_shards", 0)

    def due(self, step: int, last: bool, stop: bool) -> bool:
        """Whether the window is logged after ``step``: every ``every`` steps, at the last step and
        when the run stops, if it holds anything."""
        return bool(self.counts) and (step % self.every == 0 or last or stop)

    def finite(self) -> torch.Tensor:
        """Whether every sum is finite, as a device tensor (no sync)."""
        sums = [torch.as_tensor(value).float().reshape(1) for value in self.sums.values()]
        return torch.cat(sums).isfinite().all() if sums else torch.tensor(True)

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], int, int]:
        """(window means, corrupt samples, skipped shards) over all ranks: the one host-device sync
        and collective of a logging interval."""
        keys = sorted(self.sums)
        local = [torch.as_tensor(self.sums[key], dtype=torch.float32, device=accelerator.device)
                 / self.counts[key] for key in keys]
        # Carried as means like the rest; times the world size they are sums over ranks.
        local += [torch.tensor(float(self.corrupt), device=accelerator.device),
                  torch.tensor(float(self.skipped_shards), device=accelerator.device)]
        values = accelerator.reduce(torch.stack(local), reduction="mean").tolist()
        skipped = round(values.pop() * accelerator.num_processes)
        corrupt = round(values.pop() * accelerator.num_processes)
        return dict(zip(keys, values, strict=True)), corrupt, skipped

    def images_per_sec(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def parameters_finite(modules: list[torch.nn.Module]) -> torch.Tensor:
    """Whether every parameter of ``modules`` is finite (this rank's ZeRO-3 slices where
    partitioned), as a device tensor."""
    flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all()
             for module in modules for p in module.parameters()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


class Trainer:
    """One training run. ``Trainer(cfg).run()`` trains to ``train.steps`` and returns a summary."""

    # Built by ``build`` (after the inputs are checked and the run folder is locked):
    codec: torch.nn.Module  # pixels or SD-VAE latents
    model: torch.nn.Module  # the denoiser, prepared (DDP module or DeepSpeed engine)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: EMA
    objective: Objective
    sample_latents: LatentSampler  # how the objective's denoiser samples
    checkpointer: Checkpointer
    grids: GridWriter
    num_params: int

    def __init__(self, cfg: Config, resume: str = "auto", allow_config_change: bool = False,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.progress = progress
        self.output_dir = Path(cfg.run.output_dir)
        self.accelerator = make_accelerator(cfg)
        self.state = TrainState()
        self.tracker: BackgroundTracker | None = None
        self.preemption = PreemptionGuard(self.accelerator)
        self.fid: TrainingFID | None = None
        self.resumed_meta: dict[str, Any] | None = None  # meta.json of the checkpoint resumed
        self.data_position: DataPosition | None = None  # set when training starts
        self.init_source: Pretrained | None = None  # model.init_from, when this run started from it
        self.config_changes: dict[str, tuple[Any, Any]] = {}
        self.history: list[dict[str, float]] = []
        self.metrics_log = JsonLines(self.output_dir / "metrics.jsonl")
        self.fid_log = JsonLines(self.output_dir / "fid.jsonl")

    # ------------------------------------------------------------------ set-up
    def _check_inputs(self) -> list[str]:
        """Fail on bad data paths or an unreachable tracking server before building anything."""
        # Remote shards are checked by the main process alone (one HEAD per shard, not one per rank).
        shards = resolve_shards(self.cfg.data.shards, check_remote=self.accelerator.is_main_process)
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
            self._init_from_pretrained(model)
        self.ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
        if cfg.model.compile != "none":  # after the EMA copy, which only samples
            model.compile_for_training(cfg.model.compile)
        self.ema.model.to(accelerator.device)
        optimizer, scheduler = build_optimizer(model, cfg)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        # The objective prepares its own adversaries: after the denoiser, so the denoiser stays
        # accelerate's model 0 in every checkpoint.
        denoiser = Denoiser(accelerator, self.model, self.optimizer, self.scheduler, diffusion_of(cfg),
                            self.codec.channels, latent_size, grad_clip=cfg.optim.grad_clip)
        self.objective = objective_class(cfg.objective)(cfg, denoiser)
        self.sample_latents = self.objective.sampler(cfg, self.codec.channels, latent_size)
        self.grids = GridWriter(cfg, self.sample_latents, self.codec, accelerator.device,
                                self.output_dir / "samples")
        self.num_params = sum(p.numel() for p in model.parameters())
        adversaries = self.objective.adversaries()
        content = Checkpointed(
            accelerator, {name: adversary.accelerator for name, adversary in adversaries.items()},
            self.ema, self.state, self.objective.checkpoint_objects())
        adversary_params = sum(p.numel() for a in adversaries.values() for p in a.net.parameters())
        self.checkpointer = Checkpointer(content, self.output_dir, cfg.train.ckpt_every, cfg.train.keep_last,
                                         CHECKPOINT_BYTES_PER_PARAM * (self.num_params + adversary_params))

    def _will_resume(self) -> bool:
        if self.resume == "none":
            return False
        return self.resume != "auto" or bool(complete_checkpoints(checkpoint_dir(self.output_dir)))

    def _init_from_pretrained(self, model: torch.nn.Module) -> None:
        """model.init_from, on a fresh start only (a resumed run reads its own checkpoint): the
        published weights before the EMA copy is taken, so the EMA starts from them too."""
        m = self.cfg.model
        if m.init_from is None or self._will_resume():
            return
        source = read_pretrained(m.init_from, m.init_entry)
        notes = load_pretrained(model, source)
        self.init_source = source
        logger.info("denoiser initialised from %s%s", source.describe(), "".join(f"; {n}" for n in notes))

    def _check_resumed_config(self, meta: dict[str, Any]) -> None:
        saved_world = meta.get("world_size", self.accelerator.num_processes)
        if saved_world != self.accelerator.num_processes:
            logger.warning("checkpoint %d was written by %d processes, this run has %d: the model, "
                           "optimizer and schedules continue (ZeRO partitions re-cut); the data stream "
                           "continues in the new layout (docs/architecture.md, 'Elastic resume')",
                           meta["step"], saved_world, self.accelerator.num_processes)
        changes = changed_keys(meta.get("config", {}), flatten(self.cfg))
        if changes and not self.allow_config_change:
            listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
            raise CheckpointError(
                f"the config differs from the checkpoint's at step {meta['step']}: {listing}. "
                "Pass --allow-config-change to continue anyway (the changes are logged to MLflow)"
            )
        self.config_changes = changes

    def _open_tracker(self) -> None:
        """The MLflow run (checked now: a wrong store fails before training), then a background
        sender; a resumed run first sends the rows of its logs that MLflow lacks."""
        cfg = self.cfg
        if not (cfg.tracking.enabled and self.accelerator.is_main_process):
            return
        uri = resolve_uri(cfg.tracking.uri, self.output_dir)
        tracker = MlflowTracker.open(uri, cfg.tracking.experiment, cfg.run.name, self.output_dir,
                                     resume_run_id=self.state.mlflow_run_id)
        backlog: dict[str, tuple[list[dict[str, Any]], int]] = {}
        try:
            if self.state.mlflow_run_id is None:
                self.state.mlflow_run_id = tracker.run_id
                tracker.log_params(flatten(cfg))
                tracker.log_params({"model.num_params": self.num_params,
                                    "world_size": self.accelerator.num_processes})
                if self.init_source is not None:
                    tracker.log_params({"model.init_from.sha256": self.init_source.sha256,
                                        "model.init_from.format": self.init_source.format})
                tracker.log_artifact(self.output_dir / "config.yaml")
            else:
                backlog = {series: unsent_rows(tracker, log.rows())
                           for series, log in (("metrics", self.metrics_log), ("fid", self.fid_log))}
        except Exception as err:  # noqa: BLE001 - mlflow raises many types; at start-up it is fatal
            raise TrackingError(f"MLflow at {uri} failed while the run was set up: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
        self.tracker = BackgroundTracker(tracker, cfg.tracking.flush_seconds)
        for series, (missing, held) in backlog.items():
            self.tracker.sent_through[series] = held
            for row in missing:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"], series)
            if missing:
                logger.info("sending MLflow the %d %s row(s) it lacks", len(missing), series)
        if self.config_changes:
            listing = {key: f"{old!r} -> {new!r}" for key, (old, new) in self.config_changes.items()}
            self.tracker.set_tag(f"config_changes_at_step_{self.state.step}", json.dumps(listing))

    # ------------------------------------------------------------------ steps
    def _log(self, window: MetricWindow, bar: tqdm | None) -> None:
        metrics, corrupt, skipped = window.reduce(self.accelerator)
        # The same totals on every rank, so rank 0's checkpoint restores every rank's counts.
        self.state.corrupt_samples += corrupt
        self.state.skipped_shards += skipped
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
            "data/skipped_shards": self.state.skipped_shards,
            "memory/peak_gb": peak_memory_gb(self.accelerator.device),
        })
        if self.accelerator.is_main_process:
            self.history.append({"step": self.state.step, **metrics})
            self.metrics_log.append({"step": self.state.step, **metrics})
            if self.tracker:
                self.tracker.log_metrics(metrics, self.state.step)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                img_s=f"{metrics['images_per_sec']:.1f}")

    def _check_finite(self, window: MetricWindow) -> None:
        """Refuse to checkpoint non-finite weights: a loss or gradient norm of the window, or a
        parameter of the denoiser or its EMA, on any rank (one sync, at checkpoint time)."""
        finite = window.finite().to(self.accelerator.device) & parameters_finite(
            [self.accelerator.unwrap_model(self.model), self.ema.model])
        if not all_ranks(self.accelerator, bool(finite.item())):
            kept = complete_checkpoints(checkpoint_dir(self.output_dir))
            where = f"the last good checkpoint, {kept[0]}, is kept" if kept else "none was written before"
            raise FloatingPointError(
                f"non-finite weights, loss or gradient norm at step {self.state.step}: no checkpoint "
                f"is written from them; {where} (lower optim.lr?)"
            )

    def _checkpoint(self, window: MetricWindow) -> Path:
        self.ema.gather()
        self._check_finite(window)
        meta = {"config": flatten(self.cfg), "config_hash": config_hash(self.cfg),
                "mlflow_run_id": self.state.mlflow_run_id, "images_seen": self.state.images_seen,
                "world_size": self.accelerator.num_processes, "stopped_by": self.preemption.stopped_by}
        if self.data_position is not None:
            meta["data"] = self.data_position.to_json()
        path = self.checkpointer.save(self.state.step, meta)
        logger.info("checkpoint %s", path)
        return path

    def _grid(self) -> Path | None:
        self.ema.gather()  # on every rank: under ZeRO-3 a collective
        if not self.accelerator.is_main_process:
            return None
        # Between rows the main process looks at its own signal flag (a collective would need
        # every rank); the ranks agree on stopping right after the evaluation.
        try:
            path = self.grids.write(self.ema.model, self.state.step,
                                    should_stop=lambda: bool(self.preemption.received))
        except EvaluationInterrupted as err:
            logger.warning("sample grid of step %d abandoned: %s", self.state.step, err)
            return None
        if self.tracker:
            self.tracker.log_artifact(path, "samples")
        return path

    def _fid(self, step: int, last: bool) -> None:
        """FID of the EMA weights when due, drawn by every rank; logged by the main process. A
        signal stops it between rounds of batches (checked by all ranks together)."""
        if not self.fid.due(step, last):
            return
        self.ema.gather()
        sampler = Sampler(self.ema.model, self.sample_latents, self.codec, self.accelerator.device,
                          self.accelerator.autocast, should_stop=self.preemption.should_stop)
        try:
            metrics = self.fid.after_step(step, last, sampler)
        except EvaluationInterrupted as err:
            logger.warning("FID at step %d abandoned: %s", step, err)
            return
        if metrics and self.accelerator.is_main_process:
            self.fid_log.append({"step": step, **metrics})
            if self.tracker:
                self.tracker.log_metrics(metrics, step, series="fid")

    def _final_fid_if_missing(self) -> None:
        """A run resumed at its last step whose final FID was cut short by a signal computes it."""
        if self.fid is None or not self.cfg.eval.final_fid_samples:
            return
        name, step = metric_name(self.cfg.eval.final_fid_samples), self.state.step
        done = any(row["step"] == step and name in row for row in self.fid_log.rows())
        if not from_main(done):
            logger.info("the final %s of step %d is missing: measuring it now", name, step)
            self._fid(step, last=True)

    def run(self) -> TrainResult:
        with self.preemption:  # SIGUSR1 / SIGTERM: checkpoint after the current step, then stop
            shards = self._check_inputs()
            lock = RunLock(self.output_dir) if self.accelerator.is_main_process else None
            try:
                self._lock(lock)
                return self._run(shards)
            finally:
                if lock is not None:
                    lock.release()

    def _lock(self, lock: RunLock | None) -> None:
        """Take the run folder's lock on the main process; every rank learns of a refusal, so
        none is left waiting for the main process in a collective."""
        refused: RunLockedError | None = None
        if lock is not None:
            try:
                lock.acquire()
            except RunLockedError as err:
                refused = err
        if not all_ranks(self.accelerator, refused is None):
            raise refused or RunLockedError(f"the main process could not lock {self.output_dir}")

    def _run(self, shards: list[str]) -> TrainResult:
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
            remove_stale_tmp(self.output_dir)
        self.build()
        resumed = resume_from(self.checkpointer.content, self.resume, self.output_dir,
                              self._check_resumed_config)
        self.resumed_meta = read_meta(resumed) if resumed else None
        if accelerator.is_main_process:
            self._truncate_logs()
        self._open_tracker()
        result = TrainResult(self.output_dir, self.state.step, self.history,
                             self.state.mlflow_run_id, checkpoint=resumed)
        status = "FAILED"
        try:
            if self.state.step >= cfg.train.steps:
                logger.info("checkpoint is at step %d >= train.steps=%d: nothing to train",
                            self.state.step, cfg.train.steps)
                self._final_fid_if_missing()
            else:
                result.checkpoint, result.grid = self._train(shards)
            status = "KILLED" if self.preemption.stopped else "FINISHED"
        finally:
            if self.tracker:  # never raises: a tracking fault must not hide the run's own error
                self.tracker.finish(status)
        result.step, result.preempted = self.state.step, self.preemption.stopped
        return result

    def _truncate_logs(self) -> None:
        """Rows after the resumed step belong to steps this run computes again: drop them."""
        for log in (self.metrics_log, self.fid_log):
            dropped = log.truncate(self.state.step)
            if dropped:
                logger.info("dropped %d row(s) after step %d from %s (recomputed from the checkpoint)",
                            dropped, self.state.step, log.path)

    def step_context(self) -> StepContext:
        """The current step's context: its seeded draws (objectives/base.py)."""
        return StepContext(self.accelerator, self.cfg.run.seed, self.state.step)

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The denoiser's input, the batch randomly mirrored (data.random_flip): encoded images,
        or a posterior sample from stored moments."""
        device, ctx, rows = self.accelerator.device, self.step_context(), len(batch["labels"])
        flip = None
        if self.cfg.data.random_flip:
            flip = rand(rows, ctx.draws(rows, device, FLIP_STREAM), device) < 0.5
        pixels_or_moments = mirrored(batch, flip, device)
        draws = ctx.draws(rows, device, VAE_STREAM)
        if "moments" in batch:
            return self.codec.sample_moments(pixels_or_moments, draws)
        return self.codec.encode(normalize_images(pixels_or_moments), generator=draws)

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The objective's step (forward, backward, optimizer steps) and the EMA update: what the
        loop runs per batch and ``advdit bench`` times."""
        metrics = self.objective.train_step(latents, labels, self.step_context())
        self.ema.update(self.accelerator.unwrap_model(self.model))  # under ZeRO-3 on this rank's slices
        return metrics

    def _steps(self, batches: Iterator[dict[str, Any]], bar: tqdm) -> tuple[Path | None, Path | None]:
        """Train until train.steps, train.max_minutes or a signal; returns the last checkpoint and
        sample grid."""
        cfg, accelerator = self.cfg, self.accelerator
        window = MetricWindow(cfg.train.log_every)
        checkpoint = grid = None
        deadline = Deadline(cfg.train.max_minutes, self.preemption.max_over_ranks)
        self.model.train()
        while self.state.step < cfg.train.steps:
            batch = next_batch(batches)
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            metrics = self.train_step(self.latents(batch), labels)
            self.state.step += 1
            self.state.images_seen += len(labels) * accelerator.num_processes
            window.add(metrics, len(labels) * accelerator.num_processes, batch)
            bar.update(1)
            step = self.state.step
            last = step == cfg.train.steps or deadline.passed(step)
            stop = not last and self.preemption.should_stop()
            window, checkpoint = self._record(window, bar, stop, last, checkpoint)
            if stop:
                break
            evaluated = self.grids.due(step, last)
            if evaluated:
                grid = self._grid() or grid
            if self.fid is not None and self.fid.due(step, last):
                evaluated = True
                self._fid(step, last)
            # A signal that arrived during a grid or an FID: stop now, not after the next step.
            if evaluated and self.preemption.should_stop():
                window, checkpoint = self._record(window, bar, True, last, checkpoint)
                break
            if last:
                break
        return checkpoint, grid

    def _record(self, window: MetricWindow, bar: tqdm, stop: bool, last: bool,
                checkpoint: Path | None) -> tuple[MetricWindow, Path | None]:
        """Log and checkpoint the current step when due, or when stopping (each once per step).
        The log goes first: it adds the window's counts to the state the checkpoint saves."""
        step, cfg = self.state.step, self.cfg.train
        if window.due(step, last, stop):
            self._log(window, bar)
            window = MetricWindow(cfg.log_every)
        if self.checkpointer.due(step, last, stop):
            checkpoint = self._checkpoint(window)
        elif stop and checkpoint is not None and self.accelerator.is_main_process:
            # Written earlier in this step (it was due before a grid or an FID): note the signal.
            record_stop(checkpoint, self.preemption.stopped_by)
        return window, checkpoint

    def _data_position(self, spec: StreamSpec) -> DataPosition:
        """The resumed checkpoint's data layout, re-based when this run has another one (another
        world size or data.num_workers; trainer/data/layout.py); a fresh run's own."""
        world, workers = self.accelerator.num_processes, self.cfg.data.num_workers
        meta = self.resumed_meta
        if meta is None:
            return DataPosition(world, workers, spec.batch_size, shards_digest=shards_digest(spec.shards))
        saved = meta.get("config", {})
        position = (DataPosition.from_json(meta["data"]) if meta.get("data") else
                    DataPosition(meta.get("world_size", world), saved.get("data.num_workers", workers),
                                 saved.get("data.batch_size", spec.batch_size)))
        if position.same_layout(world, workers):
            return position
        if position.remainder and position.shards_digest != shards_digest(spec.shards):
            raise DataError("data.shards changed since the checkpoint, whose data position (left over "
                            "from an earlier change of world size) names shards by their place in the "
                            "list; resume with the same data.shards and process count first")
        logger.info("data layout %d x %d -> %d x %d: finishing each stream's epoch first",
                    position.world_size, position.num_workers, world, workers)
        return rebase(spec, position, self.state.step, world, workers, self.accelerator.process_index,
                      world, gather_objects)

    def _train(self, shards: list[str]) -> tuple[Path | None, Path | None]:
        cfg, accelerator = self.cfg, self.accelerator
        spec = StreamSpec(shards=shards, seed=cfg.run.seed, batch_size=cfg.data.batch_size,
                          shuffle_buffer=cfg.data.shuffle_buffer, image_size=cfg.data.image_size,
                          num_classes=cfg.model.num_classes,
                          latent_size=cfg.data.image_size // self.codec.downsample,
                          retries=cfg.data.retries, retry_backoff=cfg.data.retry_backoff)
        position = self.data_position = self._data_position(spec)
        loader = build_loader(spec, accelerator.process_index, accelerator.num_processes,
                              cfg.data.num_workers, self.state.step - position.base_step, position)
        bar = tqdm(total=cfg.train.steps, initial=self.state.step, desc="train", unit="step",
                   disable=not (self.progress and accelerator.is_main_process))
        try:  # the bar is closed before an error is printed, so the error is the last line
            checkpoint, grid = self._steps(iter(loader), bar)
        finally:
            bar.close()
        # Every rank's own peak, for comparing strategies (the metric above is rank 0's).
        record = {"rank": accelerator.process_index, "peak_gb": peak_memory_gb(accelerator.device)}
        (self.output_dir / f"peak_memory_rank{accelerator.process_index}.json").write_text(json.dumps(record))
        return checkpoint, grid


def train(cfg: Config, resume: str = "auto", allow_config_change: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` to ``train.steps``; see :class:`Trainer`."""
    return Trainer(cfg, resume, allow_config_change, progress).run()
