"""Discriminators and encoders of the adversarial objectives, plus the toy MLPs of 25-Gaussians.

Networks only: losses live in ``trainer/objectives/gan.py``, the diffusion/posterior math in
``trainer/objectives/`` (``diffusion_gan.py``, ``ddgan.py``, ``sadm.py``).

- ``TimestepClassDiscriminator`` (Diffusion-GAN): an image D whose t and class enter through a
  projection head, as Diffusion-StyleGAN2's D does (docs/methods.md: Diffusion-GAN). Unlike the official code,
  which feeds the raw integer t through an FC mapping, t is embedded sinusoidally after
  normalisation by ``t_max`` (docs/methods.md: Diffusion-GAN, [INFERRED]), so its meaning does not drift
  as the adaptive T changes.
- ``PairDiscriminator`` (DDGAN): input ``concat(x_prev, x_t)``, a per-block bias from the step
  embedding, a minibatch-stddev feature, a 3x3 conv, a spatial sum and a linear logit, after
  DDGAN's ``Discriminator_small`` (docs/methods.md: DDGAN). Its residual blocks downsample with a stride-2
  conv and an average-pooled skip instead of DDGAN's FIR filters, and a class projection is added
  (docs/methods.md: the DiT recipe, [INFERRED]).
- ``StructureEncoder`` (SADM): a conv encoder to l2-normalised features. SADM's encoder is not
  known (docs/methods.md: SADM); this one is a reconstruction.
- Toy MLPs: Diffusion-GAN's two hidden layers of 128 units with LeakyReLU (docs/methods.md: Diffusion-GAN) and
  DDGAN's three FC layers of 512 units (docs/methods.md: DDGAN).

Class conditioning always uses an embedding with ``num_classes + 1`` rows: index ``num_classes``
is the null class, as in the DiT (``num_classes=0`` gives an unconditional D with one row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dit import timestep_embedding

_NEGATIVE_SLOPE = 0.2
# Sinusoidal embeddings are spread over [0, _TIME_SCALE], the range of DiT's integer timesteps,
# whatever the caller's own range of t: the frequencies of ``timestep_embedding`` (periods 2*pi to
# 2*pi*10^4) are then all used.
_TIME_SCALE = 1000.0
_FREQUENCY_DIM = 128
# Minibatch-stddev group size of DDGAN's discriminator head.
_STDDEV_GROUP = 4


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _NEGATIVE_SLOPE)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_image(x: torch.Tensor, channels: int, size: int, name: str) -> None:
    expected = (channels, size, size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, expected))})")


# --------------------------------------------------------------------------- shared pieces


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of ``t * scale`` followed by dense -> LeakyReLU -> dense -> LeakyReLU.

    The MLP is DDGAN's time path (docs/methods.md: DDGAN); ``scale`` maps the caller's t range onto
    [0, 1000] (``scale = 1000 / t_max``).
    """

    def __init__(self, out_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.mlp = nn.Sequential(
            nn.Linear(_FREQUENCY_DIM, out_dim), nn.LeakyReLU(_NEGATIVE_SLOPE),
            nn.Linear(out_dim, out_dim), nn.LeakyReLU(_NEGATIVE_SLOPE),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_embedding(t.float() * self.scale, _FREQUENCY_DIM)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class DownBlock(nn.Module):
    """Residual block that halves the resolution; an optional conditioning vector adds a bias.

    main: LeakyReLU -> 3x3 conv (+ dense(cond) per channel) -> LeakyReLU -> 3x3 conv, stride 2;
    skip: 2x2 average pool -> 1x1 conv without bias; output (main + skip) / sqrt(2), as DDGAN's
    ``DownConvBlock`` combines them.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.cond_bias = nn.Linear(cond_dim, out_channels) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(_lrelu(x))
        if self.cond_bias is not None:
            h = h + self.cond_bias(cond)[:, :, None, None]
        h = self.conv2(_lrelu(h))
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2.0)


class ConvTrunk(nn.Module):
    """1x1 stem to ``base_channels`` then ``num_blocks`` DownBlocks doubling the width (capped at 8x)."""

    def __init__(self, in_channels: int, input_size: int, base_channels: int, num_blocks: int,
                 cond_dim: int | None = None) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, base_channels=base_channels, num_blocks=num_blocks)
        if input_size < 2**num_blocks or input_size % 2**num_blocks:
            raise ValueError(
                f"input_size {input_size} must be a positive multiple of 2**num_blocks = {2**num_blocks}"
            )
        widths = [base_channels * min(2**i, 8) for i in range(num_blocks + 1)]
        self.stem = nn.Conv2d(in_channels, base_channels, 1)
        self.blocks = nn.ModuleList(
            DownBlock(c_in, c_out, cond_dim) for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, cond)
        return h


def _class_embedding(num_classes: int, dim: int) -> nn.Embedding:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    embedding = nn.Embedding(num_classes + 1, dim)  # the last row is the null class
    # Small, as DiT's label table: the class term starts as a perturbation of the unconditional logit.
    nn.init.normal_(embedding.weight, std=0.02)
    return embedding


def minibatch_stddev(x: torch.Tensor, group_size: int = _STDDEV_GROUP) -> torch.Tensor:
    """Append one channel: the mean over C, H, W of the per-group std of the batch (StyleGAN2).

    Groups are strided (sample i is grouped with i + B/G, i + 2B/G, ...), as in the StyleGAN2
    layer DDGAN uses. The group size is the largest divisor of B that is <= ``group_size``, so any
    batch size works.
    """
    batch, channels, height, width = x.shape
    group = max(g for g in range(1, min(group_size, batch) + 1) if batch % g == 0)
    grouped = x.float().reshape(group, batch // group, channels, height, width)
    std = torch.sqrt(grouped.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))
    feature = std.repeat(group).reshape(batch, 1, 1, 1).expand(batch, 1, height, width)
    return torch.cat([x, feature.to(x.dtype)], dim=1)


# --------------------------------------------------------------------------- image discriminators


class TimestepClassDiscriminator(nn.Module):
    """Diffusion-GAN D on latents or pixels: ``forward(x, t, y)`` -> (B,) logits.

    logit = linear(h) + <embed(y), h> + <mlp(sin(t / t_max)), h>, where h is the spatial sum of
    the last feature map (projection discriminator for both the class and t, docs/methods.md: Diffusion-GAN).
    """

    def __init__(self, in_channels: int, input_size: int, num_classes: int, base_channels: int = 64,
                 num_blocks: int = 3, t_max: int = 1000) -> None:
        super().__init__()
        _check_positive(t_max=t_max)
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        self.trunk = ConvTrunk(in_channels, input_size, base_channels, num_blocks)
        features = self.trunk.out_channels
        self.t_embed = TimeEmbedding(features, scale=_TIME_SCALE / t_max)
        self.y_embed = _class_embedding(num_classes, features)
        self.head = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) diffusion steps in [0, t_max]; y: (B,) labels, null allowed."""
        _check_image(x, self.in_channels, self.input_size, "x")
        h = _lrelu(self.trunk(x)).sum(dim=(2, 3))
        projection = (self.y_embed(y) + self.t_embed(t)) * h
        return self.head(h).squeeze(1) + projection.sum(dim=1)


class PairDiscriminator(nn.Module):
    """DDGAN's D on (x_{t-1}, x_t) pairs: ``forward(x_prev, x_t, t, y)`` -> (B,) logits.

    ``t`` is the integer step index k in [0, num_steps) that DDGAN gives both G and D (methods.md
    2.3: the same k although x_t is at level k+1). It is embedded after scaling to [0, 1000]
    rather than raw as DDGAN does, so that a 4-step D uses more than the fastest frequencies.
    The caller detaches ``x_t`` (DDGAN's condition) and sets ``requires_grad`` on the real
    ``x_prev`` for R1.
    """

    def __init__(self, in_channels: int, input_size: int, num_classes: int, base_channels: int = 64,
                 num_blocks: int = 3, num_steps: int = 4) -> None:
        super().__init__()
        _check_positive(num_steps=num_steps)
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        cond_dim = 4 * base_channels
        self.t_embed = TimeEmbedding(cond_dim, scale=_TIME_SCALE / num_steps)
        self.trunk = ConvTrunk(2 * in_channels, input_size, base_channels, num_blocks, cond_dim)
        features = self.trunk.out_channels
        self.final_conv = nn.Conv2d(features + 1, features, 3, padding=1)
        self.y_embed = _class_embedding(num_classes, features)
        self.head = nn.Linear(features, 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        _check_image(x_prev, self.in_channels, self.input_size, "x_prev")
        _check_image(x_t, self.in_channels, self.input_size, "x_t")
        h = self.trunk(torch.cat([x_prev, x_t], dim=1), self.t_embed(t))
        h = _lrelu(self.final_conv(minibatch_stddev(h))).sum(dim=(2, 3))
        return self.head(h).squeeze(1) + (self.y_embed(y) * h).sum(dim=1)


class StructureEncoder(nn.Module):
    """SADM's encoder E_phi: ``forward(x, t=None)`` -> (B, feature_dim) unit-norm features.

    [INFERRED] architecture: conv trunk, spatial mean, linear, l2 normalisation (the bounded
    feature space the reconstruction asks for). With ``t_conditioned`` each block gets a bias
    from the embedding of the denoiser's integer timestep t (0..999, as the DiT sees it).
    """

    def __init__(self, in_channels: int, input_size: int, feature_dim: int = 128, base_channels: int = 64,
                 num_blocks: int = 3, t_conditioned: bool = False) -> None:
        super().__init__()
        _check_positive(feature_dim=feature_dim)
        self.in_channels, self.input_size = in_channels, input_size
        cond_dim = 4 * base_channels if t_conditioned else None
        self.t_embed = TimeEmbedding(cond_dim) if cond_dim else None
        self.trunk = ConvTrunk(in_channels, input_size, base_channels, num_blocks, cond_dim)
        self.proj = nn.Linear(self.trunk.out_channels, feature_dim)

    @property
    def t_conditioned(self) -> bool:
        return self.t_embed is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        _check_image(x, self.in_channels, self.input_size, "x")
        if self.t_conditioned != (t is not None):
            expected = "a (B,) timestep tensor" if self.t_conditioned else "None (t_conditioned=False)"
            raise ValueError(f"t must be {expected}")
        cond = self.t_embed(t) if self.t_embed is not None else None
        h = _lrelu(self.trunk(x, cond)).mean(dim=(2, 3))
        return F.normalize(self.proj(h).float(), dim=1)


# --------------------------------------------------------------------------- 25-Gaussians toys


class MLP(nn.Sequential):
    """``layers`` hidden layers of ``hidden`` units with LeakyReLU(``negative_slope``), then a linear output.

    The 25-Gaussians benchmark passes its own slope (``trainer/benchmarks/toy.py``, ``ToySettings``).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, layers: int = 2,
                 negative_slope: float = _NEGATIVE_SLOPE) -> None:
        _check_positive(in_dim=in_dim, out_dim=out_dim, hidden=hidden, layers=layers)
        widths = [in_dim] + [hidden] * layers
        modules: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            modules += [nn.Linear(w_in, w_out), nn.LeakyReLU(negative_slope)]
        super().__init__(*modules, nn.Linear(hidden, out_dim))


TIME_ENCODINGS = ("scalar", "sinusoidal")


class ToyTimeEncoding(nn.Module):
    """t in [0, t_max] as features for a toy MLP: ``t / t_max`` (1 feature) or sinusoidal (dim)."""

    def __init__(self, t_max: int, encoding: str = "scalar", dim: int = 16) -> None:
        super().__init__()
        if encoding not in TIME_ENCODINGS:
            raise ValueError(f"encoding must be one of {TIME_ENCODINGS}, got {encoding!r}")
        _check_positive(t_max=t_max, dim=dim)
        self.t_max, self.encoding = t_max, encoding
        self.dim = 1 if encoding == "scalar" else dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        normalised = t.float() / self.t_max
        if self.encoding == "scalar":
            return normalised[:, None]
        return timestep_embedding(normalised * _TIME_SCALE, self.dim)


class ToyGenerator(nn.Module):
    """GAN generator G(z) -> 2-D point (Diffusion-GAN toy: 2 hidden layers of 128 units)."""

    def __init__(self, latent_dim: int = 2, data_dim: int = 2, hidden: int = 128, layers: int = 2,
                 negative_slope: float = _NEGATIVE_SLOPE) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = MLP(latent_dim, data_dim, hidden, layers, negative_slope)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ToyTimeDiscriminator(nn.Module):
    """Diffusion-GAN toy D(y, t) -> (B,) logits, t in [0, t_max] concatenated to the point y."""

    def __init__(self, data_dim: int = 2, t_max: int = 1000, encoding: str = "scalar", hidden: int = 128,
                 layers: int = 2, t_dim: int = 16, negative_slope: float = _NEGATIVE_SLOPE) -> None:
        super().__init__()
        self.time = ToyTimeEncoding(t_max, encoding, t_dim)
        self.net = MLP(data_dim + self.time.dim, 1, hidden, layers, negative_slope)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y, self.time(t).to(y.dtype)], dim=1)).squeeze(1)


class ToyDDGANGenerator(nn.Module):
    """DDGAN toy G(x_t, z, t) -> x0' with t the step index in [0, num_steps) (3 FC layers of 512)."""

    def __init__(self, data_dim: int = 2, latent_dim: int = 2, num_steps: int = 4, encoding: str = "scalar",
                 hidden: int = 512, layers: int = 2, t_dim: int = 16,
                 negative_slope: float = _NEGATIVE_SLOPE) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.time = ToyTimeEncoding(num_steps, encoding, t_dim)
        self.net = MLP(data_dim + latent_dim + self.time.dim, data_dim, hidden, layers, negative_slope)

    def forward(self, x_t: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, z, self.time(t).to(x_t.dtype)], dim=1))


class ToyPairDiscriminator(nn.Module):
    """DDGAN toy D(x_prev, x_t, t) -> (B,) logits (3 FC layers of 512)."""

    def __init__(self, data_dim: int = 2, num_steps: int = 4, encoding: str = "scalar", hidden: int = 512,
                 layers: int = 2, t_dim: int = 16, negative_slope: float = _NEGATIVE_SLOPE) -> None:
        super().__init__()
        self.time = ToyTimeEncoding(num_steps, encoding, t_dim)
        self.net = MLP(2 * data_dim + self.time.dim, 1, hidden, layers, negative_slope)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_prev, x_t, self.time(t).to(x_t.dtype)], dim=1)).squeeze(1)
