"""The DiT's weights under the three names the field uses for them, and what a state dict says
about the network that wrote it.

- ``advdit``: this package's :class:`~advdit.models.dit.DiT`.
- ``official``: facebookresearch/DiT's ``models.py``. The same modules and names except the label
  table, which sits one level deeper (``y_embedder.embedding_table.weight``).
- ``diffusers``: ``DiTTransformer2DModel``. The fused qkv projection is three matrices; every
  block carries its own copy of the timestep and label embedders (converted checkpoints hold one
  network's embedders copied into each block, which is the only kind advdit can represent); the
  final layer is ``proj_out_1`` (modulation) and ``proj_out_2`` (output projection).

Pure functions on state dicts: reading files is the trainer's job (trainer/checkpointing/pretrained.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]

OFFICIAL_LABEL_TABLE = "y_embedder.embedding_table.weight"
ADVDIT_LABEL_TABLE = "y_embedder.weight"


class WeightLayoutError(ValueError):
    """A state dict that is not a DiT of the layout it was read as."""


@dataclass(frozen=True)
class DiTShape:
    """What a DiT state dict fixes about its network (the head count is not among it)."""

    depth: int
    hidden_size: int
    patch_size: int
    in_channels: int
    out_channels: int
    label_rows: int  # num_classes + 1: the last row is the null class of classifier-free guidance
    grid_size: int | None  # tokens per side, where the state holds the position table
    z_dim: int  # DDGAN's latent input, 0 for a plain DiT

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels


def detect_layout(state: Tensors) -> str:
    """``advdit``, ``official`` or ``diffusers``, from the names of the keys."""
    if "pos_embed.proj.weight" in state and "proj_out_2.weight" in state:
        return "diffusers"
    if "x_embedder.proj.weight" in state and "final_layer.linear.weight" in state:
        return "official" if OFFICIAL_LABEL_TABLE in state else "advdit"
    sample = ", ".join(sorted(state)[:4]) or "no tensors"
    raise WeightLayoutError(f"the weights are not a DiT's in any known layout (keys: {sample}, ...)")


def official_to_advdit(state: Tensors) -> Tensors:
    return {ADVDIT_LABEL_TABLE if key == OFFICIAL_LABEL_TABLE else key: value for key, value in state.items()}


def advdit_to_official(state: Tensors) -> Tensors:
    return {OFFICIAL_LABEL_TABLE if key == ADVDIT_LABEL_TABLE else key: value for key, value in state.items()}


# advdit name -> diffusers name, per block (qkv is split separately) and for the rest.
_BLOCK_NAMES = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_TOP_NAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# The embedders advdit holds once and diffusers holds in every block.
_EMBEDDER_NAMES = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder": "norm1.emb.class_embedder.embedding_table",
}
_PARAMS = ("weight", "bias")


def block_count(state: Tensors, prefix: str) -> int:
    """How many blocks ``prefix.N.`` the state holds (blocks are numbered from 0)."""
    numbers = {int(key[len(prefix):].split(".")[0]) for key in state if key.startswith(prefix)}
    if numbers != set(range(len(numbers))):
        raise WeightLayoutError(f"the blocks {prefix}N are not numbered 0..{len(numbers) - 1}")
    return len(numbers)


def _renamed(state: Tensors, names: dict[str, str], src: str, dst: str) -> Tensors:
    """``state``'s tensors ``src + name.param`` stored as ``dst + names[name].param``, for every
    name and the parameters (weight, bias) the state has of it."""
    return {f"{dst}{new}.{param}": state[f"{src}{old}.{param}"]
            for old, new in names.items() for param in _PARAMS if f"{src}{old}.{param}" in state}


def _inverse(names: dict[str, str]) -> dict[str, str]:
    return {new: old for old, new in names.items()}


def advdit_to_diffusers(state: Tensors) -> Tensors:
    """advdit's names -> diffusers'; the embedders are copied into every block, as diffusers'
    conversion of the official checkpoints does."""
    if "z_embedder.0.weight" in state:
        raise WeightLayoutError("a DDGAN denoiser takes a latent z, which diffusers' DiTTransformer2DModel "
                                "has no input for")
    out = _renamed(state, _TOP_NAMES, "", "")
    for i in range(block_count(state, "blocks.")):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out.update(_renamed(state, _BLOCK_NAMES, src, dst))
        # Copies, not views: each block owns its embedders in diffusers (and safetensors refuses
        # tensors that share memory).
        out.update({key: value.clone() for key, value in _renamed(state, _EMBEDDER_NAMES, "", dst).items()})
        for param in _PARAMS:
            parts = state[f"{src}attn.qkv.{param}"].chunk(3, dim=0)
            out.update({f"{dst}attn1.to_{name}.{param}": part.clone()
                        for name, part in zip("qkv", parts, strict=True)})
    return out


def diffusers_to_advdit(state: Tensors) -> Tensors:
    """diffusers' names -> advdit's. Refuses blocks whose embedders differ from block 0's: advdit's
    DiT, like the official one, has one timestep and one label embedder."""
    out = _renamed(state, _inverse(_TOP_NAMES), "", "")
    depth = block_count(state, "transformer_blocks.")
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        out.update(_renamed(state, _inverse(_BLOCK_NAMES), src, dst))
        for param in _PARAMS:
            out[f"{dst}attn.qkv.{param}"] = torch.cat(
                [state[f"{src}attn1.to_{name}.{param}"] for name in "qkv"], dim=0)
    first = _renamed(state, _inverse(_EMBEDDER_NAMES), "transformer_blocks.0.", "")
    for i in range(1, depth):
        for key, value in _renamed(state, _inverse(_EMBEDDER_NAMES), f"transformer_blocks.{i}.", "").items():
            if not torch.equal(value, first[key]):
                raise WeightLayoutError(
                    f"block {i}'s copy of {key} differs from block 0's: this diffusers DiT has an "
                    "embedder per block, advdit's DiT (as the official one) has one")
    return {**out, **first}


def to_advdit(state: Tensors) -> tuple[Tensors, str]:
    """Any known layout -> advdit's names, and the layout it was in."""
    layout = detect_layout(state)
    convert = {"advdit": dict, "official": official_to_advdit, "diffusers": diffusers_to_advdit}[layout]
    return convert(state), layout


