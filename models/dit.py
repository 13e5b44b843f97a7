"""DiT: the class-conditional Diffusion Transformer of Peebles & Xie (2023).

adaLN-Zero blocks, a fixed 2-D sin-cos position embedding, a label embedding with one extra row
(the null class, index ``num_classes``) for classifier-free guidance, and learned variance
(``2 * in_channels`` output channels when ``learn_sigma``). Label dropout is not done here: the
training objective replaces labels by the null class with its own seeded generator, so a forward
pass is a pure function of its inputs and a resumed run draws the same dropout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention


@dataclass(frozen=True)
class DiTSize:
    depth: int
    hidden_size: int
    num_heads: int


SIZES = {
    "S": DiTSize(depth=12, hidden_size=384, num_heads=6),
    "B": DiTSize(depth=12, hidden_size=768, num_heads=12),
    "L": DiTSize(depth=24, hidden_size=1024, num_heads=16),
    "XL": DiTSize(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
ARCHS = tuple(f"DiT-{size}/{patch}" for size in SIZES for patch in PATCH_SIZES)


def parse_arch(arch: str) -> tuple[DiTSize, int]:
    """``"DiT-XL/2"`` -> (its size, patch size 2)."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch {arch!r} is unknown; expected one of {', '.join(ARCHS)}")
    size, patch = arch.removeprefix("DiT-").split("/")
    return SIZES[size], int(patch)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with (B, 1, D) shift and scale, as one fused multiply-add."""
    return torch.addcmul(shift, x, 1 + scale)


# 2 * sqrt(2 / pi): GELU's tanh approximation written with a sigmoid (see TanhGELU).
_GELU_SIGMOID_SCALE = 2 * math.sqrt(2 / math.pi)


def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh z) with z = sqrt(2/pi) (x + 0.044715 x^3), written as x * sigmoid(2z)."""
    return x * torch.sigmoid(_GELU_SIGMOID_SCALE * (x + 0.044715 * x * x * x))


class TanhGELU(nn.Module):
    """GELU with the tanh approximation (DiT's MLP activation).

    Under torch.compile it is written as x * sigmoid(2z), the same function as
    0.5 x (1 + tanh z) with z = sqrt(2/pi) (x + 0.044715 x^3), since (1 + tanh z) / 2 = sigmoid(2z):
    the compiled loop then needs one exp, where a tanh costs several times as much on CPU
    (measured: the compiled forward and backward took half the time of the tanh form). Eager, it
    is torch's own GELU kernel, the fastest there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return gelu_tanh_as_sigmoid(x)
        return F.gelu(x, approximate="tanh")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first as in DiT.

    Frequency i is max_period^(-i / (half - freq_shift)): the official DiT divides by half
    (``freq_shift=0``), diffusers' DiTTransformer2DModel by half - 1 (``freq_shift=1``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: int = 0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed (grid_size**2, dim) position table: half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D position embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    # DiT's table puts the column (width) code first, then the row code.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend=attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, hidden_size * 4, act_layer=TanhGELU)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # (B, 1, D) each, broadcast over the tokens; residual + gate * branch is one addcmul.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).unsqueeze(1).chunk(6, dim=2)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT. ``forward(x, t, y)`` returns eps (and the variance interpolant)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attention: str = "auto",
        grad_checkpointing: bool = False,
        z_dim: int = 0,
        timestep_freq_shift: int = 0,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        # One extra row: the null class used for classifier-free guidance.
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        # DDGAN's latent z (a multimodal denoising step) enters the conditioning like t and y.
        self.z_dim = z_dim
        self.z_embedder = (
            nn.Sequential(nn.Linear(z_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            if z_dim else None
        )
        grid_size = input_size // patch_size
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(hidden_size, grid_size).unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, attention) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch projection is a linear map on flattened patches: initialise it as one.
        proj = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.z_embedder is not None:
            # Zero output layer: a pretrained DiT given a z input starts out unchanged.
            nn.init.zeros_(self.z_embedder[-1].weight)
        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def compile_for_training(self, scope: str) -> None:
        """torch.compile (model.compile): ``blocks`` compiles each block (one compilation serves
        all, since they share their code; gradients of each block are ready as it finishes, for
        DDP's overlap), ``model`` the whole forward pass (also fuses across block boundaries:
        0.95x the step time of ``blocks`` on the 2-core CPU, after a longer first compile)."""
        if scope == "model":
            self.compile()
            return
        for block in self.blocks:
            block.compile()

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        side = self.input_size // p
        x = tokens.reshape(tokens.shape[0], side, side, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(tokens.shape[0], c, side * p, side * p)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)
        if (z is None) != (self.z_embedder is None):
            raise ValueError(f"this DiT has z_dim={self.z_dim}; z must be given exactly when z_dim > 0")
        return c if z is None else c + self.z_embedder(z)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy input; t: (B,) timesteps; y: (B,) labels, null class allowed;
        z: (B, z_dim) latent noise, only for a DiT built with z_dim > 0 (DDGAN)."""
        # Contiguous (B, N, D): the patch embedding's transposed view would otherwise give the whole
        # residual stream a (B, D, N) layout, and every LayerNorm a copy.
        tokens = (self.x_embedder(x) + self.pos_embed).contiguous()
        c = self.conditioning(t, y, z)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


def resolve_size(arch: str, depth: int | None = None, hidden_size: int | None = None,
                 num_heads: int | None = None) -> tuple[DiTSize, int]:
    """The size of ``arch`` with any given dimension overriding it, and its patch size."""
    size, patch_size = parse_arch(arch)
    overrides = {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads}
    return dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None}), patch_size


def build_dit(arch: str, depth: int | None = None, hidden_size: int | None = None,
              num_heads: int | None = None, **kwargs: object) -> DiT:
    """A DiT of a named size, e.g. ``build_dit("DiT-XL/2", input_size=32, in_channels=4)``.

    ``depth``, ``hidden_size`` and ``num_heads`` override the named size, which is how tests and
    the CPU demo build small networks through the same code.
    """
    size, patch_size = resolve_size(arch, depth, hidden_size, num_heads)
    return DiT(patch_size=patch_size, depth=size.depth, hidden_size=size.hidden_size,
               num_heads=size.num_heads, **kwargs)
