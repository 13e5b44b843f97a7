"""The DiT network: sizes from the paper, adaLN-Zero initialisation, conditioning."""

from __future__ import annotations

import pytest
import torch

from advdit.models.dit import ARCHS, build_dit, sincos_pos_embed_2d

# Parameter counts of DiT at 256x256 (32x32x4 latents, 1000 classes), from Peebles & Xie Table 1
# (rounded to millions there); XL/2 also to the exact total the reference train.py prints.
PAPER_PARAMS_M = {"DiT-XL/2": 675, "DiT-L/2": 458, "DiT-B/2": 130, "DiT-S/2": 33}


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_the_paper(arch: str) -> None:
    with torch.device("meta"):  # no memory for XL's 675M parameters
        model = build_dit(arch, input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - PAPER_PARAMS_M[arch]) < 1.0


def test_xl2_exact_count_and_learned_sigma_channels() -> None:
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert model.out_channels == 8
    assert model.y_embedder.num_embeddings == 1001  # the null class for guidance


def test_all_named_archs_build() -> None:
    assert len(ARCHS) == 12
    with torch.device("meta"):
        model = build_dit("DiT-B/8", input_size=32, in_channels=4)
    assert model.x_embedder.num_patches == 16


def small_dit(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dit("DiT-S/2", input_size=8, in_channels=4, depth=2, hidden_size=32,
                     num_heads=2, num_classes=5, **kwargs)


def test_adaln_zero_initialisation_outputs_zero() -> None:
    model = small_dit()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_output_depends_on_label_and_timestep() -> None:
    model = perturbed(small_dit())
    x = torch.randn(2, 4, 8, 8)
    base = model(x, torch.tensor([10, 10]), torch.tensor([1, 1]))
    other_label = model(x, torch.tensor([10, 10]), torch.tensor([1, 5]))
    other_t = model(x, torch.tensor([10, 900]), torch.tensor([1, 1]))
    assert torch.allclose(base[0], other_label[0]) and not torch.allclose(base[1], other_label[1])
    assert not torch.allclose(base[1], other_t[1])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain = perturbed(small_dit())
    checkpointed = small_dit(grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    for model in (plain, checkpointed):
        model(x, t, y).square().mean().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_position_embedding_is_fixed_sincos() -> None:
    table = sincos_pos_embed_2d(16, 4)
    assert table.shape == (16, 16)
    # Token 0 sits at row 0, column 0: sin(0)=0 and cos(0)=1 in both halves.
    assert torch.equal(table[0], torch.tensor(([0.0] * 4 + [1.0] * 4) * 2))
    assert not small_dit().pos_embed.requires_grad


def test_bad_arch_and_sizes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="DiT-XL/3.*expected one of"):
        build_dit("DiT-XL/3")
    with pytest.raises(ValueError, match="not divisible by patch size"):
        build_dit("DiT-S/8", input_size=12, depth=1)


def test_z_input_starts_as_a_no_op_and_then_matters() -> None:
    plain = perturbed(small_dit())
    with_z = small_dit(z_dim=7)
    with_z.load_state_dict(plain.state_dict(), strict=False)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    z = torch.randn(2, 7)
    assert torch.equal(with_z(x, t, y, z), plain(x, t, y))  # zero-initialised z embedding
    perturbed(with_z)
    assert not torch.allclose(with_z(x, t, y, z), with_z(x, t, y, torch.randn(2, 7)))
    with pytest.raises(ValueError, match="z_dim=7"):
        with_z(x, t, y)
