"""Random examples rendered exactly as the model will see them, loss-carrying text marked.

    for s in sample_file("train.jsonl", tokenizer, n=5, seed=0):
        print(s.source, s.segments)     # [(text, carries_loss), ...] covering the whole rendering

The sample is drawn in one pass (reservoir sampling), so it works on files of any size, and the
same seed gives the same sample. Segments follow token boundaries of the real tokenization.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.formats import Example, ReadOptions
from loraforge.data.templates import loss_segments, tokenize_example
from loraforge.data.validate import Tally, iter_valid
from loraforge.errors import LoraforgeError


@dataclass
class Sampled:
    source: str
    segments: list[tuple[str, bool]]
    tokens: int
    loss_tokens: int


def reservoir(items, n: int, seed: int) -> list:
    """n items drawn uniformly from an iterable of unknown length, in their original order."""
    rng = random.Random(seed)
    chosen: list[tuple[int, object]] = []
    for i, item in enumerate(items):
        if i < n:
            chosen.append((i, item))
        else:
            k = rng.randint(0, i)
            if k < n:
                chosen[k] = (i, item)
    return [item for _, item in sorted(chosen, key=lambda c: c[0])]


def render_example(tokenizer, example: Example, train_on: str = "assistant") -> Sampled:
    t = tokenize_example(tokenizer, example, train_on)
    return Sampled(example.source, loss_segments(tokenizer, example, train_on), len(t.input_ids), t.n_loss_tokens)


def sample_file(path: str | Path, tokenizer, *, n: int = 5, seed: int = 0, train_on: str = "assistant",
                opts: ReadOptions = ReadOptions()) -> tuple[Tally, list[Sampled]]:
    """(counts of the file, n rendered examples drawn at random from its valid records)."""
    if n < 1:
        raise LoraforgeError(f"-n must be at least 1, got {n}")
    if train_on not in ("assistant", "all"):
        raise LoraforgeError(f"train_on must be assistant or all, got {train_on!r}")
    tally = Tally(str(path))
    picked = reservoir(iter_valid(path, opts, tally, None), n, seed)
    tally.require_valid()
    return tally, [render_example(tokenizer, ex, train_on) for ex in picked]
