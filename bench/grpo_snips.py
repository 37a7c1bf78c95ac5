"""GRPO after SFT on SNIPS slot filling (issue 24): does reinforcement on a verifiable reward improve the held-out
answers of a small supervised fine-tune? Embedded SmolLM2-135M-Instruct, CPU-sized.

    python bench/grpo_snips.py --out bench/results/preference/grpo_snips_cpu.json [KEY=VALUE ...]

1. SFT starting point: `loraforge train examples/snips_slots.yaml` on `--sft-per-intent` training chats per intent
   (seeded), one epoch, then `loraforge merge` (bf16). 2. GRPO (`objective: grpo`) from that merged model on
   `--grpo-per-intent` other training queries per intent, G = 8 samples each, reward = the answer's slot F1
   against the reference slots when the answer is JSON valid against the SNIPS schema, else 0 (`bench/
   snips_reward.py`; schema validity alone would pay `{}` in full). 3. The GRPO run scores the merged SFT model and
   the tuned adapter with greedy answers on the same `--test-per-intent` validate queries per intent
   (`grpo_eval.json`): mean reward (gated slot F1) and pass rate (reward 1: every slot right, valid JSON), with
   paired bootstrap CIs of the gains. Extra arguments are config overrides for the GRPO run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402
from grpo_quality import run_and_compare  # noqa: E402
from snips_slots import DATA, ROOT, stratified, write  # noqa: E402

SYSTEM = ("Extract the slots of the user's voice-assistant query. Reply with a JSON object only: slot name -> the "
          "slot's exact text.")   # examples/snips_slots.yaml's system prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/grpo-snips"))
    ap.add_argument("--sft-per-intent", type=int, default=40)
    ap.add_argument("--grpo-per-intent", type=int, default=20)
    ap.add_argument("--test-per-intent", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="GRPO config overrides, KEY=VALUE")
    args = ap.parse_args()

    from loraforge.config import load_config

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pool = stratified(DATA / "train.jsonl", args.sft_per_intent + args.grpo_per_intent, 0)
    by_intent: dict[str, list[dict]] = {}
    for r in pool:
        by_intent.setdefault(r["intent"], []).append(r)
    sft = [r for rows in by_intent.values() for r in rows[:args.sft_per_intent]]
    grpo = [r for rows in by_intent.values() for r in rows[args.sft_per_intent:]]
    test = stratified(DATA / "test.jsonl", args.test_per_intent, 1)
    write(work / "sft.jsonl", sft)
    write(work / "prompts.jsonl", [{"prompt": r["messages"][0]["content"], "answer": r["messages"][-1]["content"]}
                                    for r in grpo])
    write(work / "test.jsonl", [{"prompt": r["messages"][0]["content"], "answer": r["messages"][-1]["content"]}
                                for r in test])
    t0 = time.time()
    sft_run, merged = work / "sft", work / "sft-merged"
    reused = (merged / "config.json").is_file()   # an earlier run's SFT starting point in --work
    if not reused:
        subprocess.run([sys.executable, "-m", "loraforge", "train", str(ROOT / "examples/snips_slots.yaml"),
                        f"output_dir={sft_run}", f"data.train={work / 'sft.jsonl'}", "train.epochs=1",
                        "train.batch_size=8", "train.eval_every=1000", "train.save_every=1000",
                        "data.validation_split=0.05", "eval.test=null", "--overwrite"], check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "loraforge", "merge", str(sft_run), "--out", str(merged),
                        "--overwrite"], check=True)
    sft_seconds = time.time() - t0
    tree = {"base_model": str(merged), "output_dir": str(work / "run"), "objective": "grpo",
            "data": {"train": str(work / "prompts.jsonl"), "validation": str(work / "test.jsonl"),
                     "system_prompt": SYSTEM, "max_seq_length": 256},
            "grpo": {"rewards": [str(HERE / "snips_reward.py")], "group_size": 8, "max_new_tokens": 64,
                     "temperature": 1.0, "pass_threshold": 1.0},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 1, "learning_rate": 2e-4, "batch_size": 8, "grad_accum": 1, "warmup_ratio": 0.05,
                      "eval_every": 100000, "save_every": 100000},
            "eval": {"batch_size": 35, "schema_file": str(DATA / "schema.json")}}
    cfg = load_config(base=tree, overrides=args.overrides)
    summary, seconds, compared = run_and_compare(cfg)
    out = {"command": "python " + " ".join(sys.argv),
           "task": "SNIPS slot filling; reward = slot F1 of a schema-valid JSON answer, else 0"
                   + ("" if len(cfg.grpo.rewards) == 1 else f"; rewards summed: {cfg.grpo.rewards}"),
           "model": "SmolLM2-135M-Instruct + a one-epoch SFT adapter on the SFT slice (merged, bf16)",
           "sft_examples": len(sft), "grpo_prompts": len(grpo), **compared,
           "seconds_sft": None if reused else round(sft_seconds, 1), "sft_reused": reused, "seconds_grpo": round(seconds, 1), "train": summary,
           "config": yaml.safe_load(cfg.to_yaml()),
           "machine": {"platform": platform.platform(), "processor": platform.processor()}}
    emit(json.loads(json.dumps(out, default=str)), args.out)


if __name__ == "__main__":
    main()
