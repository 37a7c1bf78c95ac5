"""bench/warmup_cost.py's CPU path (--cpu-smoke): one child process per attention choice runs the run's first steps
through loraforge's stages and loop with the warm-up's parts timed; the JSON it writes. No timings asserted."""

from __future__ import annotations

import json

from conftest import chat_rows, load_bench, write_jsonl


def test_cpu_smoke_runs_the_loop_in_a_child_and_times_its_parts(tiny_model, tmp_path):
    wc = load_bench("warmup_cost")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(48))
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(8))
    out = tmp_path / "res" / "warmup_cost.json"
    got = wc.main(["--train", str(train), "--val", str(val), "--smol", str(tiny_model), "--cpu-smoke",
                   "--cache", str(tmp_path / "cache"), "--sdpa", "default", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == got and got["device"] == "cpu"
    (row,) = got["rows"]
    assert "error" not in row, row.get("error")
    assert row["sdpa"] == "default" and row["steps"] == 2 and len(row["step_seconds"]) == 2
    assert all(s >= 0 for s in row["step_seconds"]) and row["loop_seconds"] > 0
    # the loop's one collection over the settled heap; no CUDA graph is captured on the CPU
    assert row["parts"]["gc_collect"]["calls"] >= 1 and "capture_forward" not in row["parts"]
