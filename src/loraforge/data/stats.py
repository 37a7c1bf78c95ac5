"""What is in a data file, in numbers: `loraforge data inspect`.

    stats = inspect_file("train.jsonl", tokenizer, max_seq_length=2048)

Counts (records, valid/invalid, formats, turns, roles, labels) and token lengths in the base model's
tokenizer after its chat template: a histogram, how many examples max_seq_length would cut (the
trainer leaves them out), the padding that length-grouped batches would waste against packing, and
a suggested max_seq_length. Lengths are measured in batches with the fast tokenizer.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.data.batching import batch_order
from loraforge.data.formats import ReadOptions, categorical, label_of
from loraforge.data.packing import assign_rows
from loraforge.data.templates import template_family, token_lengths
from loraforge.data.validate import Tally, iter_valid

BATCH = 1024
TOP_LABELS = 30
BINS = 24


@dataclass
class DataStats:
    input: Tally
    max_seq_length: int
    batch_size: int
    model_family: str | None = None
    turns: dict[int, int] = field(default_factory=dict)     # turns per conversation -> records
    roles: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)    # most common first, at most TOP_LABELS
    n_labels: int = 0
    template_errors: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)
    truncated: int = 0
    percentiles: dict[str, int] = field(default_factory=dict)
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, count)
    padding_waste: float = 0.0      # share of computed tokens that are padding, length-grouped batches
    packing_waste: float = 0.0      # share of packed rows left empty
    packed_rows: int = 0
    suggested_max_seq_length: int = 0
    suggested_truncated: int = 0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "lengths"}
        d["input"] = self.input.to_dict()
        d["histogram"] = [list(h) for h in self.histogram]
        return d


def histogram(lengths: list[int], bins: int = BINS) -> list[tuple[int, int, int]]:
    """(from, to, count) bins of equal width over [min, max]; `to` is exclusive."""
    if not lengths:
        return []
    low, span = min(lengths), max(lengths) - min(lengths) + 1
    width = max(1, math.ceil(span / bins))
    counts = Counter((n - low) // width for n in lengths)
    return [(low + k * width, low + (k + 1) * width, counts.get(k, 0)) for k in range(math.ceil(span / width))]


def percentile(sorted_lengths: list[int], q: float) -> int:
    if not sorted_lengths:
        return 0
    return sorted_lengths[min(len(sorted_lengths) - 1, math.ceil(q / 100 * len(sorted_lengths)) - 1)]


def suggest_max_seq_length(sorted_lengths: list[int]) -> int:
    """The 99th percentile rounded up to a multiple of 64: cuts at most 1% of the examples."""
    return max(64, math.ceil(percentile(sorted_lengths, 99) / 64) * 64)


def waste(lengths: list[int], max_seq_length: int, batch_size: int, seed: int = 0) -> tuple[float, float, int]:
    """(padding share with length-grouped batches, empty share of packed rows, packed rows) for the
    examples that fit max_seq_length."""
    fit = [n for n in lengths if n <= max_seq_length]
    if not fit:
        return 0.0, 0.0, 0
    real = sum(fit)
    padded = sum(max(fit[i] for i in b) * len(b) for b in batch_order(fit, batch_size, seed, 0))
    rows = len(assign_rows(fit, max_seq_length))
    return 1 - real / padded, 1 - real / (rows * max_seq_length), rows


def inspect_file(path: str | Path, tokenizer, *, max_seq_length: int = 2048, batch_size: int = 8,
                 opts: ReadOptions = ReadOptions()) -> DataStats:
    """Count and measure every valid record of `path`; see the module docstring."""
    tally = Tally(str(path))
    stats = DataStats(tally, max_seq_length, batch_size, model_family=template_family(tokenizer))
    turns, roles, labels = Counter(), Counter(), Counter()
    lengths = array("i")
    pending = []

    def measure() -> None:
        for n in token_lengths(tokenizer, pending):
            if n is None:
                stats.template_errors += 1
            else:
                lengths.append(n)
        pending.clear()

    for ex in iter_valid(path, opts, tally, None):
        turns[len(ex.messages)] += 1
        roles.update(t["role"] for t in ex.messages)
        labels[label_of(ex)] += 1
        pending.append(ex)
        if len(pending) >= BATCH:
            measure()
    tally.require_valid()
    measure()
    stats.turns, stats.roles = dict(sorted(turns.items())), dict(roles.most_common())
    if categorical(len(labels), tally.valid, tally.labelled > 0):
        stats.n_labels, stats.labels = len(labels), dict(labels.most_common(TOP_LABELS))
    ordered = sorted(lengths)
    stats.lengths = list(lengths)
    stats.truncated = sum(1 for n in ordered if n > max_seq_length)
    stats.percentiles = {f"p{q}": percentile(ordered, q) for q in (50, 90, 95, 99)}
    stats.percentiles["max"] = ordered[-1] if ordered else 0
    stats.histogram = histogram(ordered)
    stats.padding_waste, stats.packing_waste, stats.packed_rows = waste(stats.lengths, max_seq_length, batch_size)
    stats.suggested_max_seq_length = suggest_max_seq_length(ordered)
    stats.suggested_truncated = sum(1 for n in ordered if n > stats.suggested_max_seq_length)
    return stats

