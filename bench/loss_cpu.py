"""The CPU loss of the fast path (model.fast.ops.linear_cross_entropy_sum off CUDA): its per-row chunks
(_LinearLogp) against the checkpointed per-chunk cross-entropy it replaced (written out here as the reference),
forward + backward over SmolLM2-135M's head (vocabulary 49,152, hidden 576), fp32, median of 9.

    python bench/loss_cpu.py --out bench/results/loss_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402
from loraforge.model.fast import ops  # noqa: E402


def checkpointed_chunks(h, w, y, chunk: int = 2048):
    ce = lambda a, b, c: F.cross_entropy((a @ b.t()).float(), c, reduction="sum")  # noqa: E731
    return sum(checkpoint(ce, h[s:s + chunk], w, y[s:s + chunk], use_reentrant=False)
               for s in range(0, h.shape[0], chunk))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(49152, 576) * 0.02
    rows = []
    for n in (50, 400):   # a quickstart batch's loss rows (8 label answers), and a longer-answer batch
        h0, y = torch.randn(n, 576), torch.randint(0, 49152, (n,))
        out = {"loss_rows": n}
        for name, fn in (("reference", checkpointed_chunks), ("product", ops.linear_cross_entropy_sum)):
            times = []
            for _ in range(9):
                h = h0.clone().requires_grad_(True)
                t = time.perf_counter()
                s = fn(h, w, y)
                s.backward()
                times.append(time.perf_counter() - t)
            out[f"{name}_ms"] = round(statistics.median(times) * 1000, 1)
            out[f"{name}_loss"] = float(s.detach())
            out[f"{name}_grad"] = h.grad
        out["max_grad_diff"] = float((out.pop("product_grad") - out.pop("reference_grad")).abs().max())
        rows.append(out)
    emit({"command": " ".join(sys.argv), "device": "cpu", "threads": torch.get_num_threads(), "rows": rows}, a.out)


if __name__ == "__main__":
    main()
