"""Typed run configuration: YAML presets, dotted command-line overrides, validation.

The schema is a tree of dataclasses whose sections check themselves when they are built: every
value against its field's annotation (choices are ``Literal`` types), then each section's own
rules in its ``__post_init__``. Config files (paths, or presets shipped in ``advdit.configs``) are
merged onto the defaults in order, each after the files it ``include:``s, then overrides such as
``train.steps=200``; a mistake names the key, what was expected and (for unknown keys) the closest
valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.resources
import json
import math
import types
import typing
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..models.attention import BACKENDS


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


SectionT = typing.TypeVar("SectionT", bound="Section")


# A field with this metadata (or every field of a section with it) may differ between a
# checkpoint's config and the resuming run's: it does not change what the run computes.
MAY_CHANGE_ON_RESUME = {"resume": "may_change"}


def _may_change(default: Any) -> Any:
    return field(default=default, metadata=MAY_CHANGE_ON_RESUME)


@dataclass
class Section:
    """A config section: its values are checked against their annotations when it is built (ints
    are taken where floats are expected); subclasses add their own rules in ``__post_init__``."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if dataclasses.is_dataclass(hints[f.name]):
                continue  # a section, checked when it was built
            key = self.key(f.name)
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            _check_finite_and_printable(key, value)
            setattr(self, f.name, value)

    def key(self, attribute: str) -> str:
        """The dotted config key of one of this section's fields, e.g. ``optim.lr``."""
        section = _section_names().get(type(self), "")
        return f"{section}.{key_name(attribute)}" if section else key_name(attribute)

    def require_positive(self, *attributes: str) -> None:
        for attribute in attributes:
            if getattr(self, attribute) <= 0:
                raise ConfigError(f"config key {self.key(attribute)!r} must be positive")

    def require_range(self, attribute: str, low: float, inclusive: bool, high: float | None = None) -> None:
        """``low <= value`` (``low < value`` unless ``inclusive``) and ``value < high``."""
        value = getattr(self, attribute)
        above = value >= low if inclusive else value > low
        if not (above and (high is None or value < high)):
            bounds = f"{'[' if inclusive else '('}{low}, {high if high is not None else 'inf'})"
            raise ConfigError(f"config key {self.key(attribute)!r} must be in {bounds}, got {value!r}")


