"""Host time of the optimizer step, the gradient clipping and the gradient reset for an adapter's tensors, per
tensor (torch.optim.AdamW) against one flat tensor (train.flat.FlatAdamW), on the machine it runs on.

Why: the steps of small-model runs are host-bound (session 17's H100 profile of the 135M BANKING77 run put AdamW's
step at 3.1 ms and the clip's norm at 1.7 ms of host time a step). With `--tiny` every tensor has one element, so
what is timed is the host's loop over the tensors, not arithmetic; without it, SmolLM2-135M's LoRA shapes
(r = 16 on every linear layer: 420 tensors, 4.9M values).

    python bench/optimizer_host.py --tiny --out bench/results/optimizer_host_cpu.json

Prints one JSON object: milliseconds per call (mean of --repeat after 5 warm-up calls) for each layout and the
ratios. A guide for the change, not a claim: the claim is `bench/train_e2e.py`'s 135M run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402
from loraforge.train.flat import FlatAdamW, stepped_parameters  # noqa: E402

# SmolLM2-135M: 30 layers, hidden 576, k/v 192, MLP 1,536; LoRA on q, k, v, o, gate, up, down
LAYERS, HIDDEN, KV, MLP, RANK = 30, 576, 192, 1536, 16


def shapes(tiny: bool) -> list[tuple[int, int]]:
    out = []
    for _ in range(LAYERS):
        for i, o in [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP),
                     (MLP, HIDDEN)]:
            out += [(1, 1), (1, 1)] if tiny else [(RANK, i), (o, RANK)]
    return out


def _ms(fn, repeat: int, device: str) -> float:
    for _ in range(5):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return round((time.perf_counter() - t) / repeat * 1e3, 4)


def time_layout(flat: bool, tiny: bool, device: str, repeat: int) -> dict:
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes(tiny)]
    opt = (FlatAdamW if flat else torch.optim.AdamW)(params, lr=1e-3, fused=device == "cuda" or None)
    for p in params:
        if p.grad is None:
            p.grad = torch.full_like(p, 1e-3)
        else:
            p.grad.fill_(1e-3)

    def reset():
        if flat:
            opt.zero_grad()
        else:
            for p in params:
                p.grad = None
            for p in params:
                p.grad = torch.full_like(p, 1e-3)

    return {"tensors": len(params), "step_ms": _ms(opt.step, repeat, device),
            "clip_ms": _ms(lambda: torch.nn.utils.clip_grad_norm_(stepped_parameters(opt), 1.0), repeat, device),
            "reset_ms": _ms(reset, repeat, device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one element per tensor: the host loop alone")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    per, flat = (time_layout(f, a.tiny, a.device, a.repeat) for f in (False, True))
    emit({"device": a.device, "tiny": a.tiny, "per_tensor": per, "flat": flat,
          "ratio": {k: round(flat[k] / max(per[k], 1e-9), 3) for k in ("step_ms", "clip_ms", "reset_ms")},
          "note": "reset: per tensor = zero_grad(set_to_none) and autograd's fresh .grad tensors; flat = one "
                  "zero_ of the flat gradient (the members' .grad stay views)"}, a.out)


if __name__ == "__main__":
    main()
