"""A decode step's NF4 products at Llama-3.1-8B's shapes (issue 24: GRPO samples 8 completions of up to 1,024
tokens a step): the fast path's two ways, timed in one process on the GPU.

    python bench/nf4_decode_matmul.py --out $OUT/nf4_decode_matmul.json [--rows 1,8,32,64]

- `rebuild`: model.fast.nf4's kernel writes the 16-bit weight, then a GEMM (what decoding did before
  model.fast.nf4_matmul; what training still does);
- `packed`: model.fast.nf4_matmul reads the packed weight (what decoding does now); `packed_bn32` the same
  kernel with 32 output columns a program instead of 64 (more programs for the narrow k/v projections);
- `bnb_gemv` (one row only): bitsandbytes' own `gemv_4bit` inference kernel, for reference (timed eagerly).
Per row count: milliseconds per projection (20 calls captured as a CUDA graph, as the decoder replays its step;
CUDA events, the median of --repeat replays) and their
sum over one decoder layer times 32 layers (a token's base products), with the ratio rebuild / packed. Both
match x @ W^T (checked here against each other, and in tests/gpu/test_fast_decode_gpu.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}   # (out, in) of Llama-3.1-8B


def _time(fn, repeat: int, graphed: bool = True) -> float:
    """Milliseconds a call of fn, as a decode step runs it: 20 calls captured as one CUDA graph (after an eager
    call compiled the kernels), the median of `repeat` timed replays (graphed=False: 20 eager calls)."""
    fn()
    torch.cuda.synchronize()
    run = lambda: [fn() for _ in range(20)]  # noqa: E731
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 20)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import bitsandbytes.functional as bnbf

    from loraforge.model.fast import nf4, nf4_matmul

    torch.manual_seed(0)
    weights = {}
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        weights[name] = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
    buf = torch.empty(max(n * k for n, k in SHAPES.values()), dtype=torch.bfloat16, device="cuda")
    rows = []
    for m in [int(r) for r in args.rows.split(",")]:
        row = {"rows": m, "ms": {}}
        for name, (n, k) in SHAPES.items():
            packed, qs = weights[name]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
            dense = buf[:n * k].view(n, k)

            def rebuild():
                nf4.dequantize_nf4(packed, qs, dense)
                y.addmm_(x, dense.t())

            def packed_mm():
                nf4_matmul.add_matmul_(y, x, packed, qs)

            def packed_bn32():   # a variant: half the columns a program, twice the programs
                y.add_(nf4_matmul.partial_products(x, packed, qs, n, block_n=32).sum(0))

            ms = {"rebuild": _time(rebuild, args.repeat), "packed": _time(packed_mm, args.repeat),
                  "packed_bn32": _time(packed_bn32, args.repeat)}
            if m == 1:
                try:
                    ms["bnb_gemv"] = _time(lambda: bnbf.gemv_4bit(x, packed.t(), state=qs), args.repeat, graphed=False)
                except Exception as e:   # a reference row only: its absence is reported, not fatal
                    row.setdefault("errors", []).append(f"bnb_gemv {name}: {str(e)[:200]}")
            nf4.dequantize_nf4(packed, qs, dense)
            ref = x.float() @ dense.float().t()
            got = nf4_matmul.partial_products(x, packed, qs, n).sum(0)
            err = float((got - ref).abs().max() / ref.abs().max())
            row["ms"][name] = {**{key: round(v, 4) for key, v in ms.items()}, "max_rel_err": err,
                               "splits": nf4_matmul.splits(n, k, x.device)}
        for way in ("rebuild", "packed", "packed_bn32", "bnb_gemv"):
            if all(way in v for v in row["ms"].values()):
                row[f"{way}_ms_per_token_32_layers"] = round(32 * sum(v[way] for v in row["ms"].values()), 3)
        row["rebuild_over_packed"] = round(row["rebuild_ms_per_token_32_layers"] /
                                           row["packed_ms_per_token_32_layers"], 2)
        print(m, {k: v for k, v in row.items() if k != "ms"}, flush=True)
        rows.append(row)
    emit({"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
