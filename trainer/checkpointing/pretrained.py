"""Published DiT weights as a starting point (``model.init_from``) or as something to sample.

Sources, told apart by what is on disk:

- an official DiT checkpoint (``DiT-XL-2-256x256.pt``): a state dict of facebookresearch/DiT's
  model, or its train.py's checkpoint with the weights under ``"ema"`` and ``"model"``
  (``model.init_entry`` picks one);
- a diffusers ``DiTTransformer2DModel`` folder (config.json + safetensors), or a pipeline folder
  holding one under ``transformer/``;
- advdit's own: a file written by ``advdit export`` or a checkpoint folder.

Only tensors are read: torch files through the weights-only unpickler (which refuses anything a
file could use to run code), the rest as safetensors. The denoiser's shape is checked against the
run's before anything is loaded, each difference named with both sides. The position table is the
fixed sin-cos one, so it is never loaded: a 256 checkpoint starts a 512 run with the table
computed for the larger grid.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...models.dit import SIZES, DiT, sincos_pos_embed_2d
from ...models.vae import codec_downsample
from ...models.weight_layouts import (
    DiTShape,
    Tensors,
    WeightLayoutError,
    shape_of,
    to_advdit,
)
from ..runtime.files import file_sha256
from .export import ema_state, raw_state
from .store import META, CheckpointError, read_meta, read_safetensors

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys of a run's network a published DiT does not have: DDGAN's latent input, which starts at
# its zero-initialised output layer (the DiT's function unchanged). The position table is the
# fixed sin-cos one, recomputed for the run's grid.
RUN_ONLY_PREFIXES = ("z_embedder.", "pos_embed")


class PretrainedError(CheckpointError):
    """Published weights that cannot be read, or do not fit the configured network."""


@dataclass
class Pretrained:
    """Weights in advdit's layout, where they came from, and what the source said about them."""

    path: Path
    format: str  # official | diffusers | advdit
    files: list[Path]  # what identifies the weights: the file(s) read, or a checkpoint's meta.json
    state: Tensors
    config: dict[str, Any] = field(default_factory=dict)  # diffusers' config.json or advdit's recorded one

    @property
    def shape(self) -> DiTShape:
        return shape_of(self.state)

    @functools.cached_property
    def sha256(self) -> str:
        """Of the weights file, or the SHA-256 of a sharded model's files' digests in name order;
        computed when asked (a run records it, sampling never needs it)."""
        if len(self.files) == 1:
            return file_sha256(self.files[0])
        return hashlib.sha256("".join(file_sha256(f) for f in self.files).encode()).hexdigest()

    def describe(self) -> str:
        return f"{self.path} ({self.format} DiT weights, sha256 {self.sha256[:12]})"


