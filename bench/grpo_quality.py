"""GRPO after SFT on a verifiable task (issue 24): BANKING77 intent labels, reward = exact match, with the
embedded SmolLM2-135M-Instruct. Held-out pass rate of the SFT starting point and of the GRPO-tuned adapter on
the same queries, with a paired bootstrap CI of the gain.

    loraforge quickstart --output-dir runs/quickstart          # the SFT starting point (10 examples per intent)
    python bench/grpo_quality.py --sft runs/quickstart --per-intent 5 \
        --out bench/results/preference/grpo_banking77_cpu.json

The quickstart's adapter is merged into the base (`loraforge merge`, bf16): that merged model is the
starting point, scored by the GRPO run itself before training (`grpo_base_eval.json`). GRPO prompts are
`--per-intent` BANKING77 training queries per intent that the quickstart neither trained nor validated on;
the held-out set is the quickstart's own 300 test queries. `loraforge train` with `objective: grpo` and the
config printed in the JSON (overrides as KEY=VALUE after the options); the adapter kept is the last step's.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402


def _queries(path: Path) -> set[str]:
    return {json.loads(x)["messages"][0]["content"] for x in path.read_text().splitlines() if x.strip()}


def run_and_compare(cfg) -> tuple[dict, float, dict]:
    """`loraforge train` on a GRPO config; (its summary, seconds, the held-out comparison of grpo_eval.json: pass
    rates and mean rewards of the starting point and the tuned adapter, with paired bootstrap CIs of the gains)."""
    from loraforge.eval.stats import bootstrap_ci, paired_test
    from loraforge.train.run import run_training

    t0 = time.time()
    result = run_training(cfg, overwrite=True)
    seconds = time.time() - t0
    ev = json.loads((Path(cfg.output_dir) / "grpo_eval.json").read_text())
    out = {"held_out": len(ev["tuned_passes"])}
    for key, name in (("passes", "pass_rate"), ("rewards", "mean_reward")):
        base, tuned = [float(x) for x in ev[f"base_{key}"]], [float(x) for x in ev[f"tuned_{key}"]]
        cmp = paired_test(tuned, base)
        out |= {f"sft_{name}": ev["base"][name], f"grpo_{name}": ev["tuned"][name],
                f"grpo_{name}_ci95": list(bootstrap_ci(tuned)), f"grpo_minus_sft_{name}": cmp.diff,
                f"grpo_minus_sft_{name}_ci95": list(cmp.ci), f"p_bootstrap_{name}": cmp.p_bootstrap}
    return result.summary, seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, type=Path, help="a `loraforge quickstart` run folder")
    ap.add_argument("--per-intent", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-grpo"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = ap.parse_args()

    from loraforge.config import load_config
    from loraforge.data.formats import write_jsonl
    from loraforge.quickstart import SEED, SYSTEM_PROMPT, banking77_rows

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    merged = work / "sft-merged"
    if not (merged / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "loraforge", "merge", str(args.sft), "--out", str(merged),
                        "--overwrite"], check=True)
    seen = _queries(args.sft / "data" / "train.jsonl") | _queries(args.sft / "data" / "validation.jsonl")
    by_label: dict[str, list[dict]] = {}
    for r in banking77_rows("train"):
        if r["text"] not in seen:
            by_label.setdefault(r["category"], []).append(r)
    rng = random.Random(SEED + 7)
    prompts = [{"prompt": r["text"], "answer": label} for label in sorted(by_label)
               for r in rng.sample(by_label[label], args.per_intent)]
    rng.shuffle(prompts)
    write_jsonl(work / "prompts.jsonl", prompts)
    test = [json.loads(x)["messages"] for x in (args.sft / "data" / "test.jsonl").read_text().splitlines() if x]
    write_jsonl(work / "test.jsonl", [{"prompt": m[0]["content"], "answer": m[-1]["content"]} for m in test])

    tree = {"base_model": str(merged), "output_dir": str(work / "run"), "objective": "grpo",
            "data": {"train": str(work / "prompts.jsonl"), "validation": str(work / "test.jsonl"),
                     "system_prompt": SYSTEM_PROMPT, "max_seq_length": 256},
            "grpo": {"rewards": ["exact_match"], "group_size": 8, "max_new_tokens": 16, "temperature": 1.0},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 1, "learning_rate": 1e-4, "batch_size": 8, "grad_accum": 1, "warmup_ratio": 0.05,
                      "eval_every": 100000, "save_every": 100000},
            "eval": {"batch_size": 32}}
    cfg = load_config(base=tree, overrides=args.overrides)
    summary, seconds, compared = run_and_compare(cfg)
    out = {"command": "python " + " ".join(sys.argv), "task": "banking77 intent label, reward exact_match",
           "model": "SmolLM2-135M-Instruct + the quickstart's SFT adapter (merged, bf16)",
           "grpo_prompts": len(prompts), **compared,
           "seconds": round(seconds, 1), "train": summary, "config": yaml.safe_load(cfg.to_yaml()),
           "machine": {"platform": platform.platform(), "processor": platform.processor()}}
    emit(json.loads(json.dumps(out, default=str)), args.out)


if __name__ == "__main__":
    main()
