"""How long a training step waits for a periodic checkpoint: train.checkpoint.save_checkpoint written on the
training thread against handed to the CheckpointWriter (host copies taken, files written on its thread).
SmolLM2-135M's shape (random weights), LoRA r16 on every linear layer, AdamW state after one step, as the
135M runs of bench/train_e2e.py save it every 50 steps; interleaved, the median of --rounds.

    python bench/checkpoint_save.py --out bench/results/checkpoint_save_cpu.json
    python bench/checkpoint_save.py --flat --out bench/results/checkpoint_save_cpu_flat.json   # train.flat.FlatAdamW

Not the product's end-to-end figure (that is `loraforge train`'s seconds_in.checkpoints in summary.json,
bench/train_e2e.py); this isolates what the training thread pays per save.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402

from loraforge.config import LoraSection  # noqa: E402
from loraforge.model.adapters import attach_adapter  # noqa: E402
from loraforge.train.checkpoint import CheckpointWriter, TrainerState, save_checkpoint  # noqa: E402
from loraforge.train.flat import FlatAdamW  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--flat", action="store_true", help="the optimizer one process trains with: FlatAdamW")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = attach_adapter(LlamaForCausalLM(cfg), LoraSection(r=16, alpha=16, dropout=0.05))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = FlatAdamW(params, lr=1e-3) if a.flat else torch.optim.AdamW(params, lr=1e-3)
    for p in params:   # FlatAdamW's members already hold their .grad views: fill those in place
        if p.grad is None:
            p.grad = torch.randn_like(p)
        else:
            p.grad.copy_(torch.randn_like(p))
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = Path(tempfile.mkdtemp()) / "checkpoints"
    writer = CheckpointWriter()
    waits: dict[str, list[float]] = {"training_thread": [], "background": []}
    for r in range(a.rounds):
        for mode in waits:
            state = TrainerState(step=2 * r + (mode == "background") + 1)
            t = time.perf_counter()
            save_checkpoint(root, model, opt, sched, state, "x: 1\n", keep_last=2,
                            writer=writer if mode == "background" else None, background=mode == "background")
            waits[mode].append(time.perf_counter() - t)
            writer.wait()   # the next save starts from a quiet disk either way
    med = {k: statistics.median(v) for k, v in waits.items()}
    flag = " --flat" if a.flat else ""
    emit({"command": "python bench/checkpoint_save.py" + flag + (f" --out {a.out}" if a.out else ""),
          "device": f"CPU ({platform.machine()}, {__import__('os').cpu_count()} cores)",
          "model": "SmolLM2-135M shape, LoRA r16 all linear layers, AdamW state",
          "optimizer": "FlatAdamW" if a.flat else "torch.optim.AdamW",
          "trainable_parameters": sum(p.numel() for p in params),
          "seconds_training_thread_waits": {k: [round(x, 4) for x in v] for k, v in waits.items()},
          "median_s": {k: round(v, 4) for k, v in med.items()},
          "background_over_training_thread": round(med["background"] / med["training_thread"], 3)}, a.out)


if __name__ == "__main__":
    main()
