"""Preference tuning's speed and memory, what users run, against the peers in one device call (issue 24).

`loraforge train` with `objective: dpo` (or orpo) against Unsloth + TRL's DPOTrainer / ORPOTrainer (Unsloth
patches them on import) and plain TRL + PEFT, on the same pairs: a Llama-3.1-8B shape QLoRA (random weights,
SmolLM2's tokenizer and chat template, built by bench/train_speed.py) and pairs of about 2 x 1,024 tokens
(a ~480-token user prompt, ~510-token chosen and rejected answers, the chat template's tokens on top).
r = alpha = 16 on all linear layers, dropout 0, beta 0.1, lr 5e-6, 2 pairs a micro-batch x 2 accumulation,
gradient checkpointing on (loraforge/Unsloth: offloaded), each tool in its own process. DPO's reference is the
base with the adapter off for every tool (TRL computes it in each step; loraforge the first time a pair comes,
so in one epoch also in each step).

    python bench/preference_speed.py --tokenizer TOKDIR --out $OUT/pref.json
    python bench/preference_speed.py --tokenizer TOKDIR --objectives dpo --tools loraforge,unsloth-trl --pairs 32

tokens/s = the pairs' tokens (prompt + chosen + prompt + rejected, as each tool tokenizes them) x epochs over
the training loop's seconds (loraforge's summary.json train_seconds; the peers' trainer.train()). Peak memory is
torch's max reserved (and allocated) over the training loop. Prints one JSON object with rows and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402
from _peers import keep_rows, loraforge_train, peer_model, print_result, run_tool, timed_train  # noqa: E402
TOOLS = ["loraforge", "unsloth-trl", "trl"]
R, LR, BETA, SEED, BATCH, ACCUM = 16, 5e-6, 0.1, 3407, 2, 2
PROMPT_TOKENS, ANSWER_TOKENS, MAX_LENGTH = 480, 510, 1152


def _text(tok, words: list[str], rng: random.Random, n: int) -> str:
    """About n tokens of random words (cut to n tokens of the tokenizer, then decoded)."""
    ids = tok(" ".join(rng.choice(words) for _ in range(n)), add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids).strip()


def make_pairs(tokenizer_dir: str, n: int, out: Path) -> Path:
    """n conversational pairs {prompt: [user], chosen: [assistant], rejected: [assistant]} as JSONL."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = [w for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3]
    words = sorted(w[1:] for w in words)
    rng = random.Random(SEED)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": _text(tok, words, rng, PROMPT_TOKENS)}],
                                "chosen": [{"role": "assistant", "content": _text(tok, words, rng, ANSWER_TOKENS)}],
                                "rejected": [{"role": "assistant",
                                              "content": _text(tok, words, rng, ANSWER_TOKENS)}]}) + "\n")
    return out


def run_loraforge(spec: dict, work: Path) -> dict:
    cfg = {"base_model": spec["model_dir"], "output_dir": str(work / "run"), "seed": SEED,
           "objective": spec["objective"],
           "model": {"quantization": spec.get("quantization", "nf4"), "gradient_checkpointing": "offload"},
           "data": {"train": spec["train"], "validation_split": 0.0, "max_seq_length": MAX_LENGTH},
           "preference": {"beta": BETA, "max_prompt_length": 1024},
           "lora": {"r": R, "alpha": R, "dropout": 0.0},
           "train": {"epochs": 1, "learning_rate": LR, "batch_size": BATCH, "grad_accum": ACCUM,
                     "eval_every": 100000, "save_every": 100000}}
    s, wall, log = loraforge_train(cfg, work)
    if s is None:
        return {"error": log[-3000:]}
    return {"wall_seconds": round(wall, 1), "train_seconds": s["train_seconds"],
            "tokens": s["tokens_seen"], "tokens_per_s": s["tokens_per_s"],
            "peak_reserved_gib": s["peak_reserved_gib"], "peak_allocated_gib": s.get("peak_allocated_gib"),
            "final_train_loss": s.get("final_train_loss")}


