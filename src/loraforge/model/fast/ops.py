"""Elementwise pieces of a Llama-family block: RMSNorm, RoPE, SwiGLU, attention, and the loss over the lm_head.

On CUDA with liger-kernel installed these run as its Triton kernels (fused, no fp32 copies of the
activations, fused linear cross-entropy that never builds the logits; SwiGLU over a joined gate/up group
is model.fast.swiglu_lora's kernel), RoPE on the fused q/k/v output as loraforge's kernel (model.fast.kernels), and
packed rows' attention as varlen flash attention; elsewhere as plain torch code that computes the same
thing the way transformers' Llama modules do. Every function takes and returns tensors in the compute
dtype; tests compare both paths against transformers' own modules.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from loraforge.data.packing import segment_attention
from loraforge.model.fast.kernels import RopeQKV
from loraforge.model.fast.nf4 import have_triton


@functools.cache
def _liger():
    try:
        from liger_kernel.transformers import functional as lf   # optional dependency (CUDA kernels)
    except ImportError:
        return None
    return lf


def use_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and _liger() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_kernels(x):
        # in place: the gradient is written over the incoming one, which nothing else reads (the norm's
        # output feeds one projection group); saves a zero-filled (N, H) buffer per backward
        return _liger().liger_rms_norm(x, weight.to(x.dtype), eps, 0.0, "llama", True)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dtype) * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, Hq, T, head_dim), k (B, Hkv, T, head_dim), cos/sin (B, T, head_dim) as transformers' rotary
    embedding gives them."""
    if use_kernels(q) and q.shape[-1] == cos.shape[-1]:
        return _liger().liger_rope(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, kv_heads: int,
             head_dim: int, fresh_grad: bool = False) -> torch.Tensor:
    """qkv (B, T, (Hq + 2 Hkv) * head_dim) with RoPE applied to its q and k heads (in place on CUDA; with
    `fresh_grad`, its gradient too, see kernels.RopeQKV)."""
    if qkv.is_cuda and have_triton():
        return RopeQKV.apply(qkv, cos, sin, q_heads + kv_heads, head_dim, fresh_grad)
    bsz, t, _ = qkv.shape
    x = qkv.view(bsz, t, -1, head_dim)
    qk = x[:, :, :q_heads + kv_heads]
    cos, sin = cos[:, :, None].to(qkv.dtype), sin[:, :, None].to(qkv.dtype)
    return torch.cat([qk * cos + _rotate_half(qk) * sin, x[:, :, q_heads + kv_heads:]], dim=2).view(bsz, t, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, packed=None) -> torch.Tensor:
    """Causal attention of q (B, Hq, T, head_dim) over k/v (B, Hkv, T, head_dim) (grouped-query heads shared
    inside the kernel, no expanded copies); returns (B, T, Hq * head_dim). `packed`, from packed_attention(),
    keeps each example of a packed row to itself."""
    bsz, _, t, d = q.shape
    if packed is not None and packed[0] == "varlen":
        _, cu, longest = packed
        out = _varlen(q.transpose(1, 2).reshape(bsz * t, -1, d), k.transpose(1, 2).reshape(bsz * t, -1, d),
                      v.transpose(1, 2).reshape(bsz * t, -1, d), cu, longest, scale)
        return out.view(bsz, t, -1)
    mask = packed[1] if packed is not None else None
    a = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask, scale=scale,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return a.transpose(1, 2).reshape(bsz, t, -1)


