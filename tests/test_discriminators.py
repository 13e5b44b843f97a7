"""Discriminators, the SADM encoder and the toy MLPs: shapes, conditioning, bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from advdit.models.discriminators import (
    MLP,
    PairDiscriminator,
    StructureEncoder,
    TimestepClassDiscriminator,
    ToyDDGANGenerator,
    ToyGenerator,
    ToyPairDiscriminator,
    ToyTimeDiscriminator,
    minibatch_stddev,
)

NUM_CLASSES = 5


def _seeded(factory: Callable[..., nn.Module], *args: object, **kwargs: object) -> nn.Module:
    """A network with weights drawn from seed 0, in eval mode."""
    torch.manual_seed(0)
    return factory(*args, **kwargs).eval()


def _batch(batch: int = 3, channels: int = 4, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- image discriminators


def test_timestep_class_discriminator_shape_and_conditioning() -> None:
    disc = _seeded(TimestepClassDiscriminator, 4, 8, NUM_CLASSES, base_channels=8, num_blocks=2)
    x = _batch()
    t, y = torch.tensor([0, 10, 500]), torch.tensor([0, 3, NUM_CLASSES])  # null class allowed
    logits = disc(x, t, y)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    other_t = disc(x, torch.tensor([0, 10, 900]), y)
    other_y = disc(x, t, torch.tensor([0, 3, 1]))
    # Conditioning is per sample: only the changed sample's logit moves.
    assert torch.equal(logits[:2], other_t[:2]) and not torch.allclose(logits[2], other_t[2])
    assert torch.equal(logits[:2], other_y[:2]) and not torch.allclose(logits[2], other_y[2])
    assert disc.y_embed.num_embeddings == NUM_CLASSES + 1


def test_timestep_class_discriminator_normalises_t_by_t_max() -> None:
    # t / t_max is what is embedded: t=100 of t_max=200 must look like t=500 of t_max=1000.
    small = _seeded(TimestepClassDiscriminator, 4, 8, NUM_CLASSES, base_channels=8, num_blocks=2, t_max=200)
    large = _seeded(TimestepClassDiscriminator, 4, 8, NUM_CLASSES, base_channels=8, num_blocks=2, t_max=1000)
    x, y = _batch(), torch.tensor([0, 1, 2])
    assert torch.allclose(small(x, torch.full((3,), 100), y), large(x, torch.full((3,), 500), y), atol=1e-5)


def test_pair_discriminator_shape_conditioning_and_both_inputs() -> None:
    disc = _seeded(PairDiscriminator, 4, 8, NUM_CLASSES, base_channels=8, num_blocks=2, num_steps=4)
    x_prev, x_t = _batch(), _batch() * 0.5 + 1.0
    t, y = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 4])
    logits = disc(x_prev, x_t, t, y)
    assert logits.shape == (3,)
    assert not torch.allclose(logits, disc(x_prev, x_t, torch.tensor([0, 1, 2]), y))
    assert not torch.allclose(logits, disc(x_prev, x_t, t, torch.tensor([0, 2, NUM_CLASSES])))
    # The condition x_t is an input too: swapping the pair changes the verdict.
    assert not torch.allclose(logits, disc(x_t, x_prev, t, y))


def test_minibatch_stddev_feature_and_group_dependence() -> None:
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    out = minibatch_stddev(x, group_size=4)
    assert out.shape == (8, 4, 2, 2)
    # Group of sample 0: samples 0, 2, 4, 6 (strided groups of 4 over a batch of 8).
    members = x[0::2]
    expected = members.var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
    assert torch.allclose(out[0, 3], expected.expand(2, 2))
    assert torch.equal(out[:, :3], x)
    # Batch 6 is not divisible by 4: groups of 3 (largest divisor <= 4) are used.
    assert minibatch_stddev(x[:6], group_size=4).shape == (6, 4, 2, 2)


def test_structure_encoder_unit_features_and_t_conditioning() -> None:
    plain = _seeded(StructureEncoder, 4, 8, feature_dim=16, base_channels=8, num_blocks=2)
    features = plain(_batch())
    assert features.shape == (3, 16)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-6)
    conditioned = _seeded(StructureEncoder, 4, 8, feature_dim=16, base_channels=8, num_blocks=2,
                          t_conditioned=True)
    x = _batch()
    early, late = conditioned(x, torch.tensor([0, 1, 2])), conditioned(x, torch.tensor([0, 1, 900]))
    assert torch.equal(early[:2], late[:2]) and not torch.allclose(early[2], late[2])
    with pytest.raises(ValueError, match="t must be a"):
        conditioned(x)
    with pytest.raises(ValueError, match="t must be None"):
        plain(x, torch.tensor([0, 1, 2]))


def test_gradients_reach_the_inputs_for_r1() -> None:
    disc = _seeded(PairDiscriminator, 4, 8, NUM_CLASSES, base_channels=8, num_blocks=2)
    x_prev = _batch().requires_grad_()
    disc(x_prev, _batch(), torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])).sum().backward()
    assert x_prev.grad is not None and x_prev.grad.abs().sum() > 0


def test_bad_shapes_are_value_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 2\\*\\*num_blocks = 8"):
        TimestepClassDiscriminator(4, 12, NUM_CLASSES, num_blocks=3)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        TimestepClassDiscriminator(4, 8, -1, num_blocks=2)
    disc = TimestepClassDiscriminator(4, 8, NUM_CLASSES, base_channels=8, num_blocks=2)
    with pytest.raises(ValueError, match="x has shape \\(3, 4, 16, 16\\), expected \\(B, 4, 8, 8\\)"):
        disc(_batch(size=16), torch.zeros(3), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- toys


def test_mlp_depth_and_activation() -> None:
    mlp = MLP(2, 3, hidden=16, layers=2)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 16), (16, 16), (16, 3)]
    assert all(m.negative_slope == 0.2 for m in mlp if isinstance(m, nn.LeakyReLU))
    with pytest.raises(ValueError, match="layers must be >= 1"):
        MLP(2, 3, layers=0)


def test_toy_generator_and_time_discriminator() -> None:
    generator = _seeded(ToyGenerator)
    points = generator(torch.randn(5, 2))
    assert points.shape == (5, 2)
    for encoding in ("scalar", "sinusoidal"):
        disc = _seeded(ToyTimeDiscriminator, t_max=1000, encoding=encoding)
        y = torch.randn(2, 2)
        logits = disc(y, torch.tensor([0, 0]))
        assert logits.shape == (2,)
        assert not torch.allclose(logits, disc(y, torch.tensor([0, 700])))
    with pytest.raises(ValueError, match="encoding must be one of"):
        ToyTimeDiscriminator(encoding="learned")


def test_toy_ddgan_generator_and_pair_discriminator() -> None:
    generator = _seeded(ToyDDGANGenerator, num_steps=4, hidden=32)
    x_t, z = torch.randn(4, 2), torch.randn(4, 2)
    x0 = generator(x_t, z, torch.tensor([0, 1, 2, 3]))
    assert x0.shape == (4, 2)
    assert not torch.allclose(x0, generator(x_t, torch.randn(4, 2), torch.tensor([0, 1, 2, 3])))
    disc = _seeded(ToyPairDiscriminator, num_steps=4, hidden=32, encoding="sinusoidal")
    logits = disc(x0, x_t, torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4,)
    assert not torch.allclose(logits, disc(x0, x_t, torch.tensor([3, 2, 1, 0])))
