"""Packing: rows of at most max_seq_length, position ids restarting per example, and on the tiny model
a block-diagonal 4D mask gives every example exactly the loss it has alone."""

import pytest
from conftest import chat_rows

from loraforge.data.formats import Example
from loraforge.data.packing import block_causal_mask, collate_packed, pack
from loraforge.data.templates import IGNORE_INDEX, Tokenized, tokenize_example


def _items(lengths):
    return [Tokenized(list(range(100 * k, 100 * k + n)), list(range(100 * k, 100 * k + n)), f"f:{k}")
            for k, n in enumerate(lengths)]


def test_rows_fit_and_keep_every_token_once():
    items = _items([5, 9, 3, 7, 2, 10, 1])
    rows = pack(items, 12)
    assert all(len(r.input_ids) <= 12 for r in rows) and len(rows) == 4  # 37 tokens: 4 rows of 12 at best
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for it in items for t in it.input_ids)
    for r in rows:
        assert r.position_ids == [p for n in r.seq_lens for p in range(n)]
        for start in r.boundaries:
            assert r.labels[start] == IGNORE_INDEX  # never predicted from the previous example
    assert pack(items, 12) == rows
    with pytest.raises(ValueError, match="does not fit"):
        pack(_items([13]), 12)


def test_block_causal_mask():
    m = block_causal_mask([[2, 1]], 4)[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_losses_equal_unpacked_on_the_tiny_model(tiny_model, attn):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    rows = chat_rows(7)
    rows[2]["messages"] = [{"role": "system", "content": "Answer with one word only please."}, *rows[2]["messages"]]
    items = [tokenize_example(tok, Example(r["messages"], f"f:{i}"), "all" if i == 3 else "assistant")
             for i, r in enumerate(rows)]

    def losses(logits, labels):
        lp = torch.log_softmax(logits[:-1].float(), -1)
        target = labels[1:]
        keep = target != IGNORE_INDEX
        return -lp[keep].gather(1, target[keep][:, None]).sum()

    alone = {}
    with torch.no_grad():
        for t in items:
            out = model(input_ids=torch.tensor([t.input_ids]))
            alone[t.source] = losses(out.logits[0], torch.tensor(t.labels))
        packed = pack(items, 96)
        assert len(packed) < len(items)
        batch = collate_packed(packed, tok.pad_token_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits
    for r, row in enumerate(packed):
        for start, n, src in zip(row.boundaries, row.seq_lens, row.sources):
            got = losses(logits[r, start:start + n], labels[r, start:start + n])
            torch.testing.assert_close(got, alone[src], rtol=1e-4, atol=1e-4)


def test_rows_padded_to_a_bucket_carry_the_segment_offsets():
    """collate of packed rows with a length bucket and a row count: every tensor of that shape, padding rows
    without loss, and cu_seqlens = each example's end in the flattened batch, one segment for each row's
    padding, then empty segments up to a power of two."""
    from loraforge.data.batching import collate
    from loraforge.data.packing import cu_seqlens, segment_slots

    rows = pack(_items([5, 9, 3, 7, 2]), 12)   # 26 tokens: rows [9, 3], [7, 5], [2]
    batch = collate(rows, 0, buckets=[8, 16], rows=4)
    assert all(v.shape == (4, 16) for k, v in batch.items() if k != "cu_seqlens")
    assert (batch["labels"][3] == IGNORE_INDEX).all() and int(batch["attention_mask"].sum()) == 26
    assert [r.seq_lens for r in rows] == [[9, 3], [7, 5], [2]]
    # row 0: 9, 12, its padding to 16; row 1: 23, 28, padding to 32; row 2: 34, padding to 48; row 3: padding
    ends = [9, 12, 16, 23, 28, 32, 34, 48, 64]
    assert batch["cu_seqlens"].tolist() == [0] + ends + [64] * (16 - 9)
    assert [segment_slots(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    full = cu_seqlens([[4, 4], [8]], 2, 8)   # rows filled exactly: no padding segment
    assert full.tolist() == [0, 4, 8, 16] + [16] * 5 and full.dtype.is_floating_point is False
