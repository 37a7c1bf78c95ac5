"""LoRA dropout whose mask is a pure function of (a seed held in a device tensor, a stream id, the element).

Why not torch's dropout (PEFT's `lora_dropout`): its mask comes from the generator's state at the moment it
runs, so a recomputed layer must save and restore that state around the recomputation, and a CUDA graph
would replay the capture's offsets. Here the seed is read by the kernel from a one-element tensor that
FastLlama refills before every forward pass (drawn from the device's generator, which the training loop
seeds per micro-batch): the forward, its recomputation in backward and a CUDA graph's replay all see the
same seed and so the same mask, with nothing saved. The mask is never stored: backward multiplies the
incoming gradient by the same regenerated mask (dropout is linear in its input for a fixed mask).

One mask per group of projections that read the same input (q/k/v, gate/up): PEFT draws one per
projection. The expected update is the same; the groups keep their single fused GEMMs (model.fast.lora).

On CUDA the mask is drawn by Triton's Philox (`tl.rand4x`: four elements a call) in one pass over the input;
elsewhere by a CPU torch.Generator seeded from the same tensor (the CPU has no graphs: `.item()` costs nothing there).
"""

from __future__ import annotations

import functools
import math

import torch

from loraforge.model.fast.nf4 import have_triton

BLOCK = 2048


@functools.cache
def _kernel():
    import triton   # optional dependency (CUDA kernels), so imported on first use
    import triton.language as tl

    @triton.jit
    def _quarter(x_ptr, out_ptr, offs, n, r, p, scale):
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        y = tl.where(r >= p, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def seeded_dropout(x_ptr, out_ptr, seed_ptr, n, stream, p, scale, BLOCK: tl.constexpr):
        # one Philox call gives four uniforms (tl.rand4x): one for an element in each quarter of the block, so
        # the loads stay coalesced. Against one call per element (tl.rand), the kernel alone (bench/dropout_kernel.py,
        # bench/results/dropout_kernel_h100{,_s20}.json): 1.43-1.78x at Llama-8B's 4,096 x 4,096 / x 14,336 inputs;
        # SmolLM2-135M's are launch-bound in that eager timing (0.44-1.08x). In `loraforge train` (135M, graphs
        # replayed): 3.10 us a call (session 20's profile) against 4.99 us (session 17's, another machine)
        pid = tl.program_id(0).to(tl.int64)
        q = tl.arange(0, BLOCK // 4)
        seed = tl.load(seed_ptr) + stream
        r0, r1, r2, r3 = tl.rand4x(seed, pid * (BLOCK // 4) + q)
        start = pid * BLOCK
        _quarter(x_ptr, out_ptr, start + q, n, r0, p, scale)
        _quarter(x_ptr, out_ptr, start + BLOCK // 4 + q, n, r1, p, scale)
        _quarter(x_ptr, out_ptr, start + 2 * (BLOCK // 4) + q, n, r2, p, scale)
        _quarter(x_ptr, out_ptr, start + 3 * (BLOCK // 4) + q, n, r3, p, scale)

    return triton, seeded_dropout


def _apply_mask(x: torch.Tensor, seed: torch.Tensor, stream: int, p: float) -> torch.Tensor:
    """x * mask / (1 - p), the mask drawn from (seed, stream)."""
    scale = 1.0 / (1.0 - p)
    if x.is_cuda and have_triton():
        triton, kernel = _kernel()
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        kernel[(triton.cdiv(n, BLOCK),)](x, out, seed, n, stream, p, scale, BLOCK=BLOCK)
        return out
    gen = torch.Generator(device=x.device).manual_seed((int(seed.item()) + stream) % (2 ** 63))
    return x * keep_mask(x.shape, p, gen, x.device).to(x.dtype).mul_(scale)


def keep_mask(shape, p: float, generator=None, device="cpu") -> torch.Tensor:
    """A boolean tensor, True with probability 1 - p (to 1/65,536), from 16-bit slices of 64-bit random
    integers: four elements a draw, where torch's own dropout draws one number an element. PEFT's dropout was
    19% of a CPU quickstart step (`loraforge train --profile`); with MaskDropout the step is ~12% shorter
    (bench/results/quickstart_cpu/s12/mask_dropout_ab.json)."""
    n = math.prod(shape)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator,
                         device=device).view(torch.int16)[:n]
    return bits.view(shape) >= round(-32768 + p * 65536)


class MaskDropout(torch.nn.Dropout):
    """nn.Dropout (PEFT's lora_dropout) whose CPU masks come from keep_mask; torch's own dropout elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_cuda:
            return super().forward(x)
        return _CpuDropout.apply(x, self.p)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep = keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep, None


class SeededDropout(torch.autograd.Function):
    """dropout(x) with the mask of (seed, stream); backward regenerates it."""

    @staticmethod
    def forward(ctx, x, seed, stream: int, p: float):
        ctx.seed, ctx.stream, ctx.p = seed, stream, p
        return _apply_mask(x, seed, stream, p)

    @staticmethod
    def backward(ctx, grad):
        return _apply_mask(grad, ctx.seed, ctx.stream, ctx.p), None, None, None


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, stream: int, p: float) -> torch.Tensor:
    """Dropout of `x` with probability `p`, its mask fixed by the seed tensor's value and `stream`."""
    return SeededDropout.apply(x, seed, stream, p) if p > 0 else x


def new_seed(device: torch.device | str) -> torch.Tensor:
    """The one-element int64 tensor the masks read their seed from."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def reseed_(seed: torch.Tensor) -> None:
    """A fresh seed from the device's default generator, written on the device (no host sync)."""
    seed.random_(0, 2 ** 31)