def packed_attention(segment_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, shared_prefix: bool = False):
    """What attention() needs to keep packed examples apart: on CUDA with torch's varlen flash attention,
    the examples' cumulative offsets in the flattened batch and a bound on the longest one; elsewhere a
    (B, 1, T, T) boolean mask (data.packing.segment_attention). With the collate's `cu_seqlens`
    (data.packing.cu_seqlens: padded with empty segments to a few sizes) the bound is the row length, and
    nothing waits for the device: the shapes and host values then repeat, as CUDA graphs need
    (model.fast.graphs). Without it, the offsets are found on the device (one host sync a batch). A row with a
    shared prefix (data.prefix) always takes the mask: varlen segments cannot share keys."""
    if segment_ids.is_cuda and _varlen_fn() is not None and not shared_prefix:
        bsz, t = segment_ids.shape
        if cu_seqlens is not None:
            return "varlen", cu_seqlens, t
        flat = segment_ids.flatten()
        start = torch.ones_like(flat, dtype=torch.bool)
        start[1:] = flat[1:] != flat[:-1]
        start[::t] = True
        cu = torch.cat([start.nonzero().flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
        return "varlen", cu, int((cu[1:] - cu[:-1]).max())
    return "mask", segment_attention(segment_ids)


@functools.cache
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn   # only in torch >= 2.9 builds that have it
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_kwargs(gqa: bool) -> dict:
    params = inspect.signature(_varlen_fn()).parameters
    # causal: torch 2.9-2.11 take is_causal, later ones a window with no keys to the right
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def _varlen(q, k, v, cu, longest, scale):
    return _varlen_fn()(q, k, v, cu, cu, longest, longest, scale=scale,
                        **_varlen_kwargs(k.shape[1] != q.shape[1]))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_kernels(gate):
        return _liger().liger_swiglu(gate, up)
    return F.silu(gate) * up


@functools.cache
def _flce_chunking() -> dict:
    """liger computes the logits in chunks of rows; each chunk reads the whole head weight twice (logits,
    then the input gradient). Its default budget (chunk logits ~ the size of the hidden states) makes 32
    chunks for a 128k vocabulary at 4,096 tokens: 64 GB of weight reads a step, ~20 ms on an H100. Eight
    times that budget (a 263 MB bf16 logits chunk for Llama-3-8B at 2 x 2048 tokens, taken after the
    forward, below the backward's peak) makes 4 chunks."""
    params = inspect.signature(_liger().liger_fused_linear_cross_entropy).parameters
    return {"chunk_mem_const": 8} if "chunk_mem_const" in params else {}


# liger's logits chunk grows with the rows of one call (with the budget above, 8 x rows x hidden elements:
# 8.6 GB for Llama-3.1-8B at 131,072 tokens, 34 GB at 524,288): longer inputs go through it in blocks of
# this many rows (a logits chunk of at most 1 GiB at hidden 4,096); shorter ones in one call, as before
LOSS_BLOCK_ROWS = 16384
# below this many bytes of fp32 logits (a few hundred loss rows: a classification batch's answers) the loss is one
# chunk of _LinearLogp on CUDA too: liger's fused loss spent about 3 ms of host time a call on its chunk loop in
# session 17's profile of the 135M BANKING77 run, for ~0.1 ms of GPU work. Session 18 (H100, 3 epochs of that run):
# 30,801 tokens/s against 25,847 through liger, 38.4 against 45.9 s of training outside validation and checkpoints
# (bench/results/train_e2e/s18/)
SMALL_LOSS_BYTES = 64 * 2 ** 20


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             block: int = LOSS_BLOCK_ROWS) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, labels_i) for rows `hidden` (N, H) without keeping (N, vocab) logits:
    liger's fused kernel on CUDA (`block` rows a call) where the logits would exceed SMALL_LOSS_BYTES, else the
    per-row losses' chunks (_LinearLogp: one chunk's logits alive at a time). On this project's CPU that gives
    the same sums as the checkpointed chunks it replaced, forward + backward 107 ms against 113 for 50 loss rows
    of SmolLM2's head and 553 against 663 for 400 (`python bench/loss_cpu.py`, bench/results/loss_cpu.json)."""
    weight = weight.to(hidden.dtype)
    if not use_kernels(hidden) or hidden.shape[0] * weight.shape[0] * 4 <= SMALL_LOSS_BYTES:
        return linear_cross_entropy_rows(hidden, weight, labels).sum()
    flce = functools.partial(_liger().liger_fused_linear_cross_entropy, reduction="sum", **_flce_chunking())
    if hidden.shape[0] <= block:
        return flce(hidden, weight, labels)
    return sum(flce(h, weight, y) for h, y in zip(hidden.split(block), labels.split(block)))


# fp32 logits of one chunk of rows: ROWS_LOGITS_BYTES / (4 x vocab) rows at a time (523 rows at Llama-3's 128K
# vocabulary). The checkpointed per-chunk cross-entropy this replaced kept about four (rows x vocab) tensors of
# 2,048 rows alive in backward (bf16 and fp32 logits, the log-softmax and its gradient): 3 GiB at 128K vocab, the
# excess of an 8B QLoRA DPO step over SFT in the allocator's history (bench/results/preference/, session 16).
ROWS_LOGITS_BYTES = 256 * 2 ** 20


class _LinearLogp(torch.autograd.Function):
    """log p(y_i) = (h_i W^T)[y_i] - logsumexp(h_i W^T) for each row, one chunk of rows at a time. Saved for
    backward: the inputs and each row's logsumexp; backward recomputes a chunk's logits and turns them into
    their gradient in place (g_i (onehot(y_i) - softmax_i)), so one chunk's logits are alive at a time."""

    @staticmethod
    def forward(ctx, h, w, y, rows: int):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], rows):
            logits = (h[s:s + rows] @ w.t()).float()
            lse[s:s + rows] = torch.logsumexp(logits, dim=-1)
            out[s:s + rows] = logits.gather(1, y[s:s + rows, None]).squeeze(1) - lse[s:s + rows]
            del logits
        ctx.save_for_backward(h, w, y, lse)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, w, y, lse = ctx.saved_tensors
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.rows):
            gs = g[s:s + ctx.rows, None].float()
            d = (h[s:s + ctx.rows] @ w.t()).float().sub_(lse[s:s + ctx.rows, None]).exp_().mul_(-gs)
            d.scatter_add_(1, y[s:s + ctx.rows, None], gs)   # d logp / d logits = onehot - softmax, times g
            if gw is not None:   # (a trainable head: rare) from the fp32 gradient
                gw.addmm_(d.t(), h[s:s + ctx.rows].float())
            if gh is not None:   # written in place: no copy kernel a chunk
                torch.mm(d.to(h.dtype), w, out=gh[s:s + ctx.rows])
            del d
        return gh, gw.to(w.dtype) if gw is not None else None, None, None


def linear_logp_rows(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     rows: int | None = None) -> torch.Tensor:
    """log softmax(hidden_i @ weight^T)[labels_i] for each row (N,), fp32, without keeping (N, vocab) logits:
    `rows` rows at a time (default: ROWS_LOGITS_BYTES of fp32 logits), recomputed in backward (_LinearLogp).
    Not liger's kernel: with reduction="none" its backward scaled every row's gradient by the first row's
    (linkedin/Liger-Kernel#968, fixed only in 2026 by #1298), and it has no CPU path."""
    weight = weight.to(hidden.dtype)
    rows = rows or max(1, ROWS_LOGITS_BYTES // (4 * weight.shape[0]))
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _LinearLogp.apply(hidden, weight, labels, rows)


def linear_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              rows: int | None = None) -> torch.Tensor:
    """CE(hidden_i @ weight^T, labels_i) for each row (N,): -linear_logp_rows."""
    return -linear_logp_rows(hidden, weight, labels, rows)