def read_pretrained(path: str | Path, entry: str = "ema") -> Pretrained:
    """The DiT weights at ``path`` (any source above); ``entry`` picks ``ema`` or ``model`` where
    the source holds both (an official train.py checkpoint, an advdit checkpoint folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PretrainedError(f"model.init_from {path}: no such file or folder (official DiT .pt, "
                              "diffusers DiTTransformer2DModel folder, or advdit export)")
    if path.is_dir():
        return _read_folder(path, entry)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        config = json.loads(metadata["advdit_config"]) if "advdit_config" in metadata else {}
        return _converted(path, tensors, [path], config)
    if path.suffix in TORCH_SUFFIXES:
        return _converted(path, _torch_weights(path, entry), [path])
    raise PretrainedError(f"model.init_from {path}: expected a .pt/.pth/.bin/.ckpt or .safetensors file, "
                          "or a folder")


def _read_folder(path: Path, entry: str) -> Pretrained:
    if (path / META).is_file():  # an advdit checkpoint; its meta.json holds every file's checksum
        state = ema_state(path) if entry == "ema" else raw_state(path)
        return Pretrained(path, "advdit", [path / META], state, read_meta(path)["config"])
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"  # a diffusers pipeline folder
    config_file = path / DIFFUSERS_CONFIG
    if not config_file.is_file():
        raise PretrainedError(f"model.init_from {path}: a folder that is neither an advdit checkpoint "
                              f"({META}) nor a diffusers model ({DIFFUSERS_CONFIG})")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != "DiTTransformer2DModel":
        raise PretrainedError(f"model.init_from {path}: {DIFFUSERS_CONFIG} describes a "
                              f"{config.get('_class_name')!r}, expected a DiTTransformer2DModel")
    files = _diffusers_files(path)
    state: Tensors = {}
    for file in files:
        is_safetensors = file.suffix == ".safetensors"
        state.update(read_safetensors(file)[0] if is_safetensors else _torch_weights(file, entry))
    return _converted(path, state, files, config)


def _diffusers_files(path: Path) -> list[Path]:
    if (path / DIFFUSERS_INDEX).is_file():
        weight_map = json.loads((path / DIFFUSERS_INDEX).read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            return [path / name]
    raise PretrainedError(f"model.init_from {path}: no {' or '.join(DIFFUSERS_WEIGHTS)} "
                          f"next to {DIFFUSERS_CONFIG}")


def _torch_weights(path: Path, entry: str) -> Tensors:
    """A torch file's tensors, through the weights-only unpickler; an official train.py checkpoint's
    ``entry``. Its ``args`` (an argparse.Namespace of plain values) is the one object allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PretrainedError(f"model.init_from {path}: refused, it is not a file of tensors that the "
                              f"weights-only loader can read ({first})") from err
    if isinstance(loaded, dict) and entry in loaded and isinstance(loaded[entry], dict):
        loaded = loaded[entry]
    elif isinstance(loaded, dict) and (entries := sorted({"ema", "model"} & set(loaded))):
        raise PretrainedError(f"model.init_from {path}: holds {entries}, not model.init_entry={entry!r}")
    tensors_only = isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values())
    if not (tensors_only and loaded):
        raise PretrainedError(f"model.init_from {path}: expected a state dict of tensors (plain, or under "
                              f"'ema'/'model'), got a {type(loaded).__name__}")
    return loaded


def _converted(path: Path, state: Tensors, files: list[Path],
               config: dict[str, Any] | None = None) -> Pretrained:
    try:
        converted, layout = to_advdit(state)
    except (WeightLayoutError, KeyError) as err:
        raise PretrainedError(f"model.init_from {path}: {err}") from err
    return Pretrained(path, layout, files, converted, config or {})


def _model_shape(model: DiT) -> DiTShape:
    return shape_of(model.state_dict())


def _mismatches(source: Pretrained, model: DiT) -> list[str]:
    """One line per way the source's network differs from the run's (both sides named)."""
    have, want = source.shape, _model_shape(model)
    lines = []
    if (have.depth, have.hidden_size) != (want.depth, want.hidden_size):
        lines.append(f"the file's DiT has depth {have.depth} and hidden size {have.hidden_size} "
                     f"({size_name(have)}), the run's depth {want.depth} and hidden size {want.hidden_size} "
                     f"({size_name(want)}; model.arch, model.depth, model.hidden_size)")
    if have.patch_size != want.patch_size:
        lines.append(f"patch size {have.patch_size} in the file, {want.patch_size} in model.arch")
    if have.in_channels != want.in_channels:
        lines.append(f"the file's DiT takes {have.in_channels} input channels, the run's {want.in_channels} "
                     "(4: SD-VAE latents, 3: pixels with vae none)")
    if have.learn_sigma != want.learn_sigma:
        lines.append(f"the file's DiT {'learns' if have.learn_sigma else 'does not learn'} sigma "
                     f"({have.out_channels} output channels), model.learn_sigma={want.learn_sigma}")
    if have.label_rows != want.label_rows:
        lines.append(f"the file has {have.label_rows - 1} classes (+ the null class), model.num_classes="
                     f"{want.label_rows - 1}")
    file_heads, num_heads = source.config.get("num_attention_heads"), model.blocks[0].attn.num_heads
    if file_heads is not None and file_heads != num_heads:
        lines.append(f"the file's DiT has {file_heads} attention heads, the run's {num_heads} "
                     "(model.num_heads)")
    return lines


