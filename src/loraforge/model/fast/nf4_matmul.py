"""Few-row products with an NF4 weight read packed: y = x W^T for x of at most ROWS rows, W never rebuilt.

Why: decoding (GRPO's sampling, generation in eval) multiplies a few rows by every weight once a token.
Rebuilding an NF4 weight in 16 bits first (model.fast.nf4, then a GEMM) writes and reads 2 bytes a weight
for a product that needs the half byte it is stored in: ~36 GB of memory traffic a token at Llama-3.1-8B
instead of ~4.5 GB. This kernel loads the packed bytes, decodes them in registers with bitsandbytes'
arithmetic (NF4 value x absmax in fp32, rounded once to the compute dtype; under double quantisation the
absmax is an 8-bit code x a second-level scale + offset, as model.fast.nf4 decodes it) and feeds tl.dot.
A long K is split across programs so that a (few-row) product still fills the GPU; the splits' fp32
partial sums are added by torch afterwards, in a fixed order (no atomics: a decode replays the same).

The fast path uses it while decoding only (FastState.decoding, set by model.fast.decode): its kernel is
compiled on the decoder's first eager step, never inside a CUDA graph capture.
Tested against x @ dequantize_4bit(W)^T under Triton's CPU interpreter (tests/model/test_fast_nf4_matmul.py)
and compiled on the GPU (tests/gpu/test_fast_decode_gpu.py).
"""

from __future__ import annotations

import functools

import torch

from loraforge.model.fast.nf4 import packed_bytes, tables

ROWS = 64        # the most rows a product takes this way (a decode step's batch)
BLOCK_N = 64     # output columns a program
BLOCK_K = 128    # inner dimension a loop iteration (two 64-weight blocks of bitsandbytes' default)


@functools.cache
def _kernel():
    import triton   # optional dependency (CUDA kernels), so imported on first use
    import triton.language as tl

    @triton.jit
    def nf4_mm(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, nf4_ptr, out_ptr,
               M, N, K, k_split, stride_xm,
               qblock: tl.constexpr, qblock2: tl.constexpr, nested: tl.constexpr, aligned: tl.constexpr,
               exact: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        half = K // 2                                       # packed bytes a row of W
        acc = tl.full((BM, BN), 0.0, tl.float32)
        k0 = pid_k * k_split
        for kk in range(0, k_split, BK):
            kb = (k0 + kk) // 2 + tl.arange(0, BK // 2)    # byte columns of this tile
            byte = rn[:, None].to(tl.int64) * half + kb[None, :]
            m_w = (rn[:, None] < N) & (kb[None, :] < half)
            b = tl.load(packed_ptr + byte, mask=m_w, other=0).to(tl.int32)
            if aligned:   # rows and tiles hold whole blocks: one absmax a block, spread over its bytes
                kq = (k0 + kk) // qblock + tl.arange(0, BK // qblock)
                blk = rn[:, None].to(tl.int64) * (K // qblock) + kq[None, :]
                m_b = (rn[:, None] < N) & (kq[None, :] < K // qblock)
            else:         # any even K: a block index for every byte (both weights of a byte share one)
                blk = (2 * byte) // qblock
                m_b = m_w
            if nested:
                aq = tl.load(absmax_ptr + blk, mask=m_b, other=0).to(tl.int32)
                absmax = tl.load(code2_ptr + aq, mask=m_b, other=0.0) * \
                    tl.load(absmax2_ptr + blk // qblock2, mask=m_b, other=0.0) + tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + blk, mask=m_b, other=0.0)
            if aligned:
                absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BN, BK // qblock, qblock // 2)),
                                    [BN, BK // 2])
            hi = tl.load(nf4_ptr + (b >> 4)) * absmax
            lo = tl.load(nf4_ptr + (b & 15)) * absmax
            kx = k0 + kk + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :],
                        mask=(rm[:, None] < M) & (kx[None, :] < K), other=0.0)
            w = tl.reshape(tl.join(hi, lo), [BN, BK]).to(x.dtype)   # high nibble first, as bitsandbytes packs
            if exact:   # fp32 inputs: full-precision products, as torch's fp32 matmul (no TF32)
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    return triton, nf4_mm


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs worth launching: two a streaming multiprocessor (one where there is no GPU: the interpreter)."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def splits(n: int, k: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """How many parts K is cut into: enough programs for the GPU, each part at least 4 tiles of BLOCK_K."""
    tiles = -(-n // block_n)
    want = -(-_programs(device) // tiles)
    return max(1, min(want, k // (4 * BLOCK_K)))


def partial_products(x: torch.Tensor, weight: torch.Tensor, qs, n: int, split: int | None = None,
                     block_n: int = BLOCK_N) -> torch.Tensor:
    """x (M <= ROWS, K) in the compute dtype, `weight` the packed NF4 bytes of an (n, K) matrix with QuantState
    `qs` -> (split, M, n) fp32 partial sums of x W^T over `split` parts of K (None: `splits`); `block_n` output
    columns a program (bench/nf4_decode_matmul.py times others)."""
    triton, kernel = _kernel()
    m, k = x.shape
    assert m <= ROWS and k % 2 == 0 and x.stride(1) == 1, (x.shape, x.stride())
    packed = packed_bytes(weight)
    assert packed.numel() * 2 == n * k, (packed.numel(), n, k)
    split = splits(n, k, x.device, block_n) if split is None else split
    k_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
    split = triton.cdiv(k, k_split)
    out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    t = tables(qs, x.device)
    bm = max(16, triton.next_power_of_2(m))            # tl.dot takes 16 rows at least
    kernel[(triton.cdiv(n, block_n), split)](x, packed, t.absmax, t.absmax2, t.code2, t.offset, t.code, out,
                                             m, n, k, k_split, x.stride(0), qs.blocksize, t.qblock2,
                                             bool(qs.nested), k % qs.blocksize == 0 and BLOCK_K % qs.blocksize == 0,
                                             x.dtype == torch.float32, bm, block_n, BLOCK_K)
    return out


def product(x: torch.Tensor, weight: torch.Tensor, qs, n: int) -> torch.Tensor:
    """x W^T (M, n) in fp32, W the packed NF4 `weight` of an (n, K) matrix with QuantState `qs`."""
    parts = partial_products(x, weight, qs, n)
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def add_matmul_(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, qs) -> torch.Tensor:
    """y (M, n) += x W^T, W the packed NF4 `weight` (QuantState `qs`); y is returned."""
    return y.add_(product(x, weight, qs, y.shape[1]))
