"""`train.replay`: general chat mixed into the training set, so a narrow fine-tune forgets less.

The replay examples are the base model's OWN greedy answers to general instructions shipped with
loraforge (datasets/general_instructions.jsonl: written for loraforge, Apache-2.0 like the code, and
distinct from the regression prompts of loraforge.eval.regression, so the forgetting measurement is not
trained on). Training on them pulls the adapter towards what the base already does on general prompts
(self-distillation: no outside model or data). They are generated once, before training, from the base
without the adapter, and cached in the run folder (replay.jsonl; a resumed run reads them back).

With share s of the training set and n task examples, round(s n / (1 - s)) replay examples are added:
seeded picks from the instruction set, cycled when more are needed than the set holds. Answers that did
not stop by themselves (cut by the token limit: REPLAY_TOKENS, at most half of data.max_seq_length) or are
empty are left out. No system prompt is added:
the task's system prompt belongs to the task.
"""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path

from loraforge.data.formats import Example
from loraforge.errors import LoraforgeError
from loraforge.files import write_jsonl

REPLAY_TOKENS = 192
CACHE = "replay.jsonl"


def load_instructions() -> list[dict]:
    """The shipped general instructions: [{"id", "prompt"}, ...]."""
    text = files("loraforge").joinpath("datasets", "general_instructions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def replay_count(n_task: int, share: float) -> int:
    """Replay examples that make `share` of a training set with n_task task examples."""
    return round(share * n_task / (1 - share)) if share > 0 else 0


def pick_instructions(n: int, seed: int) -> list[dict]:
    """Which distinct instructions are answered: a seeded sample of min(n, set size)."""
    pool = load_instructions()
    return random.Random(seed).sample(pool, min(n, len(pool)))


def _cached(path: Path, key: dict) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows if all(r.get(k) == v for k, v in key.items())}


def base_answers(instructions: list[dict], model, tokenizer, generate, cache: Path, base_name: str,
                 max_seq_length: int, log=print) -> list[dict]:
    """{"id", "prompt", "answer", "stopped"} per instruction: read from the cache, else generated (greedy,
    at most REPLAY_TOKENS and half of max_seq_length, so that prompt and answer fit a training row)."""
    key = {"base_model": base_name, "max_new_tokens": min(REPLAY_TOKENS, max_seq_length // 2)}
    have = _cached(cache, key)
    todo = [ins for ins in instructions if ins["id"] not in have]
    if todo:
        log(f"replay: the base model answers {len(todo)} general instructions (cached in {cache})")
        gens = generate(model, tokenizer, [[{"role": "user", "content": i["prompt"]}] for i in todo], key["max_new_tokens"])
        for ins, g in zip(todo, gens):
            have[ins["id"]] = {"id": ins["id"], "prompt": ins["prompt"], "answer": g.text, "stopped": g.stopped, **key}
        write_jsonl(cache, have.values())
    return [have[i["id"]] for i in instructions]


def replay_examples(n_task: int, share: float, seed: int, answer) -> list[Example]:
    """The replay examples for a training set of n_task task examples; `answer(instructions)` gives
    base_answers' rows for the picked instructions."""
    n = replay_count(n_task, share)
    if n == 0:
        return []
    rows = [r for r in answer(pick_instructions(n, seed)) if r["stopped"] and r["answer"].strip()]
    if not rows:
        raise LoraforgeError("train.replay: the base model gave no usable answer to the general instructions",
                             hint="set train.replay=0 (the base model does not answer general chat)")
    return [Example([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
                    source=f"replay:{r['id']}") for r in (rows[i % len(rows)] for i in range(n))]
