"""Elementwise pieces of a Llama-family block: RMSNorm, RoPE, SwiGLU, and the loss over the lm_head.

On CUDA with liger-kernel installed these run as its Triton kernels (fused, no fp32 copies of the
activations, fused linear cross-entropy that never builds the logits); elsewhere as plain torch code
that computes the same thing the way transformers' Llama modules do. Every function takes and returns
tensors in the compute dtype; tests compare both paths against transformers' own modules.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@functools.cache
def _liger():
    try:
        from liger_kernel.transformers import functional as lf
    except ImportError:
        return None
    return lf


def use_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and _liger() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_kernels(x):
        return _liger().liger_rms_norm(x, weight.to(x.dtype), eps, 0.0, "llama", False)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dtype) * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, Hq, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) as transformers' rotary embedding gives them."""
    if use_kernels(q) and q.shape[-1] == cos.shape[-1]:
        return _liger().liger_rope(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_kernels(gate):
        return _liger().liger_swiglu(gate, up)
    return F.silu(gate) * up


def _chunk_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk: int = 2048) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, labels_i) for rows `hidden` (N, H) without keeping (N, vocab) logits:
    liger's fused kernel on CUDA, else recomputed chunks (each chunk's logits live only while it runs)."""
    weight = weight.to(hidden.dtype)
    if use_kernels(hidden):
        return _liger().liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s:s + chunk], labels[s:s + chunk]
        total = total + (checkpoint(_chunk_ce, h, weight, y, use_reentrant=False) if h.requires_grad
                         else _chunk_ce(h, weight, y))
    return total
