"""Does a setup fit a card, how far can batch and sequence grow, and which cheapest changes make it fit.

Suggestions are the smallest sets of changes (fewest, least harmful first) under which the estimate fits:
each change has a penalty for what it costs in speed or quality, every combination is tried (there are few
and each estimate is arithmetic), and a set is dropped when a cheaper fitting set is contained in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import combinations
from typing import NamedTuple

from loraforge.plan.memory import TrainSetup, estimate, mlp_chunked_beyond
from loraforge.plan.shapes import ModelShape

MAX_BATCH = 4096
MAX_SEQ = 1_048_576
MIN_USEFUL_SEQ = 256  # shorter sequences than this are not offered as a fix
SHORTER_SEQ_PENALTY = 4  # truncating examples changes what is learned: the last resort
SEQ_GAIN = 1.25  # an extra change on top of a shortened sequence must buy at least 25% more length


def fits(shape: ModelShape, setup: TrainSetup, memory_gib: float) -> bool:
    return estimate(shape, setup).total <= memory_gib


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """Largest n in [1, hi] with ok(n), for ok monotone (true then false); 0 if ok(1) is false."""
    if not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _largest_across(ok: Callable[[int], bool], hi: int, edge: int | None) -> int:
    """_largest for an ok that is monotone on [1, edge] and on (edge, hi] but may turn true again past edge
    (the chunked MLP of long batches needs less memory than the unchunked one just below)."""
    if edge is None or edge >= hi or not ok(edge + 1):
        return _largest(ok, hi if edge is None else min(edge, hi))
    return edge + _largest(lambda n: ok(edge + n), hi - edge)


def max_batch(shape: ModelShape, setup: TrainSetup, memory_gib: float) -> int:
    beyond = mlp_chunked_beyond(setup)
    return _largest_across(lambda b: fits(shape, replace(setup, batch=b), memory_gib), MAX_BATCH,
                           None if beyond is None else beyond // setup.seq)


def max_seq(shape: ModelShape, setup: TrainSetup, memory_gib: float) -> int:
    beyond = mlp_chunked_beyond(setup)
    return _largest_across(lambda s: fits(shape, replace(setup, seq=s), memory_gib), MAX_SEQ,
                           None if beyond is None else beyond // setup.batch)


@dataclass(frozen=True)
class Suggestion:
    """A set of changes that makes the run fit, with the memory it then needs."""

    changes: tuple[str, ...]
    setup: TrainSetup
    total_gib: float
    penalty: int


class Change(NamedTuple):
    """One way to save memory; `apply` returns None where it does not apply to a setup."""

    label: str
    penalty: int  # 1 = slower only, 2 = much slower, 3 = may cost a little quality, (4 = truncates examples)
    apply: Callable[[TrainSetup], TrainSetup | None]


def _changes(setup: TrainSetup) -> list[Change]:
    smaller_rank = max(setup.rank // 4, 4)
    return [
        Change("gradient checkpointing on", 1,
               lambda s: None if s.gradient_checkpointing else replace(s, gradient_checkpointing=True)),
        Change(f"batch 1 x grad-accum {setup.batch * setup.grad_accum} (same effective batch)", 1,
               lambda s: None if s.batch == 1 else replace(s, batch=1, grad_accum=s.batch * s.grad_accum)),
        Change(f"FSDP (shard weights and states over the {setup.gpus} GPUs)", 1,
               lambda s: replace(s, strategy="fsdp") if s.gpus > 1 and s.strategy == "ddp" else None),
        Change("8-bit AdamW", 1, lambda s: replace(s, optimizer="adamw_8bit") if s.optimizer_name == "adamw" else None),
        Change("offload optimizer states to CPU", 2, lambda s: None if s.offload else replace(s, offload=True)),
        Change("LoRA instead of full fine-tuning", 3, lambda s: replace(s, method="lora") if not s.is_lora else None),
        Change("QLoRA (4-bit base) instead of LoRA", 3,
               lambda s: replace(s, method="qlora") if s.method == "lora" else None),
        Change(f"rank {smaller_rank}", 3,
               lambda s: replace(s, rank=smaller_rank) if s.is_lora and s.rank > smaller_rank else None),
    ]


def _apply(setup: TrainSetup, combo: tuple[Change, ...]) -> TrainSetup | None:
    result: TrainSetup | None = setup
    for change in combo:
        result = change.apply(result) if result else None
    return result


def suggest(shape: ModelShape, setup: TrainSetup, memory_gib: float, limit: int = 5) -> list[Suggestion]:
    """Up to `limit` minimal change sets that fit `memory_gib`, cheapest first; [] if it already fits."""
    if fits(shape, setup, memory_gib):
        return []
    found: list[Suggestion] = []
    shortened: list[tuple[set[str], int]] = []  # (changes, seq) of the shortened-sequence suggestions
    changes = _changes(setup)
    for size in range(len(changes) + 1):
        for combo in combinations(changes, size):
            labels = tuple(c.label for c in combo)
            if any(set(s.changes) <= set(labels) for s in found):
                continue  # a subset already fits: this set is not minimal
            candidate = _apply(setup, combo)
            if candidate is None:
                continue
            penalty = sum(c.penalty for c in combo)
            if fits(shape, candidate, memory_gib):
                found.append(Suggestion(labels, candidate, estimate(shape, candidate).total, penalty))
                continue
            seq = max_seq(shape, candidate, memory_gib)
            if seq < MIN_USEFUL_SEQ or any(set(labels) > base and seq < SEQ_GAIN * s for base, s in shortened):
                continue
            shortened.append((set(labels), seq))
            shorter = replace(candidate, seq=seq)
            found.append(Suggestion((*labels, f"seq {seq} (from {setup.seq})"), shorter,
                                    estimate(shape, shorter).total, penalty + SHORTER_SEQ_PENALTY))
    found.sort(key=lambda s: (s.penalty, len(s.changes), s.total_gib))
    return found[:limit]
