"""Typed run configuration: YAML presets, dotted command-line overrides, validation.

The schema is a tree of dataclasses. A YAML file is merged onto the defaults, then overrides such as
``train.steps=200`` are applied; every key and every value is checked against the schema, and a
mistake names the key, what was expected and (for unknown keys) the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


@dataclass
class RunConfig:
    name: str = "advdit"
    output_dir: str = "runs/advdit"
    seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "DiT-XL/2"
    # Override the named size, for small networks (tests, the CPU demo); null keeps the size's own.
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_classes: int = 1000
    class_dropout: float = 0.1
    learn_sigma: bool = True
    attention: str = "auto"
    grad_checkpointing: bool = False
    # torch.compile: none | blocks (each DiT block) | model (the whole denoiser; fastest on CPU)
    compile: str = "none"


@dataclass
class DiffusionConfig:
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class DataConfig:
    # A shard directory (with manifest.json or *.tar files), a brace pattern such as
    # "data/train-{000000..000099}.tar", or a list of tar paths.
    shards: str | list[str] = "data/demo/train"
    image_size: int = 256
    batch_size: int = 32  # per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    random_flip: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0
    fused: bool | None = None  # AdamW's fused kernel; null: on (CUDA and CPU)


@dataclass
class DistributedConfig:
    # ddp | zero2 | zero3 (DeepSpeed ZeRO through accelerate; trainer/engines.py)
    strategy: str = "ddp"
    offload_optimizer: bool = False  # ZeRO only: optimizer states in CPU memory


@dataclass
class TrainConfig:
    steps: int = 400_000
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1+n)/(10+n)); for short runs
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions on CUDA
    log_every: int = 10
    ckpt_every: int = 10_000
    keep_last: int = 3
    sample_every: int = 10_000


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    cfg_scale: float = 1.5
    grid_classes: list[int] = field(default_factory=list)  # empty: spread over all classes
    grid_rows: int = 4


@dataclass
class DiscConfig:
    """The adversary of any adversarial objective (discriminator or structure encoder)."""

    base_channels: int = 64
    num_blocks: int = 2
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    weight_decay: float = 0.0


@dataclass
class SADMConfig:
    """Structure-guided adversarial training; every default here is a reconstruction [INFERRED]."""

    lambda_: float = 0.1  # weight of the structural distance in the denoiser's loss
    affinity: str = "cosine"  # cosine | gaussian | softmax
    tau: float = 0.5  # Gaussian bandwidth / softmax temperature
    distance: str = "l1"  # l1 | l2 | kl (kl needs affinity=softmax)
    feature_dim: int = 128
    t_conditioned: bool = False
    weighting: str = "snr"  # none | snr | range
    t_max: int = 1000  # with weighting=range: the structure term uses samples with t <= t_max
    warmup_steps: int = 0  # lambda is 0 before this step


@dataclass
class DiffusionGANConfig:
    weight: float = 0.1  # weight of the generator loss in the denoiser's loss [INFERRED]
    t_min: int = 10
    t_max: int = 1000
    noise_std: float = 0.5  # latents have std ~1; 0.05 is the paper's value for pixels
    ts_dist: str = "priority"  # priority | uniform
    clean_fraction: float = 0.5
    target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    r1_gamma: float = 0.05
    r1_interval: int = 16


@dataclass
class DDGANConfig:
    num_steps: int = 4
    beta_min: float = 0.1
    beta_max: float = 20.0
    z_dim: int = 100
    # x0: the DiT's first C output channels are x0' (DDGAN's own choice, well conditioned at every
    # level); eps: read them as eps, as a pretrained DiT does (for fine-tuning) [INFERRED].
    parameterization: str = "x0"
    r1_gamma: float = 0.02
    r1_interval: int = 1
    mse_weight: float = 0.0  # optional denoising regulariser on x0', not in DDGAN [INFERRED]


@dataclass
class EvalConfig:
    """FID of the EMA weights during training (trainer/evaluate.py); sampled with ``sample.*``."""

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


@dataclass
class TrackingConfig:
    enabled: bool = True
    # null: a sqlite store inside the run's output folder, unless MLFLOW_TRACKING_URI is set.
    uri: str | None = None
    experiment: str = "advdit"
    # At the end of a run, how long to wait for records MLflow has not taken yet (a resumed run
    # sends what is still missing); short enough to fit Slurm's KillWait after SIGTERM.
    flush_seconds: float = 15.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # "none" trains in pixel space; otherwise a local folder (or hub id) of an SD-VAE.
    vae: str = "none"
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # dit | sadm | diffusion_gan | ddgan: what one training step optimises.
    objective: str = "dit"
    disc: DiscConfig = field(default_factory=DiscConfig)
    sadm: SADMConfig = field(default_factory=SADMConfig)
    diffusion_gan: DiffusionGANConfig = field(default_factory=DiffusionGANConfig)
    ddgan: DDGANConfig = field(default_factory=DDGANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


OBJECTIVES = ("dit", "sadm", "diffusion_gan", "ddgan")
# Sections that only one objective reads (and disc, which every adversarial objective reads).
METHOD_SECTIONS = {"sadm": ("sadm",), "diffusion_gan": ("diffusion_gan",), "ddgan": ("ddgan",),
                   "disc": ("sadm", "diffusion_gan", "ddgan")}

CHOICES = {
    "objective": OBJECTIVES,
    "distributed.strategy": ("ddp", "zero2", "zero3"),
    "model.attention": ("auto", "xformers", "sdpa", "math"),
    "model.compile": ("none", "blocks", "model"),
    "sadm.affinity": ("cosine", "gaussian", "softmax"),
    "sadm.distance": ("l1", "l2", "kl"),
    "sadm.weighting": ("none", "snr", "range"),
    "diffusion_gan.ts_dist": ("priority", "uniform"),
    "ddgan.parameterization": ("x0", "eps"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "sample.sampler": ("ddim", "ddpm"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
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


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def key_name(field_name: str) -> str:
    """The config key of a dataclass field: ``lambda_`` (a Python keyword) is written ``lambda``."""
    return field_name.rstrip("_")


def get_value(cfg: Config, key: str) -> Any:
    """The value at a dotted key, e.g. ``get_value(cfg, "sadm.lambda")``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part if hasattr(node, part) else part + "_")
    return node


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


