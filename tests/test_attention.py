"""Attention backends agree with the explicit softmax reference wherever they can run."""

from __future__ import annotations

import pytest
import torch

from advdit.models.attention import Attention, attend, resolve_backend, xformers_available

CUDA = torch.cuda.is_available()


def qkv(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 17, 16, generator=generator).to(device, dtype) for _ in range(3)]


def test_sdpa_matches_the_math_reference() -> None:
    q, k, v = qkv()
    assert torch.allclose(attend(q, k, v, "sdpa"), attend(q, k, v, "math"), atol=1e-5)


def test_math_reference_is_softmax_attention() -> None:
    q, k, v = qkv()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 4.0  # sqrt(head_dim = 16)
    expected = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
    assert torch.allclose(attend(q, k, v, "math"), expected, atol=1e-5)


def test_auto_picks_sdpa_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_xformers_on_cpu_is_an_error_not_a_fallback() -> None:
    q, k, v = qkv()
    message = "not installed" if not xformers_available() else "needs CUDA"
    with pytest.raises(RuntimeError, match=message):
        attend(q, k, v, "xformers")


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="flash3.*expected one of"):
        Attention(32, 2, backend="flash3")


def test_module_backends_agree() -> None:
    torch.manual_seed(0)
    sdpa = Attention(32, 4, backend="sdpa")
    math = Attention(32, 4, backend="math")
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 9, 32)
    assert torch.allclose(sdpa(x), math(x), atol=1e-5)


@pytest.mark.skipif(not (CUDA and xformers_available()),
                    reason="xformers runs only on CUDA with xformers installed; this machine has "
                           "no GPU (run on a GPU machine: pytest tests/test_attention.py)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_sdpa_on_cuda(dtype: torch.dtype) -> None:
    q, k, v = qkv("cuda", dtype)
    out_x = attend(q, k, v, "xformers").float()
    out_s = attend(q, k, v, "sdpa").float()
    assert torch.allclose(out_x, out_s, atol=2e-2)
