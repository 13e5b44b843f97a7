"""The DiT network: sizes from the paper, adaLN-Zero initialisation, conditioning."""

from __future__ import annotations

import pytest
import torch

from advdit.models.dit import ARCHS, build_dit, gelu_tanh_as_sigmoid, sincos_pos_embed_2d

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


def reference_forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
    """The network as first written (plain ops, explicit softmax attention): the function every
    faster implementation must keep."""
    gelu = torch.nn.GELU(approximate="tanh")

    def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    batch, count, width = tokens.shape
    for block in model.blocks:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, 1)
        heads = block.attn.num_heads
        qkv = block.attn.qkv(modulate(block.norm1(tokens), shift_msa, scale_msa))
        q, k, v = qkv.reshape(batch, count, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, count, width)
        tokens = tokens + gate_msa.unsqueeze(1) * block.attn.proj(attended)
        hidden = gelu(block.mlp.fc1(modulate(block.norm2(tokens), shift_mlp, scale_mlp)))
        tokens = tokens + gate_mlp.unsqueeze(1) * block.mlp.fc2(hidden)
    final = model.final_layer
    shift, scale = final.adaLN_modulation(c).chunk(2, dim=1)
    out = final.linear(modulate(final.norm_final(tokens), shift, scale))
    p, channels, side = model.patch_size, model.out_channels, model.input_size // model.patch_size
    out = out.reshape(batch, side, side, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", out).reshape(batch, channels, side * p, side * p)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_network_computes_the_reference_function(attention: str) -> None:
    model = perturbed(small_dit(attention=attention))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 2, 5])
    grads = []
    for forward in (model, lambda *args: reference_forward(model, *args)):
        model.zero_grad()
        out = forward(x, t, y)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if forward is model:
            fast = out.detach()
    assert torch.allclose(fast, reference_forward(model, x, t, y).detach(), rtol=1e-5, atol=1e-6)
    for fast_grad, reference_grad in zip(*grads, strict=True):
        assert torch.allclose(fast_grad, reference_grad, rtol=1e-4, atol=1e-6)


def test_checkpoint_keys_are_those_of_the_first_release() -> None:
    """Old checkpoints load: the parameter names and shapes of a block are unchanged."""
    block_keys = {
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    }
    state = small_dit().state_dict()
    assert {key.removeprefix("blocks.0.") for key in state if key.startswith("blocks.0.")} == block_keys
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert {key for key in state if not key.startswith("blocks.")} == {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.weight", "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }


def test_gelu_as_sigmoid_is_the_tanh_approximation() -> None:
    x = torch.cat([torch.linspace(-30, 30, 10001), torch.randn(10000)])
    assert torch.allclose(gelu_tanh_as_sigmoid(x), torch.nn.functional.gelu(x, approximate="tanh"),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a torch.compile of the network (tens of seconds on 2 cores)
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_network_computes_the_same_outputs_and_gradients(scope: str) -> None:
    eager = perturbed(small_dit())
    compiled = small_dit()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_for_training(scope)  # GELU takes its sigmoid form inside the compiled graph
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    outputs = [model(x, t, y) for model in (eager, compiled)]
    for out in outputs:
        out.square().mean().backward()
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
