"""How a validation pass is cut into forwards (train.loop.evaluate_loss; train.shapes prices the same forwards).

Validation runs without grad and eagerly (no CUDA graphs), so each forward pays the host's launches of every layer
once: the fewer forwards, the less of that. The examples go shortest first, as many a forward as a token budget
allows: the tokens of the largest training batch (batch_size rows of the longest training example, at most
max_seq_length) times a multiplier the model's shape gives, validation_scale: how many times a training batch's
tokens a forward without grad may take in the memory training's activations held (model.fast.memory, the fast
path's own allocations; 1 elsewhere, where loraforge does not know them). The loss is the same whatever the
grouping (a token-weighted mean over the same items, up to float summation order).

Why the multiplier: with the budget of one training batch (which had taken the SNIPS run's 500 validation chats from
32 forwards to 15, bench/results/train_e2e/s16), validation was still 9.71 of the 135M SNIPS run's 31.48 s of
training on an H100 (bench/results/train_e2e/s22/h100_call1_135m_snips_1ep.json): 10 passes of 15 forwards, ~65 ms
a forward, eager, its 30 layers launched from Python. For SmolLM2-135M with its stack recomputed in backward (that
run's CUDA graphs) the multiplier is 3.97: 5 forwards instead of 15 (bench/validation_speed.py times both).
"""

from __future__ import annotations

from loraforge.config import RunConfig
from loraforge.data.packing import pack
from loraforge.data.templates import IGNORE_INDEX
from loraforge.model.fast.memory import validation_scale as fast_scale


def validation_groups(items: list, batch_size: int, pack_to: int | None = None,
                      max_tokens: int | None = None) -> tuple[list[list], dict]:
    """The validation forwards: the examples shortest first, `batch_size` a forward, or more while the forward
    holds at most `max_tokens` padded tokens (validation_layout's budget); or, with `pack_to` (packed runs), packed
    as the training rows are (data.packing: each example keeps its own loss), `batch_size` rows a forward, all
    padded to rows of `pack_to` tokens (one shape, instead of one padded shape per batch). Also the collate
    arguments that pad them so (data.batching.collate's `buckets` and `rows`)."""
    if not pack_to:
        groups: list[list] = []
        for t in sorted(items, key=lambda t: len(t.input_ids)):   # each new item is the group's longest
            g = groups[-1] if groups else None
            if g is None or len(g) >= batch_size and (len(g) + 1) * len(t.input_ids) > (max_tokens or 0):
                groups.append([t])
            else:
                g.append(t)
        return groups, {}
    rows = pack(items, pack_to)
    groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return groups, {"buckets": [pack_to], "rows": batch_size}


def validation_layout(cfg: RunConfig, train_items: list, scale: float = 1.0) -> dict:
    """validation_groups' arguments for a run: the packed row length (packed runs), and the size of one forward:
    the largest training batch (batch_size rows of the longest training example, at most max_seq_length) times
    `scale` (validation_scale: 1 keeps every forward within a training batch's tokens), as a token budget
    (`max_tokens`; never fewer than batch_size rows a forward) or, packed, as batch_size x `scale` rows of
    max_seq_length. Each example stays one row of at most max_seq_length tokens."""
    longest = max((len(t.input_ids) for t in train_items), default=cfg.data.max_seq_length)
    rows = cfg.train.batch_size
    packed = cfg.data.packing
    return {"batch_size": max(rows, int(rows * scale)) if packed else rows,
            "pack_to": cfg.data.max_seq_length if packed else None,
            "max_tokens": int(scale * rows * min(cfg.data.max_seq_length, longest))}


def loss_fraction(items: list) -> float:
    """The largest share of an example's tokens that carry loss (labels other than IGNORE_INDEX after the first
    position, as loss_sum counts them): no forward of these items has more loss rows than this share of its
    padded tokens."""
    return max((sum(1 for x in t.labels[1:] if x != IGNORE_INDEX) / max(len(t.input_ids), 1) for t in items),
               default=1.0)


def validation_scale(fast, cfg: RunConfig, train_items: list, val_items: list) -> float:
    """validation_layout's `scale` for a run: model.fast.memory's multiplier for its FastLlama `fast` (from the
    model's shape, its checkpointing and the validation examples' share of loss tokens), 1 without one (the PEFT
    forward: its allocations are transformers')."""
    if fast is None or not val_items:
        return 1.0
    return fast_scale(fast, loss_fraction(val_items), validation_layout(cfg, train_items)["max_tokens"])
