"""The LoRA projection's GEMMs in the orders model/fast/lora.py could run them, timed at Llama-3-8B shapes.

For each projection group of one decoder layer (q/k/v, o, gate/up, down; N = 2 x 2048 tokens, bf16, r = 16 a
projection) it times on the GPU:
  forward   f_base: x W^T alone (what the base model pays)
            f_thin_first: x A^T, then y = (x A^T) B^T (+ residual), then y += x W^T (the GEMM's beta = 1):
                          what LoraGroupFn.forward runs
            f_base_first: y = x W^T (+ residual), then y += (x A^T) B^T
            f_kcat: one GEMM over K = in + r, [x | x A^T] [W | B]^T, x copied into the wider buffer first
            f_thin: x A^T alone (what the recomputation saves by taking the forward's product)
  backward  b_base: dy W alone
            b_base_first: dx = dy W, then dx += (dy B) A (LoraGroupFn before session 9)
            b_thin_first: dx = (dy B) A, then dx += dy W (beta = 1)
            both with dy B, dy^T (x A^T) and (dy B)^T x, the adapter's own gradients.
Prints one JSON object (milliseconds per call, CUDA events over `--iters` calls after 5 warm-up calls) and
writes it to --out when given. Run on the device:

    python bench/lora_gemm_orders.py --out $OUT/lora_gemm_orders.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (in, sum of out, sum of r, whether the residual stream is added): Llama-3-8B's groups at r = 16
GROUPS = {"qkv": (4096, 6144, 48, False), "o": (4096, 4096, 16, True), "gate_up": (4096, 28672, 32, False),
          "down": (14336, 4096, 16, True)}


def time_ms(fn, iters: int) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 4)


def group_times(inn: int, out: int, r: int, residual: bool, tokens: int, iters: int) -> dict:
    import torch

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, inn, device=dev, dtype=dt)
    w = torch.randn(out, inn, device=dev, dtype=dt) / inn ** 0.5
    a = torch.randn(r, inn, device=dev, dtype=dt) / inn ** 0.5
    b = torch.randn(out, r, device=dev, dtype=dt) * 0.01
    h = torch.randn(tokens, out, device=dev, dtype=dt) if residual else None
    w_cat = torch.cat([w, b], dim=1)
    x_cat = torch.empty(tokens, inn + r, device=dev, dtype=dt)
    dy = torch.randn(tokens, out, device=dev, dtype=dt)
    xa = x @ a.t()

    def f_thin_first():
        t = x @ a.t()
        y = torch.mm(t, b.t()) if h is None else torch.addmm(h, t, b.t())
        return y.addmm_(x, w.t())

    def f_base_first():
        y = x @ w.t() if h is None else torch.addmm(h, x, w.t())
        return y.addmm_(x @ a.t(), b.t())

    def f_kcat():
        x_cat[:, :inn].copy_(x)
        torch.mm(x, a.t(), out=x_cat[:, inn:])
        return x_cat @ w_cat.t() if h is None else torch.addmm(h, x_cat, w_cat.t())

    def adapter_grads():
        dxa = dy @ b
        return dxa, dy.t() @ xa, dxa.t() @ x

    def b_base_first():
        dxa, _, _ = adapter_grads()
        return (dy @ w).addmm_(dxa, a)

    def b_thin_first():
        dxa, _, _ = adapter_grads()
        return (dxa @ a).addmm_(dy, w)

    res = {name: time_ms(fn, iters) for name, fn in [
        ("f_base", lambda: x @ w.t()), ("f_thin_first", f_thin_first), ("f_base_first", f_base_first),
        ("f_kcat", f_kcat),
        ("f_thin", lambda: x @ a.t()), ("b_base", lambda: dy @ w), ("b_base_first", b_base_first),
        ("b_thin_first", b_thin_first)]}
    # the orders compute the same thing (bf16 sums in another order)
    res["max_diff_kcat"] = float((f_kcat().float() - f_thin_first().float()).abs().max())
    res["max_diff_backward"] = float((b_thin_first().float() - b_base_first().float()).abs().max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    res = {name: group_times(*shape, args.tokens, args.iters) for name, shape in GROUPS.items()}
    keys = [k for k in res["qkv"] if not k.startswith("max_diff")]
    res["per_layer_ms"] = {k: round(sum(res[g][k] for g in GROUPS), 4) for k in keys}
    res["device"] = torch.cuda.get_device_name()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
