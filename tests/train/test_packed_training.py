"""data.packing in the trainer: a packed micro-batch's summed loss equals the examples' losses alone, on
the plain forward, the loss-positions-only forward and the fast Llama path; a packed run trains."""

import json

import pytest
import torch
from conftest import chat_rows, tiny_config, write_jsonl

from loraforge.config import LoraSection, build_config
from loraforge.data.batching import collate
from loraforge.data.formats import Example
from loraforge.data.packing import pack
from loraforge.data.templates import Tokenized, tokenize_example
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast import FastLlama
from loraforge.model.load import load_base
from loraforge.train.loop import loss_sum, split_model


@pytest.mark.parametrize("path", ["plain", "split", "fast"])
def test_packed_batch_loss_equals_examples_alone(tiny_model, path):
    model, tok, _ = load_base(str(tiny_model))
    model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0)).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    rows = chat_rows(9)
    rows[4]["messages"] = [{"role": "system", "content": "Answer with one word only please."}, *rows[4]["messages"]]
    items = [tokenize_example(tok, Example(r["messages"], f"r{i}"), "assistant") for i, r in enumerate(rows)]
    parts = {"plain": None, "split": split_model(model),
             "fast": FastLlama(model, dtype=torch.float32, checkpointing=False)}[path]
    with torch.no_grad():
        alone = [loss_sum(model, collate([t], tok.pad_token_id), parts) for t in items]
        packed = pack(items, 80)
        assert len(packed) < len(items) and all(len(r.seq_lens) >= 1 for r in packed)
        batch = collate(packed, tok.pad_token_id)
        assert set(batch) >= {"segment_ids", "position_ids"}
        assert int(batch["attention_mask"].sum()) == sum(len(t.input_ids) for t in items)
        total, n = loss_sum(model, batch, parts)
    assert n == sum(a[1] for a in alone) == sum(t.n_loss_tokens for t in items)
    assert float(total) == pytest.approx(sum(float(a[0]) for a in alone), rel=1e-5)


def test_packed_run_trains_on_fewer_rows(tiny_model, tmp_path):
    from loraforge.train.run import run_training

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(64))
    tree = tiny_config(tiny_model, data, tmp_path / "run", epochs=3, learning_rate=1e-2, batch_size=2, grad_accum=1)
    tree["data"].update(packing=True, max_seq_length=256)
    res = run_training(build_config(tree))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["packed_rows"] < report["train_examples"] / 2
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == res.summary["steps"] == 3 * -(-report["packed_rows"] // 2)
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"]


def test_validation_groups_keep_every_example_once():
    from loraforge.train.loop import validation_groups

    lengths = [50, 7, 300, 120, 120, 33, 90, 260, 15, 64]
    items = [Tokenized(list(range(n)), list(range(n)), f"v{k}") for k, n in enumerate(lengths)]
    plain, pad = validation_groups(items, 3)
    assert [len(b) for b in plain] == [3, 3, 3, 1] and pad == {}
    assert [len(t.input_ids) for b in plain for t in b] == sorted(lengths)
    groups, pad = validation_groups(items, 2, pack_to=512)
    rows = [r for g in groups for r in g]
    assert sorted(s for r in rows for s in r.sources) == sorted(t.source for t in items)
    assert len(rows) == 3 and all(len(r.input_ids) <= 512 for r in rows)   # 1,049 tokens
    assert [len(g) for g in groups] == [2, 1] and pad == {"buckets": [512], "rows": 2}


def test_packed_validation_loss_equals_one_example_at_a_time(tiny_model):
    from loraforge.train.loop import evaluate_loss

    model, tok, _ = load_base(str(tiny_model))
    model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0))
    items = [tokenize_example(tok, Example(r["messages"], f"r{i}"), "assistant")
             for i, r in enumerate(chat_rows(11))]
    one = evaluate_loss(model, items, 1, tok.pad_token_id, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    filled = evaluate_loss(model, items, 1, tok.pad_token_id, torch.device("cpu"),
                           lambda: torch.autocast("cpu", enabled=False), pack_to=400)
    assert filled == pytest.approx(one, rel=1e-5)
    budget = evaluate_loss(model, items, 2, tok.pad_token_id, torch.device("cpu"),
                           lambda: torch.autocast("cpu", enabled=False), max_tokens=10_000)
    assert budget == pytest.approx(one, rel=1e-5)


def test_validation_forwards_fill_a_token_budget():
    """With max_tokens a forward takes more than batch_size examples while rows x its longest fit the budget,
    never fewer than batch_size; validation_layout's budget is batch_size rows of the longest training example
    (at most max_seq_length): no forward larger than a training batch."""
    from loraforge.config import build_config
    from loraforge.train.loop import validation_groups, validation_layout

    lengths = [50, 7, 300, 120, 120, 33, 90, 260, 15, 64]
    items = [Tokenized(list(range(n)), list(range(n)), f"v{k}") for k, n in enumerate(lengths)]
    groups, pad = validation_groups(items, 2, max_tokens=400)
    # 6 x 90 > 400 closes the first; [260, 300] is over the budget but batch_size (2) rows are the least
    assert [[len(t.input_ids) for t in g] for g in groups] == [[7, 15, 33, 50, 64], [90, 120, 120], [260, 300]]
    assert pad == {}
    assert validation_groups(items, 2, max_tokens=1)[0] == validation_groups(items, 2)[0]
    cfg = build_config({"base_model": "x", "data": {"train": "t.jsonl", "max_seq_length": 300},
                        "train": {"batch_size": 4}})
    assert validation_layout(cfg, items) == {"batch_size": 4, "pack_to": None, "max_tokens": 1200}
    assert validation_layout(cfg, items[:2])["max_tokens"] == 4 * 50   # the longest of [50, 7]
    assert validation_layout(cfg, [])["max_tokens"] == 1200