def size_name(shape: DiTShape) -> str:
    """``DiT-XL/2`` where the depth and width are a named size, else a description."""
    for name, size in SIZES.items():
        if (size.depth, size.hidden_size) == (shape.depth, shape.hidden_size):
            return f"DiT-{name}/{shape.patch_size}"
    return f"a custom DiT/{shape.patch_size}"


def _check_position_table(source: Pretrained, model: DiT) -> str | None:
    """A note when the table is recomputed for another grid; an error when the file's table is not
    the fixed sin-cos one (a learned table cannot be carried to another grid)."""
    table = source.state.get("pos_embed")
    want = model.input_size // model.patch_size
    have = source.shape.grid_size
    if table is None or have is None:
        return None
    if have != want:
        return f"position table computed for a {want}x{want} grid (the file's was {have}x{have})"
    expected = sincos_pos_embed_2d(table.shape[-1], have).reshape(table.shape)
    if not torch.allclose(table.float(), expected, atol=1e-4):
        raise PretrainedError(f"model.init_from {source.path}: its position table is not the fixed 2-D "
                              "sin-cos table, which is the only kind advdit's DiT has")
    return None


def load_pretrained(model: DiT, source: Pretrained) -> list[str]:
    """Copy ``source``'s weights into ``model`` after checking they fit; returns notes on what was
    not taken from the file (kept as initialised, or recomputed)."""
    problems = _mismatches(source, model)
    if problems:
        raise PretrainedError(f"model.init_from {source.path} does not fit the configured DiT: "
                              + "; ".join(problems))
    notes = [note] if (note := _check_position_table(source, model)) else []
    weights = {key: value for key, value in source.state.items() if key != "pos_embed"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    lacking = [key for key in missing if not key.startswith(RUN_ONLY_PREFIXES)]
    if lacking or unexpected:
        parts = ([f"lacks {', '.join(lacking[:4])}"] if lacking else []) + (
            [f"has keys the run's DiT lacks: {', '.join(unexpected[:4])}"] if unexpected else [])
        raise PretrainedError(f"model.init_from {source.path}: {'; '.join(parts)}")
    if any(key.startswith("z_embedder.") for key in missing):
        notes.append("the latent z input (DDGAN) starts at zero output, so the DiT's function is unchanged")
    return notes


def network_settings(source: Pretrained, vae: str | None) -> dict[str, Any]:
    """Flattened config keys that build the DiT ``source`` holds (for sampling it without a run's
    config): its size, classes and learned sigma, the codec (``vae`` for 4 input channels, pixels
    for 3) and the image size its grid implies. The timestep frequencies are the official DiT's."""
    shape = source.shape
    grid = shape.grid_size
    if grid is None:
        if (size := source.config.get("sample_size")) is None:
            raise PretrainedError(f"{source.path}: neither a position table nor a sample_size gives the grid")
        grid = size // shape.patch_size
    if shape.in_channels == 3:
        vae = "none"
    elif vae is None:
        raise PretrainedError(f"{source.path} is a DiT on {shape.in_channels}-channel latents: pass "
                              "--vae DIR, a local SD-VAE folder (e.g. a copy of stabilityai/sd-vae-ft-ema)")
    arch = size_name(shape)
    named = not arch.startswith("a custom")
    settings: dict[str, Any] = {
        "objective": "dit", "vae": vae,
        "model.arch": arch if named else f"DiT-S/{shape.patch_size}",
        "model.num_classes": shape.label_rows - 1,
        "model.learn_sigma": shape.learn_sigma,
        "data.image_size": grid * shape.patch_size * codec_downsample(vae),
    }
    if not named:
        settings |= {"model.depth": shape.depth, "model.hidden_size": shape.hidden_size}
    if (heads := source.config.get("num_attention_heads")) is not None:
        settings["model.num_heads"] = heads
    elif not named:
        raise PretrainedError(f"{source.path}: a DiT of no named size, and the file does not say "
                              "its head count")
    return settings
