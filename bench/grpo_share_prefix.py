"""GRPO's step on the CPU with each prompt computed once for its G completions (data.share_prefix, on by default
on the CPU) against the padded rows of before, through `loraforge train` (objective grpo) on BANKING77 prompts
with the embedded SmolLM2-135M-Instruct; the same seed, so the same samples and (up to rounding) the same losses.

    python bench/grpo_share_prefix.py [--steps 4] [--out FILE]

Per setting: seconds per step (the median of metrics.jsonl's step times, the first step left out: a shared
2-core machine's steps vary), train seconds, and each step's loss; the ratio of the padded rows' seconds per
step to the shared ones'. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402


def run(setting: str, prompts: Path, work: Path, steps: int) -> dict:
    from loraforge.config import load_config
    from loraforge.quickstart import SYSTEM_PROMPT
    from loraforge.train.run import run_training

    tree = {"base_model": "smollm2-135m-instruct", "output_dir": str(work / setting), "objective": "grpo",
            "data": {"train": str(prompts), "validation_split": 0.0, "system_prompt": SYSTEM_PROMPT,
                     "max_seq_length": 256, "share_prefix": setting},
            "grpo": {"rewards": ["exact_match"], "group_size": 8, "max_new_tokens": 16, "temperature": 1.0},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 1, "max_steps": steps, "learning_rate": 1e-4, "batch_size": 8, "grad_accum": 1,
                      "eval_every": 100000, "save_every": 100000}}
    t0 = time.time()
    result = run_training(load_config(base=tree), overwrite=True)
    rows = [json.loads(x) for x in (work / setting / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ends = [r["elapsed_s"] for r in rows]
    each = [round(b - a, 2) for a, b in zip([0.0, *ends], ends)]
    later = sorted(each[1:]) or each   # this 2-core machine is shared: the median step, not the mean
    return {"share_prefix": setting, "seconds_per_step": later[len(later) // 2],
            "step_seconds": each, "losses": [r["loss"] for r in rows], "rewards": [r.get("reward") for r in rows],
            "train_seconds": result.summary["train_seconds"], "wall_seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from loraforge.data.formats import write_jsonl
    from loraforge.quickstart import SEED, banking77_rows

    rows = banking77_rows("train")
    random.Random(SEED).shuffle(rows)
    work = Path(tempfile.mkdtemp(prefix="lf-grpo-share-"))
    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": r["text"], "answer": r["category"]} for r in rows[:8 * a.steps]])
    results = [run(s, prompts, work, a.steps) for s in ("off", "auto")]
    off, on = results
    emit({"command": "python " + " ".join(sys.argv), "device": f"CPU ({platform.processor() or platform.machine()})",
          "model": "SmolLM2-135M-Instruct (embedded), LoRA r16, G = 8, 8 prompts a step, up to 16 new tokens",
          "rows": results, "speedup": round(off["seconds_per_step"] / on["seconds_per_step"], 3)}, a.out)


if __name__ == "__main__":
    main()
