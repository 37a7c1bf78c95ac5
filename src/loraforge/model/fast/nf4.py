"""loraforge's own NF4 dequantisation kernel: a bitsandbytes NF4 weight rebuilt in 16 bits in ONE launch.

Why not bitsandbytes' own `dequantize_4bit` (which the fast path used before, and still uses where this
kernel does not apply): with double quantisation it is two dispatches (the 8-bit absmax first, then the
4-bit weight), each through bitsandbytes' Python checks, the torch op dispatcher and a ctypes call, and
the fast path rebuilds 7 weights per decoder layer three times a step (forward, recomputation, backward).
On the H100 profile of the 8B QLoRA benchmark (bench/results/train_speed/profiles/s5_8b_ours-qlora.idle.json)
those launches left the GPU idle for 48 ms of a 526 ms step, waiting for the host. Here both stages run in
one Triton kernel: the block's absmax is decoded from its 8-bit code and the second-level scale, then
each packed byte gives two weights (high nibble first, as bitsandbytes packs them). The arithmetic is
bitsandbytes': NF4 value (fp32) × absmax (fp32), rounded once to the output dtype.

Tested against bitsandbytes (tests/gpu/test_fast_gpu.py on CUDA; tests/model/test_fast_nf4_kernel.py under
Triton's CPU interpreter where Triton is installed).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch

BLOCK_BYTES = 1024  # packed bytes per program: 2,048 weights


@functools.cache
def _kernel():
    import triton   # optional dependency (CUDA kernels), so imported on first use
    import triton.language as tl

    @triton.jit
    def nf4_dequant(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, nf4_ptr, out_ptr, n_bytes,
                    qblock: tl.constexpr, qblock2: tl.constexpr, nested: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        j = pid * BLOCK + tl.arange(0, BLOCK)
        m = j < n_bytes
        b = tl.load(packed_ptr + j, mask=m, other=0).to(tl.int32)
        blk = (2 * j) // qblock   # both weights of a byte share a block (qblock is even)
        if nested:   # double quantisation: the absmax is itself an 8-bit code with a second-level scale
            aq = tl.load(absmax_ptr + blk, mask=m, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + aq, mask=m, other=0.0) * tl.load(absmax2_ptr + blk // qblock2, mask=m,
                                                                            other=0.0)
            absmax = scale + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blk, mask=m, other=0.0)
        hi = tl.load(nf4_ptr + (b >> 4), mask=m, other=0.0) * absmax
        lo = tl.load(nf4_ptr + (b & 15), mask=m, other=0.0) * absmax
        o = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        pair = tl.reshape(tl.join(hi, lo), [2 * BLOCK])   # (BLOCK, 2) -> high, low, high, low, ...
        tl.store(out_ptr + o, pair.to(out_ptr.dtype.element_ty), mask=o < 2 * n_bytes)

    return triton, nf4_dequant


@functools.cache
def have_triton() -> bool:
    """Triton is installed (the fast path's own kernels: here, kernels.py, swiglu_lora.py)."""
    return importlib.util.find_spec("triton") is not None


def handles(qs) -> bool:
    """The kernel handles this QuantState: NF4 with 16 entries, an even block size, fp32 tables (it runs
    where the weight is on CUDA and Triton is installed)."""
    if getattr(qs, "quant_type", None) != "nf4" or qs.blocksize % 2 or qs.code.numel() != 16:
        return False
    if qs.nested:
        return qs.absmax.dtype == torch.uint8 and qs.state2.absmax.dtype == torch.float32 and \
            qs.state2.code.dtype == torch.float32
    return qs.absmax.dtype == torch.float32


class Tables(NamedTuple):
    """What both NF4 kernels (here and model.fast.nf4_matmul) read besides the packed bytes."""
    absmax: torch.Tensor    # per block: fp32, or (double quantisation) its 8-bit code
    absmax2: torch.Tensor   # the second-level scales (unused without double quantisation)
    code2: torch.Tensor     # the second-level code table (unused without)
    offset: torch.Tensor    # the second-level offset, one fp32 element (unused without)
    code: torch.Tensor      # the 16 NF4 values, fp32
    qblock2: int            # absmax codes a second-level scale covers


def tables(qs, device: torch.device) -> Tables:
    """QuantState `qs` as the kernels take it. A float offset is filled on the device (no host-to-device copy:
    a CUDA graph capture refuses one)."""
    code = qs.code if qs.code.dtype == torch.float32 else qs.code.float()
    if not qs.nested:
        return Tables(qs.absmax, qs.absmax, code, code, code, 2)   # unused second-level arguments
    s2 = qs.state2
    offset = qs.offset if torch.is_tensor(qs.offset) else torch.full((1,), float(qs.offset), device=device)
    return Tables(qs.absmax, s2.absmax, s2.code, offset.float(), code, s2.blocksize)


def packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed NF4 bytes of `weight`, flat (bitsandbytes' layout, any dtype holding them, e.g. FSDP2's
    float32 words)."""
    return weight.detach().reshape(-1).view(torch.uint8)


def dequantize_nf4(weight: torch.Tensor, qs, out: torch.Tensor) -> torch.Tensor:
    """Write the 16-bit weight of the packed NF4 `weight` (bitsandbytes' layout, any dtype holding the bytes,
    e.g. FSDP2's float32 words) with QuantState `qs` into `out` (contiguous, qs.shape's numel)."""
    triton, kernel = _kernel()
    packed = packed_bytes(weight)
    n_bytes = packed.numel()
    assert out.is_contiguous() and out.numel() == 2 * n_bytes, (out.shape, n_bytes)
    t = tables(qs, out.device)
    kernel[(triton.cdiv(n_bytes, BLOCK_BYTES),)](packed, t.absmax, t.absmax2, t.code2, t.offset, t.code, out,
                                                  n_bytes, qs.blocksize, t.qblock2, bool(qs.nested), BLOCK_BYTES)
    return out
