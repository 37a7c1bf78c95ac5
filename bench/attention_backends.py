"""Causal attention's forward + backward through each of torch's SDPA backends, at the fast path's shapes
(Llama-3.1-8B: 32 query heads, 8 key/value heads, head_dim 128, bf16, batch 1), to decide which backend
model.fast.ops.attention should ask for on long inputs (issue 25: attention is ~80% of a 131,072-token step).

    python bench/attention_backends.py [--lengths 2048,32768,131072] [--reps 3] [--out FILE]

Per length and backend (flash = FlashAttention-2, cudnn, efficient): milliseconds of one forward + backward
(CUDA events, the median of --reps after one warm-up), TFLOP/s (causal: 2 x 2 x L^2/2 x d x heads forward,
2.5x that backward), and the largest difference of the output and of q's gradient from the flash backend's.
A backend that refuses the grouped-query call (enable_gqa) is tried with k/v expanded to every query head
("expanded": true). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def step(q, k, v, grad, backend, expand: bool):
    if expand:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    (gq,) = torch.autograd.grad(out, [q], grad)
    return out, gq


def time_one(q, k, v, grad, backend, expand: bool, reps: int):
    out, gq = step(q, k, v, grad, backend, expand)   # warm-up (and the check values)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(q, k, v, grad, backend, expand)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2], out, gq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = lambda h: (1, h, n, a.head_dim)  # noqa: E731
        q = torch.randn(shape(a.heads), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(shape(a.kv_heads), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(shape(a.kv_heads), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        grad = torch.randn(shape(a.heads), device="cuda", dtype=torch.bfloat16, generator=g)
        flops = 3.5 * 2 * 2 * n * n / 2 * a.head_dim * a.heads
        ref = None
        for name, backend in BACKENDS.items():
            row = {"length": n, "backend": name}
            for expand in (False, True):
                try:
                    ms, out, gq = time_one(q, k, v, grad, backend, expand, a.reps)
                except RuntimeError as e:
                    row["error"] = str(e).splitlines()[0][:200]
                    torch.cuda.empty_cache()
                    continue
                row.pop("error", None)
                row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), expanded=expand)
                if ref is None:
                    ref = (out.detach(), gq.detach())
                else:
                    row["max_diff_out"] = float((out - ref[0]).abs().max())
                    row["max_diff_grad_q"] = float((gq - ref[1]).abs().max())
                break
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del q, k, v, grad, ref
        torch.cuda.empty_cache()
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
