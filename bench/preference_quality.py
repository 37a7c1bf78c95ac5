"""DPO (or ORPO/SimPO) on Anthropic's HH-RLHF harmless pairs with the embedded SmolLM2-135M-Instruct:
held-out reward accuracy of the base and of the tuned adapter, with bootstrap confidence intervals.

    python bench/preference_quality.py --objective dpo --train 320 --test 150 train.learning_rate=1.5e-3 \
        --out bench/results/preference/dpo_hh_cpu.json

The pairs are the slice shipped in src/loraforge/datasets/hh_rlhf_harmless (a seeded shuffle: the first
--test pairs are held out, the next --train ones train). It runs `loraforge train`'s own function with the
config printed in the JSON, then reads the run's preference_eval.json (per-pair scores: 1 when the
implicit reward ranks chosen above rejected, 0.5 on a tie) and adds a 95% bootstrap CI of the tuned
accuracy and a paired bootstrap test against the base.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from importlib import resources
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", default="dpo", choices=["dpo", "orpo", "simpo"])
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--work", default="runs/bench-preference")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()

    from loraforge.config import load_config
    from loraforge.eval.stats import bootstrap_ci, paired_test
    from loraforge.train.run import run_training

    lines = (resources.files("loraforge.datasets") / "hh_rlhf_harmless" / "pairs.jsonl").read_text(
        encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "test.jsonl").write_text("\n".join(lines[:args.test]) + "\n", encoding="utf-8")
    (work / "train.jsonl").write_text("\n".join(lines[args.test:args.test + args.train]) + "\n", encoding="utf-8")
    tree = {"base_model": "smollm2-135m-instruct", "output_dir": str(work / "run"), "objective": args.objective,
            "data": {"train": str(work / "train.jsonl"), "validation": str(work / "test.jsonl"),
                     "max_seq_length": 128},
            "preference": {"max_prompt_length": 40},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 1, "learning_rate": 5e-4, "batch_size": 4, "grad_accum": 1, "warmup_ratio": 0.1,
                      "eval_every": 1000, "save_every": 1000}}
    cfg = load_config(base=tree, overrides=args.overrides)
    t0 = time.time()
    result = run_training(cfg, overwrite=True)
    seconds = time.time() - t0
    ev = json.loads((Path(cfg.output_dir) / "preference_eval.json").read_text())
    base, tuned = ev["base_scores"], ev["tuned_scores"]
    cmp = paired_test(tuned, base)
    out = {"command": "python " + " ".join(sys.argv), "objective": args.objective,
           "model": "SmolLM2-135M-Instruct", "data": "Anthropic HH-RLHF harmless-base (shipped slice), "
           f"{args.train} training pairs requested, {args.test} held out",
           "held_out_pairs": len(tuned),
           "base_reward_accuracy": ev["base"]["reward_accuracy"],
           "tuned_reward_accuracy": ev["tuned"]["reward_accuracy"],
           "tuned_reward_accuracy_ci95": list(bootstrap_ci(tuned)),
           "tuned_minus_base": cmp.diff, "tuned_minus_base_ci95": list(cmp.ci), "p_bootstrap": cmp.p_bootstrap,
           "base_reward_margin": ev["base"]["reward_margin"], "tuned_reward_margin": ev["tuned"]["reward_margin"],
           "base_val_loss": ev["base"]["loss"], "tuned_val_loss": ev["tuned"]["loss"],
           "seconds": round(seconds, 1), "train": result.summary,
           "config": yaml.safe_load(cfg.to_yaml()),
           "machine": {"platform": platform.platform(), "processor": platform.processor()}}
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
