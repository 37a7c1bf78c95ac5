"""loraforge's own Triton kernel: RoPE applied in place to the q and k heads of one fused q/k/v output.

The fused q/k/v projection writes rows [q heads | k heads | v heads]. liger's RoPE takes q and k as
separate contiguous tensors, so slicing them out of that row costs two copies per layer and pass (and
their gradients a copy back); this kernel rotates the q and k heads where they lie (they are adjacent:
one tile of Hq + Hkv heads per token), forward and backward (the rotation by -theta), so attention reads
q, k and v as views of the same buffer. Computed in fp32, rounded once to the buffer's dtype.
Tested against the torch rotation (tests/gpu/test_fast_gpu.py on CUDA; tests/model/test_fast_kernels.py
under Triton's CPU interpreter where Triton is installed).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():
    import triton   # optional dependency (CUDA kernels), so imported on first use
    import triton.language as tl

    @triton.jit
    def rope_qk(x_ptr, cos_ptr, sin_ptr, row_stride, cos_row_stride, seq_len, per_row_cos: tl.constexpr,
                heads: tl.constexpr, half: tl.constexpr, pad_heads: tl.constexpr, pad_half: tl.constexpr,
                backward: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if per_row_cos:
            crow = row
        else:
            crow = row % seq_len
        d = tl.arange(0, pad_half)
        c = tl.load(cos_ptr + crow * cos_row_stride + d, mask=d < half, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + crow * cos_row_stride + d, mask=d < half, other=0.0).to(tl.float32)
        if backward:
            s = -s
        h = tl.arange(0, pad_heads)[:, None]
        off = h * (2 * half) + d[None, :]
        m = (h < heads) & (d[None, :] < half)
        base = x_ptr + row * row_stride
        x1 = tl.load(base + off, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + off + half, mask=m, other=0.0).to(tl.float32)
        out = x_ptr.dtype.element_ty
        tl.store(base + off, (x1 * c[None, :] - x2 * s[None, :]).to(out), mask=m)
        tl.store(base + off + half, (x2 * c[None, :] + x1 * s[None, :]).to(out), mask=m)

    return triton, rope_qk


def rope_qk_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int,
             backward: bool = False) -> torch.Tensor:
    """Rotate the first `heads` heads of every row of x (B, T, W) in place; cos/sin (B or 1, T, head_dim)."""
    triton, kernel = _kernel()
    bsz, t, _ = x.shape
    assert x.stride(-1) == 1 and x.stride(0) == t * x.stride(1), "rows must be evenly strided"
    cos, sin = cos.contiguous(), sin.contiguous()
    half = head_dim // 2
    kernel[(bsz * t,)](x, cos, sin, x.stride(1), cos.stride(-2), t, cos.shape[0] == bsz and bsz > 1,
                       heads, half, triton.next_power_of_2(heads), triton.next_power_of_2(half), backward)
    return x


class RopeQKV(torch.autograd.Function):
    """qkv (B, T, (Hq + 2 Hkv) * head_dim) with RoPE applied to its q and k heads, in place (the LoRA function
    that wrote qkv saved no output, so nothing else reads the pre-rotation values)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads: int, head_dim: int, fresh_grad: bool = False):
        rope_qk_(qkv, cos, sin, heads, head_dim)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.head_dim, ctx.fresh_grad = heads, head_dim, fresh_grad
        return qkv

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # the incoming gradient may be a tensor someone else holds (autograd.grad's grad_outputs): rotated in
        # a copy, unless the caller knows it is autograd's own (`fresh_grad`: the decoder layer, whose q/k/v
        # split hands back a new concatenation; one (N, 6144) copy a layer and step saved at 8B)
        if not ctx.fresh_grad or not grad.is_contiguous():
            grad = grad.clone(memory_format=torch.contiguous_format)
        rope_qk_(grad, cos, sin, ctx.heads, ctx.head_dim, backward=True)
        return grad, None, None, None, None, None
