"""LoRA dropout's mask kernel alone (model.fast.dropout), against the one it replaced.

Session 17's profile of `loraforge train` on BANKING77 with SmolLM2-135M's shape put 13% of the GPU's time in
`seeded_dropout` (bench/results/train_e2e/s17/profile_135m/): each element drew its own Philox number with
`tl.rand`, although one Philox call yields four 32-bit numbers (`tl.rand4x`). The product's kernel now gives each
group of four elements (one in each quarter of the block, so loads stay coalesced) one call; the previous
per-element kernel is kept here as the reference. They draw different, equally uniform masks, so the check is
statistical (the kept fraction within 5 standard deviations of 1 - p) plus the property training needs: the
same (seed, stream) regenerates the same mask (backward = forward's mask).

    python bench/dropout_kernel.py --out bench/results/dropout_kernel_h100.json     # on a CUDA device with Triton

Prints one JSON object: per input shape, microseconds per call for each kernel (median of 50 after warm-up) and
their ratio. A benchmark that guides a change to the product, not a claim: the claim is `bench/train_e2e.py`.
(`bench/results/dropout_kernel_h100.json` was measured when the four-a-call kernel was the candidate: its
`us_now` is the per-element kernel, `us_candidate` the one now in the product.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402
from loraforge.model.fast.dropout import BLOCK, _apply_mask  # noqa: E402

# (tokens, features): SmolLM2-135M at 16 x 64 tokens (hidden 576, MLP 1,536), Llama-3.1-8B at 2 x 2,048 (4,096, 14,336)
SHAPES = [(1024, 576), (1024, 1536), (4096, 4096), (4096, 14336)]


def _per_element():
    """The kernel the product ran before: one Philox call (tl.rand) per element."""
    import triton
    import triton.language as tl

    @triton.jit
    def seeded_dropout1(x_ptr, out_ptr, seed_ptr, n, stream, p, scale, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        seed = tl.load(seed_ptr) + stream
        keep = tl.rand(seed, offs) >= p
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    def apply(x, seed, stream, p):
        out = torch.empty_like(x)
        n = x.numel()
        seeded_dropout1[(triton.cdiv(n, BLOCK),)](x, out, seed, n, stream, p, 1.0 / (1.0 - p), BLOCK=BLOCK)
        return out

    return apply


def _time_us(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def _kept_ok(y: torch.Tensor, p: float) -> tuple[float, bool]:
    n = y.numel()
    kept = float((y != 0).float().mean())
    sd = math.sqrt(p * (1 - p) / n)
    return kept, abs(kept - (1 - p)) < 5 * sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    before = _per_element()
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    rows = []
    for tokens, features in SHAPES:
        x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16) + 3.0   # no zeros of its own
        old = _time_us(lambda: before(x, seed, 5, a.p))
        now = _time_us(lambda: _apply_mask(x, seed, 5, a.p))
        y_old, y_now = before(x, seed, 5, a.p), _apply_mask(x, seed, 5, a.p)
        kept_old, ok_old = _kept_ok(y_old, a.p)
        kept_now, ok_now = _kept_ok(y_now, a.p)
        rows.append({"shape": [tokens, features], "us_per_element": round(old, 1), "us_product": round(now, 1),
                     "speedup": round(old / now, 2), "kept_per_element": round(kept_old, 5),
                     "kept_product": round(kept_now, 5), "kept_ok": ok_old and ok_now,
                     "product_regenerates": bool(torch.equal(y_now, _apply_mask(x, seed, 5, a.p))),
                     "product_other_stream_differs": not bool(torch.equal(y_now, _apply_mask(x, seed, 6, a.p)))})
        print(json.dumps(rows[-1]), file=sys.stderr)
    emit({"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0), "p": a.p, "block": BLOCK,
          "rows": rows}, a.out)


if __name__ == "__main__":
    main()
