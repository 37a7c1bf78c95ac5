"""data.prefix in the trainer: a batch whose examples share their opening tokens runs as one row holding them
once, with the same loss and gradients as the padded batch (plain forward, loss-positions forward, fast path),
and a run with data.share_prefix follows the run without it step by step."""

import json

import pytest
import torch
from conftest import chat_rows, tiny_config, write_jsonl

from loraforge.config import LoraSection, build_config
from loraforge.data.batching import collate
from loraforge.data.formats import Example
from loraforge.data.prefix import common_prefix, share_prefix
from loraforge.data.templates import IGNORE_INDEX, Tokenized, tokenize_example
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast import FastLlama
from loraforge.model.load import load_base
from loraforge.train.loop import loss_sum, split_model

SYSTEM = {"role": "system", "content": "Reply with the colour of the thing named, in one short sentence."}


def _t(ids, first_label, name="x"):
    return Tokenized(list(ids), [IGNORE_INDEX] * first_label + list(ids[first_label:]), name)


def test_prefix_stops_before_the_first_loss_token_and_leaves_every_example_a_rest():
    a = _t(range(20), 12)
    b = _t(list(range(15)) + [99, 98, 97, 96, 95], 16)
    assert common_prefix([a, b]) == 11   # 15 tokens shared, but a's loss starts at token 12: its rest opens at 11
    c = _t(list(range(14)) + [50, 51], 15)
    assert common_prefix([a, b, c]) == 11
    assert common_prefix([a, _t(range(10), 9)]) == 8   # min(9 shared tokens - 1 left over, first label 9 - 1)
    assert common_prefix([a, _t([7] + list(range(1, 20)), 12)]) == 0


def test_shared_row_layout():
    items = [_t(list(range(16)) + [200 + i] + [100 + i] * (3 + i), 17, f"s{i}") for i in range(4)]
    row = share_prefix(items, min_tokens=8)
    assert row.shared_prefix == 16 and row.seq_lens == [16, 4, 5, 6, 7]
    rests = [[200 + i] + [100 + i] * (3 + i) for i in range(4)]
    assert row.input_ids == list(range(16)) + sum(rests, [])
    assert row.position_ids == list(range(16)) + sum((list(range(16, 20 + i)) for i in range(4)), [])
    assert row.labels == [IGNORE_INDEX] * 16 + sum(([IGNORE_INDEX] + r[1:] for r in rests), [])
    batch = collate(items, 0, share_prefix=8)
    assert batch["shared_prefix"] is True and "cu_seqlens" not in batch
    assert batch["input_ids"].shape == (1, 38)
    seg = batch["segment_ids"][0].tolist()
    assert seg[:16] == [-1] * 16 and seg[16:20] == [1] * 4 and seg[-7:] == [4] * 7
    # not worth a row: a short prefix, one example, or too little saved against the padded batch
    assert share_prefix(items, min_tokens=17) is None
    assert share_prefix(items[:1]) is None
    long_rest = [_t(list(range(16)) + [100 + i] * 200, 17) for i in range(3)]
    assert share_prefix(long_rest) is None
    assert "shared_prefix" not in collate(items, 0)   # off unless asked


def _items(tok, n=6):
    rows = chat_rows(n)
    return [tokenize_example(tok, Example([SYSTEM, *r["messages"]], f"r{i}"), "assistant") for i, r in enumerate(rows)]


@pytest.mark.parametrize("path", ["plain", "split", "fast"])
def test_shared_row_gives_the_padded_batch_loss_and_gradients(tiny_model, path):
    model, tok, _ = load_base(str(tiny_model))
    model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    items = _items(tok)
    parts = {"plain": None, "split": split_model(model),
             "fast": FastLlama(model, dtype=torch.float32, checkpointing=False)}[path]
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for share in (0, 8):
        batch = collate(items, tok.pad_token_id, share_prefix=share)
        assert ("shared_prefix" in batch) == bool(share)
        total, n = loss_sum(model, batch, parts)
        grads = torch.autograd.grad(total, params)
        results.append((float(total.detach()), n, grads, batch["input_ids"].numel()))
    (padded, n0, g0, size0), (shared, n1, g1, size1) = results
    assert size1 < 0.75 * size0   # the row holds the system turn once, no padding
    assert n0 == n1 == sum(t.n_loss_tokens for t in items)
    assert shared == pytest.approx(padded, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_a_run_with_shared_prefix_follows_the_run_without(tiny_model, tmp_path, monkeypatch):
    from loraforge.data import prefix
    from loraforge.train.run import run_training

    rows = [{"messages": [SYSTEM, *r["messages"]]} for r in chat_rows(24)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    shared, real = {"off": 0, "auto": 0}, prefix.share_prefix
    losses = {}
    for mode in ("off", "auto"):
        def counting(items, min_tokens=prefix.MIN_TOKENS, mode=mode):
            row = real(items, min_tokens)
            shared[mode] += row is not None
            return row
        monkeypatch.setattr(prefix, "share_prefix", counting)
        tree = tiny_config(tiny_model, data, tmp_path / mode, epochs=1, learning_rate=1e-2, batch_size=4,
                           grad_accum=1, eval_every=3)
        tree["lora"]["dropout"] = 0.0
        tree["data"].update(share_prefix=mode, validation_split=0.2)
        run_training(build_config(tree))
        metrics = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [(m["loss"], m.get("val_loss")) for m in metrics]
    assert shared["off"] == 0 and shared["auto"] >= 5   # auto (this is the CPU) did lay batches out as one row
    assert len(losses["auto"]) == len(losses["off"]) >= 5
    for (a, va), (b, vb) in zip(losses["off"], losses["auto"]):
        assert b == pytest.approx(a, rel=1e-4)
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=1e-4))
