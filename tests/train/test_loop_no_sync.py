"""The training loop's host-side bookkeeping (train.loop): metrics rows every `log_every` steps carrying the
token-weighted loss of their interval, loss counts taken from the host's lists, and batches padded to a few
lengths (where the fast path replays CUDA graphs) giving the losses of unpadded ones."""

import json

import pytest
import torch

from conftest import chat_rows, tiny_config, write_jsonl
from loraforge.config import build_config
from loraforge.data.batching import bucket_length, collate, length_buckets
from loraforge.data.formats import read_examples
from loraforge.data.templates import IGNORE_INDEX, tokenize_all
from loraforge.model.load import load_base
from loraforge.train.loop import loss_tokens, to_device
from loraforge.train.run import run_training


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _data(tmp_path, n=48):
    rows = chat_rows(n)
    for i, r in enumerate(rows):   # a spread of lengths, so batches differ in shape
        r["messages"][0]["content"] += " please" * (4 * (i % 5))
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_log_every_writes_interval_means(tiny_model, tmp_path):
    data = _data(tmp_path)
    every = run_training(build_config(tiny_config(tiny_model, data, tmp_path / "a", eval_every=100, save_every=100)))
    third = run_training(build_config(tiny_config(tiny_model, data, tmp_path / "b", eval_every=100, save_every=100,
                                                  log_every=3)))
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    steps = every.summary["steps"]
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["step"] for r in b] == sorted({*range(3, steps + 1, 3), steps})   # and the last step
    # the same training; each row's loss is the token-weighted mean of its steps (weights: loss tokens)
    cfg = build_config(tiny_config(tiny_model, data, tmp_path / "c"))
    model, tok, _ = load_base(str(tiny_model))
    from loraforge.train.run import load_data

    items = load_data(cfg, tok)[0]
    from loraforge.data.batching import batch_order

    order = [b for e in range(2) for b in batch_order([len(t.input_ids) for t in items], 4, cfg.seed, e)]
    per_step = [sum(loss_tokens(items[i]) for b in order[s * 2:s * 2 + 2] for i in b) for s in range(steps)]
    for row in b:
        lo = max(r["step"] for r in b if r["step"] < row["step"]) if row is not b[0] else 0
        span = range(lo, row["step"])
        want = sum(a[s]["loss"] * per_step[s] for s in span) / sum(per_step[s] for s in span)
        assert row["loss"] == pytest.approx(want, rel=1e-5)
    # the same training, whatever is logged: the same validation loss at the end
    assert every.summary["final_val_loss"] == pytest.approx(third.summary["final_val_loss"], rel=1e-6)


def test_host_counts_match_the_batch(tiny_model, tmp_path):
    _, tok, _ = load_base(str(tiny_model))
    items, _ = tokenize_all(tok, read_examples(_data(tmp_path)), 64)
    batch = to_device(collate(items[:5], tok.pad_token_id, [16, 48, 64], rows=8), "cpu")
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] in (16, 48, 64)
    assert len(batch["loss_index"]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) \
        == sum(loss_tokens(t) for t in items[:5])


def test_length_buckets_cover_every_batch():
    lengths = [10 + (i * 37) % 200 for i in range(500)]
    buckets = length_buckets(lengths, 8, seed=1, n_buckets=4)
    assert 1 <= len(buckets) <= 4 and all(b % 16 == 0 for b in buckets) and buckets[-1] >= max(lengths)
    assert bucket_length(11, buckets) == buckets[0] and bucket_length(buckets[-1] + 1, buckets) == buckets[-1] + 1
    assert length_buckets([5] * 40, 8, seed=1) == [16]


def test_bucketed_stack_steps_give_the_plain_losses(tiny_model, tmp_path, monkeypatch):
    """Batches padded to buckets and full rows, through the whole-stack path that CUDA graphs capture (run
    eagerly on CPU): the loss curve of unpadded batches on the per-layer path. Without dropout: its masks
    depend on where a token sits in the padded batch (the stack path with dropout is compared to the
    per-layer path on the same shapes in tests/model/test_fast_dropout.py)."""
    import loraforge.model.prepare as prepare
    from loraforge.model.fast import FastLlama, fast_engine

    data = _data(tmp_path)
    curves, engines = {}, []
    for name in ("plain", "bucketed"):
        tree = tiny_config(tiny_model, data, tmp_path / name, eval_every=4, save_every=100)
        tree["model"] = {"fast_path": "on", "cuda_graphs": "off" if name == "plain" else "auto"}
        tree["lora"]["dropout"] = 0.0
        if name == "bucketed":   # the stack path that graphs capture, eagerly, with buckets as on a GPU
            monkeypatch.setattr(FastLlama, "fit_graphs", lambda self, tokens: True)
            monkeypatch.setattr(prepare, "fast_engine", lambda *a, **k: engines.append(
                fast_engine(*a, **{**k, "graphs": "eager"})) or engines[-1])
        run_training(build_config(tree))
        rows = _rows(tmp_path / name)
        curves[name] = [r["loss"] for r in rows], [r["val_loss"] for r in rows if "val_loss" in r]
    assert engines[0].graphs.eager is True and len(engines[0].graphs.by_key) >= 2   # several padded shapes
    assert all(key[0][0] == 4 for key in engines[0].graphs.by_key)                 # always full rows
    for got, want in zip(curves["bucketed"], curves["plain"]):
        assert got == pytest.approx(want, rel=2e-5)
    assert torch.tensor(curves["plain"][0]).std() > 0


def test_profile_writes_the_runs_own_steps_and_summary_splits_the_time(tiny_model, tmp_path):
    run = run_training(build_config(tiny_config(tiny_model, _data(tmp_path), tmp_path / "run", eval_every=4)),
                       profile=tmp_path / "prof")
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    steps = run.summary["steps"]
    assert prof["steps"] >= 1 and 1 <= prof["first_step"] <= steps and prof["wall_ms_per_step"] > 0
    assert "aten::" in (tmp_path / "prof" / "steps_cpu.txt").read_text()
    assert (tmp_path / "prof" / "trace.json.gz").stat().st_size > 0
    spent = run.summary["seconds_in"]
    assert set(spent) == {"validation", "checkpoints"} and spent["validation"] > 0 and spent["checkpoints"] > 0
    assert sum(spent.values()) < run.summary["train_seconds"]


def test_profiled_steps_start_a_quarter_into_a_long_run(tmp_path):
    """A long bucketed run captures a CUDA graph per new batch shape in its first steps: the profile starts a
    quarter in (at least step 20), and always leaves room for its steps before the run ends."""
    from loraforge.train.profiling import StepProfiler

    assert StepProfiler(tmp_path, 1863).first == 465 and StepProfiler(tmp_path, 1863).last == 470
    assert StepProfiler(tmp_path, 40).first == 20
    assert StepProfiler(tmp_path, 10).first == 4 and StepProfiler(tmp_path, 10).last == 9
    assert StepProfiler(tmp_path, 1863, first=100).first == 100
