"""Pack tokenized examples into rows of max_seq_length without attention between examples.

    rows = pack(items, max_seq_length=2048)          # list[PackedRow]
    batch = collate_packed(rows, pad_id)             # input_ids, labels, position_ids, 4D attention_mask

Examples are placed by best-fit decreasing (longest first, each into the fullest row it still fits),
which is deterministic and fills rows well. In a row, position ids restart at 0 for every example
and `collate_packed` builds a block-diagonal causal mask, so each example sees only itself: its
logits, and so its loss, are those it would have alone. The first token of each example carries no
label, because in a packed row it would otherwise be predicted from the previous example's last token.
`pad_right` (right-padding into a tensor) lives here and data.batching imports it, so the two modules
do not import each other.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from loraforge.data.templates import IGNORE_INDEX, Tokenized

SHARED = -1   # the segment id of a row's shared prefix (data.prefix): every later token of the row attends to it


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]   # length of each example, in order; boundaries are their running sums
    sources: list[str]
    shared_prefix: int = 0   # data.prefix: the first segment is a prefix every later token of the row sees

    @property
    def boundaries(self) -> list[int]:
        """Start offset of each example in the row."""
        out, pos = [], 0
        for n in self.seq_lens:
            out.append(pos)
            pos += n
        return out


def assign_rows(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """Indices per row, best-fit decreasing. Every length must be <= max_seq_length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_seq_length:
            raise ValueError(f"an example of {n} tokens does not fit max_seq_length={max_seq_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = max_seq_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack(items: list[Tokenized], max_seq_length: int) -> list[PackedRow]:
    """Tokenized examples in rows of at most max_seq_length tokens; see the module docstring."""
    packed = []
    for members in assign_rows([len(t.input_ids) for t in items], max_seq_length):
        row = PackedRow([], [], [], [], [])
        for i in members:
            t = items[i]
            row.input_ids += t.input_ids
            row.labels += [IGNORE_INDEX] + t.labels[1:]
            row.position_ids += range(len(t.input_ids))
            row.seq_lens.append(len(t.input_ids))
            row.sources.append(t.source)
        packed.append(row)
    return packed


def block_causal_mask(seq_lens: list[list[int]], width: int, dtype=None):
    """(batch, 1, width, width) additive mask: 0 where a token may attend (earlier tokens of its own
    example), the dtype's minimum elsewhere. Padding tokens attend only to themselves."""
    import torch

    dtype = dtype or torch.float32
    seg = torch.full((len(seq_lens), width), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        pos = 0
        for k, n in enumerate(lens):
            seg[r, pos:pos + n] = k
            pos += n
        seg[r, pos:] = torch.arange(len(lens), len(lens) + width - pos)  # each pad its own segment
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def pad_right(seqs: list[list[int]], fill: int, length: int | None = None, rows: int | None = None):
    """A (rows, length) long tensor (default: len(seqs), the longest): each sequence left-aligned, the
    rest `fill`."""
    import torch

    out = torch.full((max(rows or 0, len(seqs)), max(length or 0, max(len(x) for x in seqs))), fill,
                     dtype=torch.long)
    for row, x in enumerate(seqs):
        out[row, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out


def collate_packed(rows: list[PackedRow], pad_id: int, dtype=None):
    """Right-padded input_ids, labels (IGNORE_INDEX on padding), position_ids and the block-diagonal
    4D attention_mask, as torch tensors, for a model call `model(**batch)`."""
    ids = pad_right([r.input_ids for r in rows], pad_id)
    return {"input_ids": ids, "labels": pad_right([r.labels for r in rows], IGNORE_INDEX),
            "position_ids": pad_right([r.position_ids for r in rows], 0),
            "attention_mask": block_causal_mask([r.seq_lens for r in rows], ids.shape[1], dtype)}


def collate_rows(rows: list[PackedRow], pad_id: int, length: int | None = None, n_rows: int | None = None):
    """A training batch of packed rows: input_ids, labels, position_ids, a 2D attention_mask of real tokens
    (for counting), segment_ids (which example of its row each token belongs to; every pad its own segment),
    from which the model side builds the attention it needs (`segment_attention`), and cu_seqlens (see
    `cu_seqlens`). With `length` the rows are padded to that many tokens and with `n_rows` the batch to that
    many rows (rows of padding only), so that batch shapes repeat (data.batching's length buckets). Rows with a
    shared prefix (data.prefix) get `shared_prefix: True` instead of cu_seqlens."""
    import torch

    ids = pad_right([r.input_ids for r in rows], pad_id, length, n_rows)
    seg = torch.full(ids.shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k, n in enumerate(row.seq_lens):
            seg[r, pos:pos + n] = k
            pos += n
        seg[r, pos:] = torch.arange(len(row.seq_lens), len(row.seq_lens) + ids.shape[1] - pos)
        seg[r, :row.shared_prefix] = SHARED
    seg[len(rows):] = torch.arange(ids.shape[1])
    shape = {"length": ids.shape[1], "rows": ids.shape[0]}
    batch = {"input_ids": ids, "labels": pad_right([r.labels for r in rows], IGNORE_INDEX, **shape),
             "position_ids": pad_right([r.position_ids for r in rows], 0, **shape),
             "attention_mask": pad_right([[1] * len(r.input_ids) for r in rows], 0, **shape), "segment_ids": seg}
    if any(r.shared_prefix for r in rows):   # varlen offsets cannot say "seen by every later segment"
        return batch | {"shared_prefix": True}
    return batch | {"cu_seqlens": cu_seqlens([r.seq_lens for r in rows], *ids.shape)}


def segment_slots(n: int) -> int:
    """The number of segments cu_seqlens is padded to for `n` real ones: a power of two (at least 8), so that
    batches of packed rows come in a few shapes that CUDA graphs can replay (model.fast.graphs)."""
    return max(8, 1 << (n - 1).bit_length())


def cu_seqlens(seq_lens: list[list[int]], n_rows: int, width: int):
    """int32 offsets of the segments of a (n_rows, width) batch of packed rows, flattened: each row's examples,
    then its padding as one segment; padded with the total (empty segments) to `segment_slots` segments. What
    varlen flash attention takes, computed on the host so that the device never has to say where examples
    start (ops.packed_attention). Padding attends to padding only, whose outputs carry no loss."""
    import torch

    ends, pos = [], 0
    for r in range(n_rows):
        lens = seq_lens[r] if r < len(seq_lens) else []
        for n in lens:
            pos += n
            ends.append(pos)
        pos = (r + 1) * width
        if not ends or ends[-1] != pos:
            ends.append(pos)
    slots = segment_slots(len(ends))
    return torch.tensor([0] + ends + [pos] * (slots - len(ends)), dtype=torch.int32)


def segment_attention(segment_ids):
    """(batch, 1, T, T) boolean mask, True where a token may attend: earlier tokens of its own example, and
    of a shared prefix (segment id SHARED, data.prefix)."""
    import torch

    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    seen = (segment_ids[:, :, None] == segment_ids[:, None, :]) | (segment_ids[:, None, :] == SHARED)
    return (seen & causal)[:, None]
