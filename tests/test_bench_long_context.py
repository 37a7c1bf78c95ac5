"""bench/long_context.py's logic on CPU: the extrapolated maximum, the bisection (a stand-in for the device
processes), the budget check, and the small tokenizer its model folder gets without a download."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def lc():
    return load_bench("long_context")


def row(seq, peak, seconds=10.0):
    return {"seq": seq, "peak_reserved_gib": peak, "seconds": seconds, "steps_timed": 1, "load_s": 12.0,
            "status": "ok", "tokens_per_s": seq / seconds}


def args(**kw):
    return SimpleNamespace(**{"bisect": None, "granularity": 8192, "tries": 6, "max_seq": 1_048_576,
                              "timeout": 1800, "host_gib": 128.0, **kw})


def test_extrapolated_maximum_is_linear_in_the_length(lc):
    got = lc.extrapolate([row(32768, 12.9), row(131072, 33.8)], 79.6)
    slope = (33.8 - 12.9) / (131072 - 32768)
    assert got == int(131072 + (0.98 * 79.6 - 33.8) / slope)
    assert lc.extrapolate([row(32768, 12.9)], 79.6) is None
    host = [dict(row(32768, 12.9), host_max_rss_gib=12.0), dict(row(131072, 33.8), host_max_rss_gib=36.0)]
    assert lc.host_limited(host, 128.0) == int(131072 + (0.9 * 128 - 36) * 98304 / 24)


def test_bisection_brackets_the_longest_length(lc, monkeypatch):
    """A stand-in device where lengths up to 300,000 train: the tries start at the extrapolated length, then
    halve the interval on multiples of 8,192 until it is one step wide."""
    tried = []

    def attempt(row_, folder, seq, warmup, steps, timeout, env):
        tried.append(seq)
        assert (warmup, steps) == (0, 1) and seq % 8192 == 0
        return row(seq, 20 + seq / 10000) if seq <= 300_000 else {"seq": seq, "status": "oom"}

    monkeypatch.setattr(lc, "attempt", attempt)
    measured = [row(32768, 12.9), row(131072, 33.8)]
    out = lc.bisect("ours-qlora", None, {}, measured, [], 79.6, args(tries=12), deadline=float("inf"))
    assert tried[0] == lc.extrapolate(measured, 79.6) // 8192 * 8192
    assert out["longest_trained"] <= 300_000 < out["shortest_failed"]
    assert out["shortest_failed"] - out["longest_trained"] <= 8192
    assert [t["status"] for t in out["tries"]] == ["ok" if s <= 300_000 else "oom" for s in tried]


def test_bisection_starts_from_given_bounds_and_stops_on_budget_or_timeout(lc, monkeypatch):
    monkeypatch.setattr(lc, "attempt", lambda *a: {"seq": a[2], "status": "timeout"})
    out = lc.bisect("unsloth-qlora", None, {}, [], [], 79.6, args(bisect=(131072, 393216)), deadline=float("inf"))
    assert [t["seq"] for t in out["tries"]] == [262144] and "timeout" in out["stopped"]
    assert out["longest_trained"] == 131072 and out["shortest_failed"] == 393216
    # a try estimated at more than the time left is not started
    monkeypatch.setattr(lc, "attempt", lambda *a: pytest.fail("started a try past the budget"))
    slow = [row(32768, 12.9, 5.0), row(131072, 33.8, 48.0)]
    out = lc.bisect("ours-qlora", None, {}, slow, [], 79.6, args(), deadline=lc.time.time() + 100)
    assert out["tries"] == [] and out["stopped"].startswith("budget")


def test_word_tokenizer_loads_with_autotokenizer(lc, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lc.word_tokenizer(tmp_path / "tok"))
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.eos_token_id == 1 and tok.bos_token_id == 0
    text = "def main() -> None: the longest sequence"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert "assistant: " in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)


def test_loraforge_tries_keep_fewer_inputs_where_the_host_would_run_out(lc, monkeypatch):
    """Host memory 4 + 0.25 GiB per 1,000 tokens (the offloaded inputs): on a 128 GiB host, 400,000 tokens
    fit as they are, 600,000 need one input per 2 layers (ours-qlora-span2); Unsloth's rows never change."""
    measured = [dict(row(32768, 10.0), host_max_rss_gib=4 + 0.25 * 32.768),    # GPU peaks extrapolating to
                dict(row(131072, 19.8304), host_max_rss_gib=4 + 0.25 * 131.072)]  # ~713,000 tokens
    assert lc.spans_needed(measured, 400_000, 128.0) == 1
    assert lc.spans_needed(measured, 600_000, 128.0) == 2
    assert lc.spans_needed(measured, 1_000_000, 128.0) == 3
    rows = []
    monkeypatch.setattr(lc, "attempt", lambda r, f, seq, *a: rows.append((r, seq)) or {"seq": seq, "status": "oom"})
    for name in ("ours-qlora", "unsloth-qlora"):
        lc.bisect(name, None, {}, measured, [], 79.6, args(bisect=(131072, 1_048_576), tries=1), float("inf"))
    guess = lc.extrapolate(measured, 79.6) // 8192 * 8192
    assert 600_000 < guess < 1_000_000
    assert rows == [("ours-qlora-span2", guess), ("unsloth-qlora", guess)]
