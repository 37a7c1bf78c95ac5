"""One row for a batch whose examples start with the same tokens: the shared prefix computed once.

Chat data often opens every example with the same tokens (the template's system turn, a fixed instruction, the
user turn's header); in the CPU quickstart that is 24 of an example's 51 tokens. A batch of B such examples
then computes those tokens B times, and each time identically: a prefix token attends only to earlier prefix
tokens, and a prefix carries no loss. `share_prefix` lays the batch out as one row instead,

    [prefix][rest of example 1][rest of example 2]...[rest of example B]

with each rest keeping its own positions (they go on from the prefix's length) and attending to the prefix
and to itself (segment id SHARED for the prefix: data.packing.segment_attention). Every loss token is then
predicted from the same tokens at the same positions as in the padded batch, so the loss and the gradients are
the same (up to rounding, and the LoRA dropout masks, which fall differently); the forward and backward skip
(B - 1) x prefix tokens and all the padding. The first token of each rest must carry no loss (in the row it
follows the previous example), so the prefix stops one token before the first loss token of any example.
"""

from __future__ import annotations

from loraforge.data.packing import PackedRow
from loraforge.data.templates import IGNORE_INDEX, Tokenized

# Chosen bounds, not tuned (only the quickstart's case, 24 shared tokens of ~51 at batch 8, was measured: step
# 0.68x). The row's attention is one T x T mask instead of B smaller ones, so a small saving could be eaten by
# it, and a long row's mask costs T^2 memory.
MIN_TOKENS = 8      # the shortest prefix worth a row of its own (data.share_prefix)
MIN_SAVING = 0.15   # the least share of the padded batch's tokens the row must save
MAX_ROW = 4096      # the longest row


def shared_length(seqs: list[list[int]]) -> int:
    """How many leading tokens all sequences share, leaving each at least one token of its own (also what
    model.decode prefills once for a batch of prompts)."""
    first, n = seqs[0], min(len(x) for x in seqs) - 1
    for x in seqs[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def common_prefix(items: list[Tokenized]) -> int:
    """How many leading tokens all items share and can share in one row: no loss token among them nor on
    the token after them, and at least one token of every item left after them."""
    n = shared_length([t.input_ids for t in items])
    for t in items:
        labels = t.labels
        k = 0
        while k <= n and k < len(labels) and labels[k] == IGNORE_INDEX:
            k += 1
        n = min(n, k - 1)   # labels[0..n] all ignored
    return max(n, 0)


def share_prefix(items: list[Tokenized], min_tokens: int = MIN_TOKENS) -> PackedRow | None:
    """The batch as one row with its common prefix once (see the module docstring), or None where that does
    not pay: fewer than two items, a prefix under `min_tokens`, a saving under MIN_SAVING of the padded
    batch's tokens, or a row longer than MAX_ROW."""
    if len(items) < 2:
        return None
    p = common_prefix(items)
    lengths = [len(t.input_ids) for t in items]
    row_len = sum(lengths) - (len(items) - 1) * p
    if p < min_tokens or row_len > MAX_ROW or row_len > (1 - MIN_SAVING) * len(items) * max(lengths):
        return None
    row = PackedRow(list(items[0].input_ids[:p]), [IGNORE_INDEX] * p, list(range(p)), [p], [], shared_prefix=p)
    for t in items:
        row.input_ids += t.input_ids[p:]
        row.labels += t.labels[p:]
        row.position_ids += range(p, len(t.input_ids))
        row.seq_lens.append(len(t.input_ids) - p)
        row.sources.append(t.source)
    return row
