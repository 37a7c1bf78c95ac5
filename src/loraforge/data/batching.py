"""Seeded validation split, padding-aware batch order, and collation into padded tensors.

Batch order is a pure function of (seed, epoch): examples are shuffled, cut into windows of 64
batches, sorted by length inside each window (so a batch holds similar lengths and padding stays
small) and the batches are shuffled again. A resumed run recomputes the same order and skips the
batches it already did, so no sampler state has to be saved.

Length buckets: where the trainer replays CUDA graphs (one per batch shape), batches are padded up to one
of a few lengths taken from the data (`length_buckets`) and to a full batch of rows, so that their shapes
repeat; padding rows and columns carry no loss.
"""

from __future__ import annotations

import math
import random

from loraforge.data import prefix
from loraforge.data.packing import collate_rows, pad_right
from loraforge.data.templates import IGNORE_INDEX, Tokenized

WINDOW_BATCHES = 64


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, validation); at least one validation item when fraction > 0."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * fraction))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch, grouped by similar length."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * WINDOW_BATCHES
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def length_buckets(lengths: list[int], batch_size: int, seed: int, n_buckets: int = 6,
                   multiple: int = 16) -> list[int]:
    """At most `n_buckets` padded lengths for batches of examples of these lengths: the quantiles of one
    epoch's batch maxima (batch_order groups similar lengths), rounded up to a multiple of `multiple`."""
    maxima = sorted(max(lengths[i] for i in b) for b in batch_order(lengths, batch_size, seed, 0))
    cuts = {maxima[max(0, math.ceil(len(maxima) * k / n_buckets) - 1)] for k in range(1, n_buckets + 1)}
    return sorted({-(-c // multiple) * multiple for c in cuts})


def bucket_length(longest: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `longest` tokens (itself when it is longer than every bucket)."""
    return next((b for b in buckets if b >= longest), longest)


def collate(items: list[Tokenized], pad_id: int, buckets: list[int] | None = None, rows: int | None = None,
            share_prefix: int = 0):
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on padding) as torch tensors;
    packed rows (data.packing) also get position_ids, segment_ids and cu_seqlens (data.packing.collate_rows).
    With `buckets` the length is padded up to a bucket, and with `rows` the batch to that many rows. With
    `share_prefix` (a minimum length) examples that open with the same tokens come as one row holding them once
    (data.prefix), where that pays; buckets and rows then do not apply."""
    packed = hasattr(items[0], "seq_lens")
    row = prefix.share_prefix(items, share_prefix) if share_prefix and not packed else None
    if row is not None:
        return collate_rows([row], pad_id)
    length = bucket_length(max(len(t.input_ids) for t in items), buckets) if buckets else None
    if packed:
        return collate_rows(items, pad_id, length, rows)
    return {"input_ids": pad_right([t.input_ids for t in items], pad_id, length, rows),
            "attention_mask": pad_right([[1] * len(t.input_ids) for t in items], 0, length, rows),
            "labels": pad_right([t.labels for t in items], IGNORE_INDEX, length, rows)}