def shape_of(state: Tensors) -> DiTShape:
    """The network a state dict in advdit's layout belongs to."""
    proj = state["x_embedder.proj.weight"]  # (hidden, in_channels, patch, patch)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_features = state["final_layer.linear.weight"].shape[0]  # patch^2 * out_channels
    pos = state.get("pos_embed")
    z = state.get("z_embedder.0.weight")
    return DiTShape(
        depth=block_count(state, "blocks."), hidden_size=hidden, patch_size=patch,
        in_channels=in_channels, out_channels=out_features // (patch * patch),
        label_rows=state[ADVDIT_LABEL_TABLE].shape[0],
        grid_size=round(pos.shape[-2] ** 0.5) if pos is not None else None,
        z_dim=z.shape[1] if z is not None else 0,
    )


def diffusers_config(shape: DiTShape, num_heads: int, timestep_freq_shift: int) -> dict[str, object]:
    """config.json of a ``DiTTransformer2DModel`` with ``shape``. The LayerNorm epsilon is the
    official DiT's 1e-6 (diffusers' default is 1e-5); the timestep frequencies are not
    configurable in diffusers (it always uses shift 1), so they are only recorded."""
    if shape.grid_size is None:
        raise WeightLayoutError("the weights hold no position table, so their grid size is unknown")
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": num_heads,
        "attention_head_dim": shape.hidden_size // num_heads,
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "num_layers": shape.depth,
        "sample_size": shape.grid_size * shape.patch_size,
        "patch_size": shape.patch_size,
        "num_embeds_ada_norm": shape.label_rows - 1,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "advdit_timestep_freq_shift": timestep_freq_shift,
    }
