"""GRPO reward for SNIPS slot filling (bench/grpo_snips.py): the answer's slot F1 against the reference slots
(loraforge's `slot_f1` metric, exact text per slot) when the answer is a JSON object valid against the shipped
SNIPS schema, else 0. Validity alone would pay `{}` (valid, no slots) in full."""

from __future__ import annotations

import functools
import json
from pathlib import Path

SCHEMA = Path(__file__).resolve().parent.parent / "src/loraforge/datasets/snips2017/schema.json"


@functools.cache
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def reward(prompt: str, completion: str, **row) -> float:
    from loraforge.eval.metrics import parse_json, score

    value, reason = parse_json(completion)
    if reason is not None or not isinstance(value, dict) or not _validator().is_valid(value):
        return 0.0
    return float(score("slot_f1", [completion], [row["answer"]]).per_example[0])


def exact(prompt: str, completion: str, **row) -> float:
    """1 when the answer is schema-valid JSON with every slot right (reward's slot F1 of 1), else 0: added to
    `reward` (`grpo.rewards: [snips_reward.py, snips_reward.py:exact]`) it pays a whole answer more than any
    partial one, so GRPO's advantage favours exact answers (the pass rate) as well as better partial ones."""
    return float(reward(prompt, completion, **row) == 1.0)
