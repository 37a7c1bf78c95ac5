"""The task an evaluation asks: the test prompts with their references, the few-shot variant of them,
the metric's options (label set, JSON Schema, regex) and a published reference result.

    prompts, refs = load_test(cfg, "test.jsonl", limit=None)
    opts = metric_options(cfg)                  # {"labels": [...]} / {"schema": {...}} / {"pattern": "..."}

Used by `loraforge eval` (eval.run), train's validation by the task's metric (eval.validation) and the
label sets of structured decoding (eval.structured).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig
from loraforge.data.formats import read_examples
from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import available_metrics

NEEDS_LABELS = ("accuracy", "macro_f1")


def read_labels(path: str | Path) -> list[str]:
    """A label set: a JSON list, or one label a line."""
    p = Path(path)
    if not p.is_file():
        raise LoraforgeError("label file not found", where=str(p), hint="pass --labels FILE (one label a line)")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return [str(x) for x in json.loads(text)]
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"label file is not a JSON list: {e.msg}", where=str(p)) from None
    labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not labels:
        raise LoraforgeError("label file is empty", where=str(p))
    return labels


def metric_options(cfg: RunConfig) -> dict[str, Any]:
    """The keyword options `metrics.score` needs for the configured metric."""
    ec, opts = cfg.eval, {}
    if ec.metric in NEEDS_LABELS:
        if not ec.labels:
            raise LoraforgeError(f"metric {ec.metric} needs the label set",
                                 hint="pass --labels FILE or set eval.labels (one label a line)")
        opts["labels"] = read_labels(ec.labels)
    if ec.metric == "json_schema":
        if not ec.schema_file:
            raise LoraforgeError("metric json_schema needs a schema", hint="set eval.schema_file=schema.json")
        try:
            opts["schema"] = json.loads(Path(ec.schema_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraforgeError("schema file not found", where=ec.schema_file) from None
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"the schema file is not JSON: {e.msg}", where=ec.schema_file) from None
    if ec.metric == "regex":
        if not ec.pattern:
            raise LoraforgeError("metric regex needs a pattern", hint="set eval.pattern='...'")
        opts["pattern"] = ec.pattern
    return opts


def split_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt turns, reference): everything before the last assistant turn, and that turn's text."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return list(messages[:last]), messages[last]["content"]


def load_test(cfg: RunConfig, test: str | Path, limit: int | None) -> tuple[list[list[dict]], list[Any]]:
    d = cfg.data
    exs = read_examples(test, d.format, prompt_column=d.prompt_column, response_column=d.response_column,
                        system_prompt=d.system_prompt)
    exs = exs[:limit] if limit else exs
    prompts, refs = [], []
    for ex in exs:
        turns, ref = split_reference(ex.messages)
        ref = ex.label if ex.label is not None else ref
        if ref is None:
            raise LoraforgeError("a test example has no reference answer (no assistant turn, no label)",
                                 where=ex.source, hint="give every test example its expected answer")
        prompts.append(turns)
        refs.append(ref)
    if not prompts:
        raise LoraforgeError("the test file has no examples", where=str(test))
    return prompts, refs


def fewshot_prompts(cfg: RunConfig, prompts: list[list[dict]], k: int) -> list[list[dict]]:
    """The same prompts with a system prompt and k (seeded) training examples as earlier turns."""
    shots: list[dict] = []
    if k and cfg.data.train and Path(cfg.data.train).is_file():
        d = cfg.data
        pool = read_examples(d.train, d.format, prompt_column=d.prompt_column, response_column=d.response_column)
        for ex in random.Random(cfg.seed).sample(pool, min(k, len(pool))):
            turns, ref = split_reference(ex.messages)
            shots += [m for m in turns if m["role"] != "system"] + [{"role": "assistant", "content": ref or ""}]
    system = cfg.eval.fewshot_system or cfg.data.system_prompt
    out = []
    for p in prompts:
        body = [m for m in p if m["role"] != "system"]
        sys_turns = [{"role": "system", "content": system}] if system else [m for m in p if m["role"] == "system"]
        out.append(sys_turns + shots + body)
    return out


def parse_reference(text: str | None, metric: str) -> dict | None:
    """A published result to show beside ours: its text and the value it names (the last percentage, else the
    last decimal number, so a year or "F1" is not taken) on our metric's 0-1 scale (BLEU stays 0-100)."""
    if not text:
        return None
    nums = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(%?)", text)
    pick = [n for n in nums if n[1]] or [n for n in nums if "." in n[0]] or nums   # 93.0% > 0.871 > 27
    value = None
    if pick:
        num, pct = pick[-1]
        value = float(num)
        if metric != "bleu" and (pct or value > 1):
            value /= 100
    return {"text": text, "value": value}


def metric_names() -> list[str]:
    return available_metrics()
