"""Forgetting vs task accuracy with and without train.replay, from quickstart runs: prints the issue-20 JSON.

    loraforge quickstart --output-dir A train.replay=0 ; loraforge quickstart --output-dir B train.replay=0.25
    python bench/quality_forgetting.py A B --command "..." --device "..." > bench/results/quality/forgetting_cpu.json

Both runs must use the same test slice (same --per-intent / --test-size / seed). `value` is the fine-tuned
/ base regression-rate ratio of the replay run (95% CI: bootstrap over the regression prompts, paired);
`task_delta` its accuracy minus the run without replay (paired bootstrap over the test queries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from loraforge.eval.stats import bootstrap_ci, paired_test


def ratio_ci(tuned: list[float], base: list[float], seed: int = 0, n: int = 10_000) -> tuple[float, list[float]]:
    t, b = np.asarray(tuned), np.asarray(base)
    idx = np.random.default_rng(seed).integers(0, len(t), size=(n, len(t)))
    ratios = t[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-9)
    return float(t.mean() / b.mean()), [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def summarise(run: Path) -> dict:
    q = json.loads((run / "quickstart.json").read_text())
    correct = [float(e["finetuned"].strip() == e["label"]) for e in q["examples"]]
    f = q["forgetting"]
    ratio, ci = ratio_ci(f["finetuned_per_example"], f["base_per_example"])
    return {"run": str(run), "replay": q.get("replay", 0.0), "accuracy": q["finetuned_accuracy"],
            "accuracy_ci": list(bootstrap_ci(correct)), "base_accuracy": q["base_accuracy"],
            "regression_base": f["base"], "regression_finetuned": f["finetuned"],
            "regression_finetuned_ci": list(bootstrap_ci(f["finetuned_per_example"])),
            "ratio": ratio, "ratio_ci": ci, "warning": f["warning"], "selected_step": q["train"].get("selected_step"),
            "steps": q["train"]["steps"], "replay_examples": q["train"].get("replay_examples"),
            "train_examples": q["train_examples"], "test_queries": q["test_queries"], "seconds": q["seconds"],
            "_correct": correct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path, help="quickstart run folder without replay")
    ap.add_argument("replay", type=Path, nargs="+", help="quickstart run folders with replay (the last is `value`)")
    ap.add_argument("--command", required=True)
    ap.add_argument("--device", required=True)
    args = ap.parse_args()
    base = summarise(args.baseline)
    runs = [summarise(r) for r in args.replay]
    main_run = runs[-1]
    delta = paired_test(main_run["_correct"], base["_correct"])
    for r in [base, *runs]:
        r.pop("_correct")
    out = {"task": "forgetting", "metric": "general-prompt regression rate, fine-tuned / base (replay on)",
           "value": main_run["ratio"], "ci": main_run["ratio_ci"], "replay": main_run["replay"],
           "task_metric": "BANKING77 exact match (quickstart test slice)",
           "task_delta": delta.diff, "task_delta_ci": list(delta.ci), "task_delta_p": delta.p_bootstrap,
           "target": "ratio >= 0.90 with task_delta >= -0.01", "baseline": base, "runs": runs,
           "command": args.command, "device": args.device}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
