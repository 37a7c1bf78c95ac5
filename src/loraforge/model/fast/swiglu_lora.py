"""SwiGLU over the gate/up group's output with the LoRA term added inside the kernel.

The gate/up projections of a Llama MLP feed only SwiGLU: h = silu(g) * u, [g | u] = x W^T + (x A^T)(s B)^T.
LoraGroupFn writes the adapter's share (x A^T)(s B)^T into the (N, 2 I) output first and lets the base GEMM
accumulate onto it: one extra write and read of that output (235 MB for Llama-3-8B at 4,096 tokens) and a
GEMM with beta = 1, which cuBLAS runs slower. On an H100 at those shapes the group's forward took 1.45 ms
against 1.22 ms for the base GEMM alone (bench/lora_gemm_orders.py, f_thin_first vs f_base in
bench/results/train_speed/h100_s9_lora_gemm_orders.json). Here the base GEMM writes x W^T alone (beta = 0)
and the SwiGLU kernel, which reads that output anyway, adds the rank-r term tile by tile (a (rows, r) x
(r, cols) product from registers) before the activation; its backward does the same before writing dg and
du over the output's memory (nothing else reads it).

`swiglu_lora` / `swiglu_lora_backward_` run the Triton kernels for 16-bit tensors on CUDA and the same
arithmetic in torch elsewhere (tests compare the two under Triton's interpreter; tests/gpu compiled).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from loraforge.model.fast.nf4 import have_triton


@functools.cache
def _kernel():
    import triton   # optional dependency (CUDA kernels), so imported on first use
    import triton.language as tl

    @triton.jit
    def swiglu_lora_kernel(y_ptr, xa_ptr, bg_ptr, bu_ptr, other_ptr, n_rows, inter, y_stride, xa_stride, b_stride,
                           other_stride, rg, ru, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr, BACKWARD: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of h (forward: other = h) or of [dg | du] (backward: other = dh,
        written over y)."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        rm, cm = rows < n_rows, cols < inter
        xrow = xa_ptr + rows[:, None] * xa_stride
        xg = tl.load(xrow + r[None, :], mask=rm[:, None] & (r[None, :] < rg), other=0.0)
        xu = tl.load(xrow + rg + r[None, :], mask=rm[:, None] & (r[None, :] < ru), other=0.0)
        # B_g^T and B_u^T tiles (r, cols): B's rows are the output columns
        bg = tl.load(bg_ptr + cols[None, :] * b_stride + r[:, None], mask=cm[None, :] & (r[:, None] < rg), other=0.0)
        bu = tl.load(bu_ptr + cols[None, :] * b_stride + r[:, None], mask=cm[None, :] & (r[:, None] < ru), other=0.0)
        off = rows[:, None] * y_stride + cols[None, :]
        m = rm[:, None] & cm[None, :]
        g = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32) + tl.dot(xg, bg)
        u = tl.load(y_ptr + off + inter, mask=m, other=0.0).to(tl.float32) + tl.dot(xu, bu)
        sg = 1.0 / (1.0 + tl.exp(-g))   # (tl.sigmoid, a jit'd library function, fails under the interpreter)
        other = other_ptr + rows[:, None] * other_stride + cols[None, :]
        if BACKWARD:
            dh = tl.load(other, mask=m, other=0.0).to(tl.float32)
            out = y_ptr.dtype.element_ty
            tl.store(y_ptr + off, (dh * u * sg * (1.0 + g * (1.0 - sg))).to(out), mask=m)
            tl.store(y_ptr + off + inter, (dh * g * sg).to(out), mask=m)
        else:
            tl.store(other, (g * sg * u).to(other_ptr.dtype.element_ty), mask=m)

    return triton, swiglu_lora_kernel


BLOCK_M, BLOCK_N = 64, 64


def _use_kernel(y: torch.Tensor) -> bool:
    return y.is_cuda and y.dtype in (torch.bfloat16, torch.float16) and have_triton()


def _launch(backward: bool, y, xa, b_blk, ranks, other):
    triton, kernel = _kernel()
    n, inter = y.shape[0], y.shape[1] // 2
    rg, ru = ranks
    block_r = max(16, triton.next_power_of_2(max(rg, ru)))
    b = b_blk.to(y.dtype)
    bg, bu = b[:inter, :rg], b[inter:, rg:]   # the diagonal blocks, as strided views (row stride sum r)
    xa = xa.to(y.dtype)
    grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(inter, BLOCK_N))
    kernel[grid](y, xa, bg, bu, other, n, inter, y.stride(0), xa.stride(0), b.stride(0), other.stride(0), rg, ru,
                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r, BACKWARD=backward)


def _torch_gate_up(y, xa, b_blk):
    g, u = (y.float() + xa.float() @ b_blk.float().t()).chunk(2, dim=-1)
    return g, u


def swiglu_lora(y: torch.Tensor, xa: torch.Tensor, b_blk: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    """silu(g) * u of [g | u] = y + xa b_blk^T; y (N, 2 I) the base output, xa (N, r_g + r_u), b_blk the
    (2 I, r_g + r_u) block-diagonal scaled B of gate and up. Returns (N, I) in y's dtype."""
    if _use_kernel(y):
        h = y.new_empty(y.shape[0], y.shape[1] // 2)
        _launch(False, y, xa, b_blk, ranks, h)
        return h
    g, u = _torch_gate_up(y, xa, b_blk)
    return (F.silu(g) * u).to(y.dtype)


def swiglu_lora_backward_(y: torch.Tensor, xa: torch.Tensor, b_blk: torch.Tensor, ranks: tuple[int, int],
                          dh: torch.Tensor) -> torch.Tensor:
    """The gradient [dg | du] of swiglu_lora's input from dh (N, I): written over y by the kernel (nothing
    reads y after), a new tensor in the torch form."""
    dh = dh.contiguous()
    if _use_kernel(y):
        _launch(True, y, xa, b_blk, ranks, dh)
        return y
    g, u = _torch_gate_up(y, xa, b_blk)
    sg = torch.sigmoid(g)
    dh = dh.float()
    return torch.cat([dh * u * sg * (1 + g * (1 - sg)), dh * g * sg], dim=-1).to(y.dtype)
