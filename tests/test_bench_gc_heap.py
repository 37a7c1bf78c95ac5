"""bench/gc_heap.py: the run's set-up by loraforge's stages, full collections timed plain and inside the settled
heap; the JSON it writes. No timings asserted."""

from __future__ import annotations

import gc
import json

from conftest import chat_rows, load_bench, write_jsonl


def test_times_collections_plain_and_settled_and_lets_the_heap_go(tiny_model, tmp_path):
    gh = load_bench("gc_heap")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(32))
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(8))
    out = tmp_path / "gc.json"
    got = gh.main(["--train", str(train), "--val", str(val), "--smol", str(tiny_model), "--cache",
                   str(tmp_path / "cache"), "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == got and got["training_items"] > 0
    assert len(got["collect_s"]) == len(got["collect_s_settled"]) == 2
    assert got["frozen_in_settled_heap"] > 10_000 and gc.get_freeze_count() == 0