def all_keys(cfg: Config) -> list[str]:
    """Every dotted leaf key of the config."""
    return list(flatten(cfg))


def _merge(node: Any, updates: dict[str, Any], prefix: str, valid: list[str], set_keys: set[str]) -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.')!r} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(node))
    fields = {key_name(f.name): f.name for f in dataclasses.fields(node)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, valid)
        attribute = fields[name]
        current = getattr(node, attribute)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{key}.", valid, set_keys)
        else:
            setattr(node, attribute, _coerce(value, hints[attribute], key))
            set_keys.add(key)


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


# Ranges of the optimisers' values, checked before anything is built or written: an lr of NaN or
# inf would otherwise train (and checkpoint) non-finite weights.
RANGES = {
    "optim.lr": (0.0, False, None), "disc.lr": (0.0, False, None),
    "optim.weight_decay": (0.0, True, None), "disc.weight_decay": (0.0, True, None),
    "optim.beta1": (0.0, True, 1.0), "optim.beta2": (0.0, True, 1.0),
    "disc.beta1": (0.0, True, 1.0), "disc.beta2": (0.0, True, 1.0),
    "optim.grad_clip": (0.0, True, None), "optim.warmup_steps": (0, True, None),
    "tracking.flush_seconds": (0.0, True, None),
}