# ---------------------------------------------------------------------- the schema
# What one training step optimises; trainer/objectives/ registers a class for each.
Objective = Literal["dit", "sadm", "diffusion_gan", "ddgan"]
# models/attention.py owns the backends; the config accepts exactly those.
AttentionBackend = Literal[BACKENDS]
# torch.compile: none | blocks (each DiT block) | model (the whole denoiser; fastest on CPU)
CompileMode = Literal["none", "blocks", "model"]
# DeepSpeed ZeRO through accelerate (trainer/runtime/engines.py)
Strategy = Literal["ddp", "zero2", "zero3"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Sampler = Literal["ddim", "ddpm"]
# Which weights of an official DiT training checkpoint (its train.py saves both) model.init_from reads.
InitEntry = Literal["ema", "model"]


@dataclass
class RunConfig(Section):
    name: str = _may_change("advdit")
    output_dir: str = _may_change("runs/advdit")  # runs get moved
    seed: int = 0


@dataclass
class ModelConfig(Section):
    arch: str = "DiT-XL/2"
    # Override the named size, for small networks (tests, the CPU demo); null keeps the size's own.
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_classes: int = 1000
    class_dropout: float = 0.1
    learn_sigma: bool = True
    attention: AttentionBackend = "auto"
    grad_checkpointing: bool = False
    # How fast the step runs, not what it computes (checkpoints made before this key lack it).
    compile: CompileMode = _may_change("none")
    # Published weights to start from (a fresh run only; a resumed run reads its checkpoint): an
    # official DiT .pt, a diffusers DiTTransformer2DModel folder, or an advdit export / checkpoint.
    init_from: str | None = _may_change(None)
    init_entry: InitEntry = _may_change("ema")
    # The timestep embedding's frequencies exp(-ln(10^4) i / (128 - shift)): 0 is the official DiT
    # (its weights were trained so), 1 is diffusers' DiTTransformer2DModel (docs/pretrained.md).
    timestep_freq_shift: Literal[0, 1] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("num_classes")
        self.require_range("class_dropout", 0.0, True, 1.0)


@dataclass
class DiffusionConfig(Section):
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("steps")


@dataclass
class DataConfig(Section):
    # A shard directory (with manifest.json or *.tar files), a brace pattern such as
    # "data/train-{000000..000099}.tar", or a list of tar paths; or remote shards, brace-expanded:
    # "https://host/train-{000000..000099}.tar", "pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -",
    # "s3://bucket/train-{000000..000099}.tar" (fsspec: pip install 'advdit[remote]').
    shards: str | list[str] = "data/demo/train"
    image_size: int = 256
    batch_size: int = 32  # per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    random_flip: bool = True
    # A remote shard that fails part-way is re-opened where it stopped, at most `retries` times,
    # after retry_backoff seconds doubled per retry; then skipped and counted (data/skipped_shards).
    retries: int = _may_change(3)
    retry_backoff: float = _may_change(1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("batch_size", "image_size")
        self.require_range("retries", 0, True)
        self.require_range("retry_backoff", 0.0, True)


@dataclass
class OptimConfig(Section):
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0
    # AdamW's fused kernel; null: on (CUDA and CPU). Speed only (older checkpoints lack the key).
    fused: bool | None = _may_change(None)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_adam(self)
        self.require_range("grad_clip", 0.0, True)
        self.require_range("warmup_steps", 0, True)


def _check_adam(section: OptimConfig | DiscConfig) -> None:
    """Checked before anything is built or written: an lr of NaN or inf (refused for every float)
    or out of range would train, and checkpoint, non-finite weights."""
    section.require_range("lr", 0.0, False)
    section.require_range("weight_decay", 0.0, True)
    section.require_range("beta1", 0.0, True, 1.0)
    section.require_range("beta2", 0.0, True, 1.0)


@dataclass
class DistributedConfig(Section):
    strategy: Strategy = "ddp"
    offload_optimizer: bool = False  # ZeRO only: optimizer states in CPU memory


@dataclass
class TrainConfig(Section):
    # How long to train, how often to log and save: none of it changes what a step computes.
    steps: int = _may_change(400_000)
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1+n)/(10+n)); for short runs
    mixed_precision: MixedPrecision = "auto"
    tf32: bool = _may_change(True)  # TF32 for fp32 matmuls and convolutions on CUDA; speed only
    log_every: int = _may_change(10)
    ckpt_every: int = _may_change(10_000)
    keep_last: int = _may_change(3)
    sample_every: int = _may_change(10_000)
    # A wall-clock budget: after this many minutes of this process's step loop (evaluations
    # included) the run ends as if train.steps were reached (checkpoint, grid, final FID, exit
    # 0). For comparing methods at equal time (advdit quality); null: no limit.
    max_minutes: float | None = _may_change(None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("steps", "log_every", "ckpt_every", "keep_last", "sample_every")
        if self.max_minutes is not None:
            self.require_positive("max_minutes")
        self.require_range("ema_decay", 0.0, True, 1.0)


@dataclass
class SampleConfig(Section):
    sampler: Sampler = "ddim"
    steps: int = 50
    cfg_scale: float = 1.5
    # Eps channels that guidance acts on: 3 as the official DiT (its published FIDs), or all.
    # Sampling only: checkpoints made before this key lack it.
    cfg_channels: int | Literal["all"] = _may_change(3)
    grid_classes: list[int] = field(default_factory=list)  # empty: spread over all classes
    grid_rows: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("steps")
        if self.cfg_channels != "all":
            self.require_positive("cfg_channels")


@dataclass
class DiscConfig(Section):
    """The adversary of any adversarial objective (discriminator or structure encoder)."""

    base_channels: int = 64
    num_blocks: int = 2
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("base_channels", "num_blocks")
        _check_adam(self)


# SADM's choices; trainer/objectives/sadm.py implements each (and reads these with typing.get_args).
SADMAffinity = Literal["cosine", "gaussian", "softmax"]
SADMDistance = Literal["l1", "l2", "kl"]  # kl compares rows as distributions: needs softmax
SADMWeighting = Literal["none", "snr", "range"]


@dataclass
class SADMConfig(Section):
    """Structure-guided adversarial training; every default here is a reconstruction [INFERRED]."""

    lambda_: float = 0.1  # weight of the structural distance in the denoiser's loss
    affinity: SADMAffinity = "cosine"
    tau: float = 0.5  # Gaussian bandwidth / softmax temperature
    distance: SADMDistance = "l1"
    feature_dim: int = 128
    t_conditioned: bool = False
    weighting: SADMWeighting = "snr"
    t_max: int = 1000  # with weighting=range: the structure term uses samples with t <= t_max
    warmup_steps: int = 0  # lambda is 0 before this step

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("feature_dim")
        if self.distance == "kl" and self.affinity != "softmax":
            raise ConfigError("config key 'sadm.distance' = 'kl' needs sadm.affinity=softmax "
                              "(row distributions)")


TimestepDistribution = Literal["priority", "uniform"]
DDGANParameterization = Literal["x0", "eps"]


@dataclass
class DiffusionGANConfig(Section):
    weight: float = 0.1  # weight of the generator loss in the denoiser's loss [INFERRED]
    t_min: int = 10
    t_max: int = 1000
    # null: by data space, 0.05 in pixels (vae: none; the paper's value, which won on the digits)
    # and 0.5 on SD-VAE latents of std ~1 [INFERRED] (objectives/diffusion_gan.py, noise_std_of)
    noise_std: float | None = None
    ts_dist: TimestepDistribution = "priority"
    clean_fraction: float = 0.5
    target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    r1_gamma: float = 0.05
    r1_interval: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("r1_interval")


@dataclass
class DDGANConfig(Section):
    num_steps: int = 4
    beta_min: float = 0.1
    beta_max: float = 20.0
    z_dim: int = 100
    # x0: the DiT's first C output channels are x0' (DDGAN's own choice, well conditioned at every
    # level); eps: read them as eps, as a pretrained DiT does (for fine-tuning) [INFERRED].
    parameterization: DDGANParameterization = "x0"
    r1_gamma: float = 0.02
    r1_interval: int = 1
    mse_weight: float = 0.0  # optional denoising regulariser on x0', not in DDGAN [INFERRED]
    # tanh on x0' (parameterization x0), as the official generator's last layer: keeps x0' in
    # [-1, 1]. Meant for pixels; SD-VAE latents reach past +-1, so a tanh there would clip them.
    x0_tanh: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("num_steps", "z_dim", "r1_interval")
        if self.x0_tanh and self.parameterization != "x0":
            raise ConfigError(f"config key {self.key('x0_tanh')!r} squashes a predicted x0; "
                              f"{self.key('parameterization')!r} is {self.parameterization!r}, expected 'x0'")


@dataclass
class EvalConfig(Section):
    """FID of the EMA weights during training (trainer/evaluation/sampling.py); sampled with ``sample.*``.

    Evaluation only reads the weights, so every key may change on resume (and checkpoints made
    before this section lack its keys)."""

    fid_every: int = 0  # steps between FID measurements; 0: never
    fid_samples: int = 5000  # logged as fid5k
    final_fid_samples: int = 0  # at the last step (50000: FID-50K); 0: none
    # An ADM reference batch (VIRTUAL_imagenet256_labeled.npz), a file of advdit fid --save-stats,
    # or shards (a folder or pattern) whose statistics are computed once and cached in cache_dir.
    reference: str | None = None
    inception_weights: str | None = None  # null: $ADVDIT_INCEPTION_WEIGHTS
    feature_net: str | None = None  # null: the TF-ported Inception-v3; or a spec JSON (tests)
    batch_size: int = 64  # per process, for sampling and features
    cache_dir: str = "~/.cache/advdit/fid"
    # Also class consistency and precision/recall (k=3) against the reference's features: for a
    # feature network trained on the data set's own classes (advdit digits classifier) and a
    # reference of shards small enough to hold in memory (the digits' held-out split).
    class_metrics: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("batch_size")
        for attribute in ("fid_every", "final_fid_samples"):
            if getattr(self, attribute) < 0:
                raise ConfigError(f"config key {self.key(attribute)!r} must be >= 0 (0 turns it off)")
        if (self.fid_every or self.final_fid_samples) and not self.reference:
            raise ConfigError("FID during training (eval.fid_every / eval.final_fid_samples) needs "
                              "eval.reference: an ADM reference batch .npz, a statistics .npz or shards")
        if self.class_metrics and not self.feature_net:
            raise ConfigError("eval.class_metrics needs eval.feature_net: a classifier of the data set's "
                              "classes (advdit digits classifier), not the ImageNet Inception network")
        if self.fid_every and self.fid_samples < 2:
            raise ConfigError("config key 'eval.fid_samples' must be >= 2 (a covariance needs 2 images)")


@dataclass
class TrackingConfig(Section):
    """MLflow; where and how a run is recorded, so every key may change on resume."""

    enabled: bool = True
    # null: a sqlite store inside the run's output folder, unless MLFLOW_TRACKING_URI is set.
    uri: str | None = None
    experiment: str = "advdit"
    # At the end of a run, how long to wait for records MLflow has not taken yet (a resumed run
    # sends what is still missing); short enough to fit Slurm's KillWait after SIGTERM.
    flush_seconds: float = 15.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_range("flush_seconds", 0.0, True)


@dataclass
class Config(Section):
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # "none" trains in pixel space; otherwise a local folder (or hub id) of an SD-VAE.
    vae: str = "none"
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    objective: Objective = "dit"
    disc: DiscConfig = field(default_factory=DiscConfig)
    sadm: SADMConfig = field(default_factory=SADMConfig)
    diffusion_gan: DiffusionGANConfig = field(default_factory=DiffusionGANConfig)
    ddgan: DDGANConfig = field(default_factory=DDGANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=MAY_CHANGE_ON_RESUME)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=MAY_CHANGE_ON_RESUME)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad_classes = [c for c in self.sample.grid_classes if not 0 <= c < self.model.num_classes]
        if bad_classes:
            raise ConfigError(
                f"config key 'sample.grid_classes' has labels {bad_classes} outside "
                f"[0, {self.model.num_classes}) (model.num_classes)"
            )


