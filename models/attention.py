"""The one place that chooses how attention is computed.

Backends:
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only; xformers has no CPU kernels).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math
  kernels picked by torch; the CPU path).
- ``math``: an explicit softmax(QK^T)V, the reference the other two are tested against.
- ``auto``: xformers when the tensors are on CUDA and xformers is installed, else sdpa.

Asking for xformers where it cannot run raises an error instead of silently falling back, so a run
configured for xformers never measures something else.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "xformers", "sdpa", "math")


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a configured backend name into the one that will run on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is unknown; expected one of {BACKENDS}")
    if requested == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if requested == "xformers":
        if not xformers_available():
            raise RuntimeError(
                "attention backend 'xformers' was requested but xformers is not installed; "
                "install the 'gpu' extra (pip install 'advdit[gpu]') or set model.attention=sdpa"
            )
        if device.type != "cuda":
            raise RuntimeError(
                f"attention backend 'xformers' needs CUDA tensors, got device {device}; "
                "xformers has no CPU kernels, set model.attention=sdpa (or auto)"
            )
    return requested


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Multi-head attention on tensors laid out as (batch, heads, tokens, head_dim)."""
    backend = resolve_backend(backend, q.device)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return weights.softmax(dim=-1) @ v
    from xformers.ops import memory_efficient_attention

    # xformers wants (batch, tokens, heads, head_dim).
    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection whose kernel is chosen by ``backend``."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is unknown; expected one of {BACKENDS}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
