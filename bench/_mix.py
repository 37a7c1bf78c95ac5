"""The realistic length mix for bench/train_speed.py's `*-mix` shapes: seeded example lengths, packed into
rows by loraforge's own packer (loraforge.data.packing), so that every tool trains on the same rows.

Example lengths: lognormal with median 250 tokens and sigma 0.6 (log space), rounded and clipped to
[32, 1024] -- Alpaca-like, about 85% of examples between 100 and 600 tokens (p10 ~ 115, p90 ~ 540, mean
~ 300). Token ids are uniform below 32000. Every token of an example is a label, except its first, which in
a packed row would be predicted from the previous example's last token (the packer sets it to -100).

    rows, lengths = mix_rows(n_rows=11, pack_len=4096)    # loraforge PackedRows, the sampled lengths
    batches = mix_batches(rows)                           # one dict of tensors per row (batch of 1)

Lengths are drawn until they add up to n_rows x pack_len; the longest prefix of that draw that the packer
(best-fit decreasing) fits into n_rows rows is kept, so the examples trained on are an unbiased seeded
sample of the mix (keeping whole rows of a larger draw would favour the long examples that open rows).
"""

from __future__ import annotations

import math
import random

MEDIAN, SIGMA, MIN_LEN, MAX_LEN, VOCAB, SEED = 250, 0.6, 32, 1024, 32000, 1234


def sample_lengths(total: int, seed: int = SEED) -> list[int]:
    """Example lengths drawn from the mix until they add up to at least `total` tokens."""
    rng = random.Random(seed)
    out: list[int] = []
    while total > 0:
        out.append(min(MAX_LEN, max(MIN_LEN, round(rng.lognormvariate(math.log(MEDIAN), SIGMA)))))
        total -= out[-1]
    return out


def mix_rows(n_rows: int, pack_len: int = 4096, seed: int = SEED, vocab: int = VOCAB):
    """(n_rows packed rows, the lengths they hold in draw order); the same seed gives the same rows."""
    from loraforge.data.packing import assign_rows, pack
    from loraforge.data.templates import Tokenized

    if pack_len < MAX_LEN:
        raise ValueError(f"--pack-len must be at least {MAX_LEN}, the longest example of the mix")
    lengths = sample_lengths(n_rows * pack_len, seed)
    while len(assign_rows(lengths, pack_len)) > n_rows:
        lengths.pop()
    rng = random.Random(seed + 1)
    items = []
    for k, n in enumerate(lengths):
        ids = rng.choices(range(vocab), k=n)
        items.append(Tokenized(input_ids=ids, labels=list(ids), source=str(k)))
    rows = pack(items, pack_len)
    if len(rows) != n_rows:  # one example fewer changed best-fit's row count by two: not seen, but say so
        raise ValueError(f"the mix packed into {len(rows)} rows, {n_rows} wanted; try another seed")
    return rows, lengths


def mix_batches(rows) -> list[dict]:
    """One batch per row (CPU tensors): input_ids, labels, position_ids, attention_mask (real tokens) and
    segment_ids from loraforge's collate_rows, plus seq_lens (int32 example lengths, Unsloth's
    packed_seq_lengths)."""
    import torch

    from loraforge.data.packing import collate_rows

    out = []
    for row in rows:
        b = collate_rows([row], pad_id=0)
        b["seq_lens"] = torch.tensor(row.seq_lens, dtype=torch.int32)
        out.append(b)
    return out


def length_stats(lengths: list[int]) -> dict:
    """mean, p10, p50, p90 of example lengths (nearest-rank percentiles)."""
    s = sorted(lengths)

    def pct(q):
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
    return {"mean": round(sum(s) / len(s), 1), "p10": pct(0.1), "p50": pct(0.5), "p90": pct(0.9)}