# Sections that only one objective reads (and disc, which every adversarial objective reads).
METHOD_SECTIONS = {"sadm": ("sadm",), "diffusion_gan": ("diffusion_gan",), "ddgan": ("ddgan",),
                   "disc": ("sadm", "diffusion_gan", "ddgan")}


# ---------------------------------------------------------------------- checking values
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _section_names() -> dict[type, str]:
    """Each section class and its key in the config, e.g. OptimConfig -> "optim"."""
    hints = _hints(Config)
    return {hints[f.name]: key_name(f.name) for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(hints[f.name])}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r} expects null, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects a boolean (true/false), got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(
            f"config key {key!r} expects {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _check_finite_and_printable(key: str, value: Any) -> None:
    """Every float is finite, and no string holds a control character (a newline in a run name
    would end a line of a rendered job script)."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"config key {key!r} must be a finite number, got {item!r}")
        if isinstance(item, str) and (bad := control_character(item)):
            raise ConfigError(f"config key {key!r} holds the control character {bad!r}; "
                              "names and paths must be printable text")


def control_character(text: str) -> str | None:
    """The first control character of ``text`` (newline, carriage return, tab, escape, ...)."""
    return next((char for char in text if unicodedata.category(char) == "Cc"), None)


# ---------------------------------------------------------------------- keys and forms
def key_name(field_name: str) -> str:
    """The config key of a dataclass field: ``lambda_`` (a Python keyword) is written ``lambda``."""
    return field_name.rstrip("_")


def to_dict(node: Any) -> dict[str, Any]:
    """The config as nested plain dicts, keyed by config key names."""
    return {
        key_name(f.name): to_dict(value) if dataclasses.is_dataclass(value) else value
        for f in dataclasses.fields(node)
        for value in [getattr(node, f.name)]
    }


def flatten(cfg: Config) -> dict[str, Any]:
    """{"train.steps": 200, ...}: the form MLflow params take."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            else:
                flat[f"{prefix}{name}"] = value

    walk(to_dict(cfg), "")
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`: {"train.steps": 200} -> {"train": {"steps": 200}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def all_keys(cfg: Config | Section) -> list[str]:
    """Every dotted leaf key of the config (or of a section)."""
    return list(flatten(cfg))


def with_settings(base: SectionT, settings: dict[str, Any] | Sequence[str]) -> SectionT:
    """``base``, a ``Section`` used outside ``Config`` (the 25-Gaussians benchmark's settings), with
    ``settings`` applied: a mapping of key -> value or ``key=value`` texts read as overrides are.
    Checked exactly as a config section: unknown keys with the closest valid one, types, rules."""
    valid = all_keys(base)
    values = to_dict(base)
    pairs = settings.items() if isinstance(settings, dict) else map(parse_override, settings)
    for key, value in pairs:
        if key not in valid:
            raise _unknown_key(key, valid)
        values[key] = value
    return _build(type(base), values)


@functools.cache
def resume_changeable_keys() -> frozenset[str]:
    """The keys that may differ between a checkpoint's config and the resuming run's: fields (or
    whole sections) marked with :data:`MAY_CHANGE_ON_RESUME`."""
    keys = set()
    hints = _hints(Config)
    for f in dataclasses.fields(Config):
        section, whole = hints[f.name], f.metadata == MAY_CHANGE_ON_RESUME
        if not dataclasses.is_dataclass(section):
            keys.update([key_name(f.name)] if whole else [])
            continue
        keys.update(f"{key_name(f.name)}.{key_name(g.name)}" for g in dataclasses.fields(section)
                    if whole or g.metadata == MAY_CHANGE_ON_RESUME)
    return frozenset(keys)


# ---------------------------------------------------------------------- config files and presets
PRESETS = "advdit.configs"  # configs/ of the repository, shipped as package data
INCLUDE = "include"  # a file's list of config files merged before its own keys
ConfigFiles = str | Path | Sequence[str | Path] | None


def package_folder(package: str) -> Path:
    """The folder of one of advdit's packages of data (``advdit.configs``, ``advdit.slurm``)."""
    try:
        # advdit is installed unpacked (never as a zip), so its data are files on disk.
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError as err:  # an editable install made before the package existed
        raise ConfigError(f"advdit's package {package} is not installed; reinstall advdit (make, or "
                          "pip install -e . in its checkout)") from err


def preset_root() -> Path:
    """The folder of the presets shipped with advdit."""
    return package_folder(PRESETS)


def preset_names() -> list[str]:
    """Every preset, named as ``--config`` takes it: ``demo``, ``imagenet/base``, ``methods/sadm``."""
    root = preset_root()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def find_config(ref: str | Path, folder: Path | None = None) -> Path:
    """The config file ``ref``: a path relative to ``folder`` (by default the current folder), or
    else a preset of advdit; a name without a suffix also stands for ``name.yaml`` (``imagenet/base``)."""
    name = Path(ref)
    names = [name] if name.suffix else [name, name.with_suffix(".yaml")]
    candidates = [(folder or Path()) / path for path in names]
    if not name.is_absolute() and ".." not in name.parts:
        candidates.append(preset_root() / names[-1])
    for path in candidates:
        if path.is_file():
            return path
    where = "the current folder" if folder is None else str(folder)
    raise ConfigError(f"config file {str(ref)!r} does not exist in {where}, and advdit has no preset of "
                      f"that name (presets: {', '.join(preset_names())})")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a syntax error names the file, line and column."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run:, model:, ...), "
                          f"got {type(data).__name__}")
    return data


def config_layers(ref: str | Path, folder: Path | None = None,
                  chain: tuple[Path, ...] = ()) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The file ``ref`` and the files it includes, as (path, mapping) in the order they apply:
    each included file (after its own includes, relative to the including file's folder), then
    the file itself. ``chain`` holds the including files, to refuse a cycle."""
    path = find_config(ref, folder)
    if path.resolve() in chain:
        raise ConfigError(f"{path}: includes itself ({' -> '.join(map(str, (*chain, path.resolve())))})")
    data = read_yaml(path)
    includes = data.pop(INCLUDE, [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ConfigError(f"{path}: '{INCLUDE}' expects a config file or preset name, or a list of them, "
                          f"got {includes!r}")
    for item in includes:
        yield from config_layers(item, path.parent, (*chain, path.resolve()))
    yield path, data


def _merge(schema: type, target: dict[str, Any], updates: Any, prefix: str, valid: list[str],
           set_keys: set[str]) -> None:
    """Merge the nested mapping ``updates`` into ``target``, refusing keys ``schema`` lacks."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.')!r} must be a mapping, got {updates!r}")
    hints = _hints(schema)
    fields = {key_name(f.name): f.name for f in dataclasses.fields(schema)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, valid)
        if dataclasses.is_dataclass(hints[fields[name]]):
            _merge(hints[fields[name]], target.setdefault(name, {}), value, f"{key}.", valid, set_keys)
        else:
            target[name] = value
            set_keys.add(key)


def _build(schema: type, values: dict[str, Any]) -> Any:
    """An instance of ``schema`` from merged values; each section checks itself as it is built."""
    hints = _hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if (name := key_name(f.name)) in values:
            tp = hints[f.name]
            kwargs[f.name] = _build(tp, values[name]) if dataclasses.is_dataclass(tp) else values[name]
    return schema(**kwargs)


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=200"`` -> ("train.steps", 200); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=200)")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err


def _override(values: dict[str, Any], text: str, valid: list[str], set_keys: set[str]) -> None:
    key, value = parse_override(text)
    section_keys = [k for k in valid if k.startswith(key + ".")]
    if section_keys:
        raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. "
                          f"{section_keys[0]}=...")
    if key not in valid:
        raise _unknown_key(key, valid)
    _merge(Config, values, _nest(key, value), "", valid, set_keys)


def _check_method_keys(cfg: Config, set_keys: set[str]) -> None:
    """A key of a section that the chosen objective does not read is a mistake, not a no-op."""
    for key in sorted(set_keys):
        owners = METHOD_SECTIONS.get(key.split(".")[0])
        if owners and cfg.objective not in owners:
            which = f"objective {owners[0]!r}" if len(owners) == 1 else "the adversarial objectives"
            raise ConfigError(
                f"config key {key!r} belongs to {which}, but objective is {cfg.objective!r}; "
                f"remove it or set objective={owners[0]}"
            )


def load_config(configs: ConfigFiles = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None, folder: Path | None = None) -> Config:
    """Defaults, then ``base`` (a nested dict, e.g. a checkpoint's recorded config), then each
    config file of ``configs`` in order (paths relative to ``folder``, or preset names; see
    :func:`find_config`), each after the files it includes, then each ``key=value`` override;
    validated as the config is built."""
    valid = all_keys(Config())
    values: dict[str, Any] = {}
    set_keys: set[str] = set()
    if base:
        # A recorded config holds every key, also of other objectives' sections: not "set" by a user.
        _merge(Config, values, base, "", valid, set())
    for ref in [configs] if isinstance(configs, (str, Path)) else configs or []:
        for path, data in config_layers(ref, folder):
            try:
                _merge(Config, values, data, "", valid, set_keys)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
    for text in overrides:
        _override(values, text, valid, set_keys)
    cfg = _build(Config, values)
    _check_method_keys(cfg, set_keys)
    return cfg


def config_hash(cfg: Config) -> str:
    """A short digest of the resolved config, stored with checkpoints."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