def _check_range(key: str, value: float, low: float, inclusive: bool, high: float | None) -> None:
    above = value >= low if inclusive else value > low
    if not (above and (high is None or value < high)):
        bounds = f"{'[' if inclusive else '('}{low}, {high if high is not None else 'inf'})"
        raise ConfigError(f"config key {key!r} must be in {bounds}, got {value!r}")


def _check_values(cfg: Config) -> None:
    """Every float is finite, no string holds a control character (a newline in a run name would
    end a line of a rendered job script), and the optimisers' values are in range."""
    for key, value in flatten(cfg).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"config key {key!r} must be a finite number, got {item!r}")
            if isinstance(item, str) and (bad := control_character(item)):
                raise ConfigError(f"config key {key!r} holds the control character {bad!r}; "
                                  "names and paths must be printable text")
    for key, bounds in RANGES.items():
        _check_range(key, get_value(cfg, key), *bounds)


def control_character(text: str) -> str | None:
    """The first control character of ``text`` (newline, carriage return, tab, escape, ...)."""
    return next((char for char in text if unicodedata.category(char) == "Cc"), None)


def _validate(cfg: Config, set_keys: set[str]) -> None:
    _check_values(cfg)
    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}")
    positive = ["data.batch_size", "data.image_size", "train.steps", "train.log_every",
                "train.ckpt_every", "train.keep_last", "train.sample_every", "sample.steps",
                "diffusion.steps", "model.num_classes", "ddgan.num_steps", "ddgan.z_dim",
                "ddgan.r1_interval", "diffusion_gan.r1_interval", "disc.base_channels",
                "disc.num_blocks", "sadm.feature_dim", "eval.batch_size"]
    for key in positive:
        if get_value(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} must be positive")
    if not 0.0 <= cfg.model.class_dropout < 1.0:
        raise ConfigError("config key 'model.class_dropout' must be in [0, 1)")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError("config key 'train.ema_decay' must be in [0, 1)")
    for key in ("eval.fid_every", "eval.final_fid_samples"):
        if get_value(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0 (0 turns it off)")
    if (cfg.eval.fid_every or cfg.eval.final_fid_samples) and not cfg.eval.reference:
        raise ConfigError("FID during training (eval.fid_every / eval.final_fid_samples) needs "
                          "eval.reference: an ADM reference batch .npz, a statistics .npz or shards")
    if cfg.eval.fid_every and cfg.eval.fid_samples < 2:
        raise ConfigError("config key 'eval.fid_samples' must be >= 2 (a covariance needs 2 images)")
    if cfg.sadm.distance == "kl" and cfg.sadm.affinity != "softmax":
        raise ConfigError("config key 'sadm.distance' = 'kl' needs sadm.affinity=softmax (row distributions)")
    bad_classes = [c for c in cfg.sample.grid_classes if not 0 <= c < cfg.model.num_classes]
    if bad_classes:
        raise ConfigError(
            f"config key 'sample.grid_classes' has labels {bad_classes} outside "
            f"[0, {cfg.model.num_classes}) (model.num_classes)"
        )
    _check_method_keys(cfg, set_keys)


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``base`` (a nested dict, e.g. a checkpoint's recorded config), then the YAML
    file at ``path``, then each ``key=value`` override, validated."""
    cfg = Config()
    valid = all_keys(cfg)
    set_keys: set[str] = set()
    if base:
        # A recorded config holds every key, also of other objectives' sections: not "set" by a user.
        _merge(cfg, base, "", valid, set())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        _merge(cfg, read_yaml(path), "", valid, set_keys)
    for text in overrides:
        key, value = parse_override(text)
        section_keys = [k for k in valid if k.startswith(key + ".")]
        if section_keys:
            raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. "
                              f"{section_keys[0]}=...")
        if key not in valid:
            raise _unknown_key(key, valid)
        _merge(cfg, _nest(key, value), "", valid, set_keys)
    _validate(cfg, set_keys)
    return cfg


def config_hash(cfg: Config) -> str:
    """A short digest of the resolved config, stored with checkpoints."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
