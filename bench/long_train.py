"""Long inputs through the product (issue 25): `loraforge train` on a long-document set built from shipped text,
Llama-3.1-8B shape (random weights, its llama3 RoPE scaling) QLoRA, batch 1, at each length asked.

    python bench/long_train.py --tokenizer TOKDIR --lengths 32768,131072 --out $OUT/long_train.json

The documents: the shipped BANKING77 and SNIPS training queries (src/loraforge/datasets, with their licences),
shuffled (seeded) and numbered one per line until the chat fills the length asked (less a margin for the
template), then a question about one line ("What does line J say? Reply with the line only.") whose answer is
that line's text: retrieval over the whole context, the loss on the answer's tokens only. `--docs` training
chats and one validation chat per length, each length its own `loraforge train` (data.max_seq_length = the
length, the config's defaults otherwise: offloaded checkpointing, the chunked MLP of long inputs, 8-bit AdamW).
Rows: tokens/s of training, peak GPU memory reserved/allocated, seconds, from the run's summary.json; the
benchmark-loop figures for the same lengths come from bench/long_context.py (run it in the same call to compare).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402
from _peers import loraforge_train  # noqa: E402
from long_context import make  # noqa: E402

DATASETS = ROOT / "src/loraforge/datasets"
MARGIN = 64   # tokens left for the chat template around the document and the question


def shipped_lines(seed: int) -> list[str]:
    with (DATASETS / "banking77" / "train.csv").open(encoding="utf-8") as f:
        lines = [r["text"] for r in csv.DictReader(f)]
    for x in (DATASETS / "snips2017" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        lines.append(json.loads(x)["messages"][0]["content"])
    lines = [" ".join(line.split()) for line in lines if line.strip()]
    random.Random(seed).shuffle(lines)
    return lines


def document_chat(tokenizer, lines: list[str], length: int, rng: random.Random) -> dict:
    """One chat of at most `length` tokens: numbered lines, then a question about one of them."""
    budget = length - MARGIN - 48   # the question and the answer
    picked, used = [], 0
    for line in itertools.cycle(lines):   # 524,288 tokens need the ~24,000 shipped queries about 1.5 times
        text = f"{len(picked) + 1}. {line}\n"
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if used + n > budget:
            break
        picked.append(text)
        used += n
    j = rng.randrange(len(picked))
    answer = picked[j].split(". ", 1)[1].strip()
    question = f"What does line {j + 1} say? Reply with the line only."
    return {"messages": [{"role": "user", "content": "".join(picked) + "\n" + question},
                         {"role": "assistant", "content": answer}]}


def write_set(path: Path, tokenizer, lines: list[str], length: int, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(lines))
        rows.append(document_chat(tokenizer, lines[start:] + lines[:start], length, rng))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. SmolLM2's: shipped text tokenizes "
                                                       "as a real model's would)")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--docs", type=int, default=3, help="training chats per length")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lf-long-train"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    a.workdir.mkdir(parents=True, exist_ok=True)
    folder = a.workdir / "llama-8b-3.1"
    if not (folder / "config.json").is_file():
        make(folder, a.tokenizer)
    lines = shipped_lines(0)
    rows = []
    for length in [int(x) for x in a.lengths.split(",") if x]:
        work = a.workdir / str(length)
        work.mkdir(parents=True, exist_ok=True)
        write_set(work / "train.jsonl", tokenizer, lines, length, a.docs, seed=length)
        write_set(work / "val.jsonl", tokenizer, lines, length, 1, seed=length + 1)
        cfg = {"base_model": str(folder), "output_dir": str(work / "run"), "seed": 3407,
               "model": {"quantization": "nf4", "gradient_checkpointing": "offload"},
               "data": {"train": str(work / "train.jsonl"), "validation": str(work / "val.jsonl"),
                        "max_seq_length": length},
               "train": {"epochs": 1, "batch_size": 1, "grad_accum": 1, "eval_every": 1000, "save_every": 1000}}
        s, wall, log = loraforge_train(cfg, work)
        row = {"length": length, "docs": a.docs, "wall_seconds": round(wall, 1)}
        if s is None:
            row["error"] = log[-3000:]
        else:
            row |= {k: s.get(k) for k in ("train_seconds", "tokens_seen", "tokens_per_s", "peak_reserved_gib",
                                          "peak_allocated_gib", "final_val_loss", "planned_tokens_per_s",
                                          "seconds_in", "steps")}
        rows.append(row)
        print(json.dumps(row)[:600], file=sys.stderr, flush=True)
    import torch

    emit({"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
          else "cpu", "model": "Llama-3.1-8B shape, random weights, llama3 RoPE scaling, QLoRA r = alpha = 16, batch 1",
          "rows": rows}, a.out)


if __name__ == "__main__":
    main()