def run_peer(tool: str, spec: dict, work: Path) -> dict:
    """Unsloth + TRL (as its notebooks) or plain TRL + PEFT; runs in this process (`child`)."""
    import torch

    cuda = torch.cuda.is_available()   # (CPU: a smoke test of the set-up only)
    t_start = time.time()
    model, tok, kw = peer_model(tool, spec["model_dir"], MAX_LENGTH, qlora=True, r=R, dropout=0.0, seed=SEED)
    from datasets import load_dataset

    common = dict(output_dir=str(work / "out"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                  num_train_epochs=1, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.05,
                  optim="adamw_8bit" if tool == "unsloth-trl" else "adamw_torch_fused", bf16=cuda, logging_steps=5,
                  save_strategy="no", report_to="none", seed=SEED, max_length=MAX_LENGTH, beta=BETA,
                  gradient_checkpointing=tool == "trl", dataset_num_proc=4)
    if spec["objective"] == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    data = load_dataset("json", data_files={"train": spec["train"]})["train"]
    trainer = Trainer(model=model, args=Config(**common), train_dataset=data, processing_class=tok, **kw)
    ds = trainer.train_dataset   # each side after its prompt: the prompt counts twice, as in loraforge's tokens_seen
    if "chosen_input_ids" in ds.column_names:   # TRL 1.15's ORPO: each side's ids hold the prompt already
        tokens = sum(len(x) for k in ("chosen_input_ids", "rejected_input_ids") for x in ds[k])
    else:                                       # its DPO: prompt_ids, chosen_ids, rejected_ids
        tokens = sum(len(x) * (2 if k == "prompt_ids" else 1) for k in ("prompt_ids", "chosen_ids", "rejected_ids")
                     for x in ds[k])
    cols = ds.column_names
    out, secs, peaks = timed_train(trainer)
    return {"wall_seconds": round(time.time() - t_start, 1), "train_seconds": round(secs, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / secs, 1), **peaks, "final_train_loss": out.training_loss,
            "token_columns": cols}


def ratios(rows: list[dict]) -> dict:
    ok = {(r["objective"], r["tool"]): r for r in rows if "error" not in r}
    out = {}
    for (obj, tool), r in ok.items():
        ours = ok.get((obj, "loraforge"))
        if tool != "loraforge" and ours:
            out[f"{obj}:{tool}"] = {"speed": round(ours["tokens_per_s"] / r["tokens_per_s"], 3),
                                    "memory": round(ours["peak_reserved_gib"] / r["peak_reserved_gib"], 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs="?", default="run", choices=["run", "child"])
    ap.add_argument("--tokenizer", help="SmolLM2's HF folder (tokenizer and chat template)")
    ap.add_argument("--objectives", default="dpo,orpo")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--shape", default="8b", help="a bench/train_speed.py shape")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per tool and objective")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lf-pref"))
    ap.add_argument("--spec", type=Path, help="(child) the spec file")
    ap.add_argument("--tool", help="(child) the peer")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.cmd == "child":
        print_result(run_peer(a.tool, json.loads(a.spec.read_text()), a.spec.parent))
        return
    import torch

    from train_e2e import model_dir

    train = make_pairs(a.tokenizer, a.pairs, a.cache / f"pairs-{a.pairs}.jsonl")
    rows = []
    for objective in a.objectives.split(","):
        spec = {"objective": objective, "model_dir": model_dir(a.shape, a.tokenizer, a.cache), "train": str(train)}
        for tool in a.tools.split(","):
            res = run_tool(tool, spec, a.cache / objective / tool, __file__, run_loraforge, a.timeout)
            rows.append({"objective": objective, "tool": tool, **res})
            keep_rows(a.out, {"command": " ".join(sys.argv), "rows": rows})
    out = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(0), "shape": a.shape,
           "pairs": a.pairs, "rows": rows, "ratios": ratios(rows)}
    emit(out, a.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
