"""bench/_mix.py, the length mix of bench/train_speed.py's *-mix shapes: packed rows hold exactly the drawn
examples that fit, positions restart and segments change at every example start, no example is predicted
from its neighbour, the same seed gives the same rows, and the loss every tool computes on them is the same
per-token mean (plain transformers from position_ids, loraforge's fast path from segment_ids)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mix = _load("_mix")


@pytest.fixture(scope="module")
def packed():
    rows, lengths = mix.mix_rows(6, pack_len=4096)
    return rows, lengths, mix.mix_batches(rows)


def test_rows_hold_exactly_the_drawn_examples_that_fit(packed):
    rows, lengths, batches = packed
    assert len(rows) == len(batches) == 6
    drawn = mix.sample_lengths(6 * 4096)
    assert lengths == drawn[:len(lengths)] and len(lengths) < len(drawn)  # a prefix of the draw, the rest dropped
    assert sorted(n for r in rows for n in r.seq_lens) == sorted(lengths)
    real = [int(b["attention_mask"].sum()) for b in batches]
    assert sum(real) == sum(lengths)
    assert all(int(b["seq_lens"].sum()) == n == b["input_ids"].shape[1] for b, n in zip(batches, real))
    assert all(n <= 4096 for n in real) and sum(real) > 0.97 * 6 * 4096  # best-fit fills the rows
    assert {str(b["seq_lens"].dtype) for b in batches} == {"torch.int32"}  # Unsloth's packed_seq_lengths


def test_positions_segments_and_labels_restart_at_every_example(packed):
    import torch

    _, _, batches = packed
    for b in batches:
        ids, labels, pos, seg = b["input_ids"][0], b["labels"][0], b["position_ids"][0], b["segment_ids"][0]
        starts = torch.cat([torch.zeros(1, dtype=torch.long), b["seq_lens"].long().cumsum(0)[:-1]])
        is_start = torch.zeros(len(ids), dtype=torch.bool)
        is_start[starts] = True
        assert torch.equal(pos == 0, is_start)
        assert torch.equal(pos[~is_start], pos[torch.nonzero(~is_start).squeeze(1) - 1] + 1)
        changes = torch.ones(len(ids), dtype=torch.bool)
        changes[1:] = seg[1:] != seg[:-1]
        assert torch.equal(changes, is_start)
        assert int(seg[-1]) == len(b["seq_lens"]) - 1
        assert torch.equal(labels == -100, is_start)  # every other token is a label: the example's own id
        assert torch.equal(labels[~is_start], ids[~is_start])
        assert int(ids.max()) < 32000 and int(ids.min()) >= 0


def test_same_seed_same_batches_other_seed_others(packed):
    import torch

    _, lengths, batches = packed
    rows2, lengths2 = mix.mix_rows(6, pack_len=4096)
    again = mix.mix_batches(rows2)
    assert lengths2 == lengths
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
    other, _ = mix.mix_rows(6, pack_len=4096, seed=7)
    assert other[0].input_ids != rows2[0].input_ids


def test_length_mix_is_alpaca_like():
    lengths = mix.sample_lengths(2_000_000)
    stats = mix.length_stats(lengths)
    assert 230 <= stats["p50"] <= 270 and 280 <= stats["mean"] <= 320
    assert 100 <= stats["p10"] <= 135 and 480 <= stats["p90"] <= 600
    assert min(lengths) >= 32 and max(lengths) <= 1024
    assert 0.8 <= sum(100 <= n <= 600 for n in lengths) / len(lengths) <= 0.92
    assert mix.length_stats([5, 1, 4, 2, 3, 6, 7, 8, 9, 10]) == {"mean": 5.5, "p10": 1, "p50": 5, "p90": 9}


def test_pack_len_shorter_than_the_longest_example_is_refused():
    with pytest.raises(ValueError, match="at least 1024"):
        mix.mix_rows(2, pack_len=512)


def test_every_tool_sees_the_same_mean_loss_on_a_packed_row():
    """On a tiny random Llama: the plain transformers loss with position_ids (its packed-row masks), the fast
    path's loss_sum with segment_ids, and the label-token-weighted mean of each example run alone agree."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.config import LoraSection
    from loraforge.model.adapters import attach_adapter
    from loraforge.model.fast import FastLlama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    cfg._attn_implementation = "sdpa"
    model = attach_adapter(LlamaForCausalLM(cfg).float(), LoraSection(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # PEFT starts B at 0: make the adapter matter
        if "lora_" in name:
            p.data.normal_(0, 0.2)
    model.eval()
    rows, _ = mix.mix_rows(3, pack_len=1024, vocab=300)
    assert min(len(r.seq_lens) for r in rows) >= 2
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False)
    for row, b in zip(rows, mix.mix_batches(rows)):
        with torch.no_grad():
            plain = float(model(input_ids=b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                                use_cache=False).loss)
            s, n = fast.loss_sum({k: b[k] for k in ("input_ids", "labels", "position_ids", "segment_ids")})
            total, count, start = 0.0, 0, 0
            for length in b["seq_lens"].tolist():
                ids = b["input_ids"][:, start:start + length]
                total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * (length - 1)
                count += length - 1
                start += length
            # without position ids the model attends across examples: the checks below bite
            crossed = float(model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss)
        assert n == count == b["input_ids"].shape[1] - len(row.seq_lens)
        assert float(s) / n == pytest.approx(total / count, rel=1e-4)
        assert plain == pytest.approx(total / count, rel=1e-4)
        assert abs(crossed - plain) > 1e-3


def test_the_bench_detects_whether_transformers_keeps_packed_examples_apart(monkeypatch):
    import transformers.masking_utils as masking

    speed = _load("train_speed")
    assert speed.plain_packed_attention() is True  # the installed transformers does, from position_ids
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert speed.plain_packed_attention() is False  # one that did not would be reported so in the row
