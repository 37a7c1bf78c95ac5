"""bench/validation_speed.py's CPU path (--cpu-smoke): the run set up by loraforge's stages, a few training steps,
validation passes with the old and the new budget, the profile tables; the JSON it writes. No timings asserted."""

from __future__ import annotations

import json

from conftest import chat_rows, load_bench, write_jsonl


def test_cpu_smoke_writes_both_budgets_same_loss_fewer_forwards(tiny_model, tmp_path):
    vs = load_bench("validation_speed")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(48))
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(64))
    out = tmp_path / "res" / "validation_speed.json"
    got = vs.main(["--train", str(train), "--val", str(val), "--smol", str(tiny_model), "--cpu-smoke",
                   "--cache", str(tmp_path / "cache"), "--repeats", "2", "--train-steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == got
    assert {"device", "run", "model", "scale", "loss_fraction", "train_steps", "budgets", "speedup", "loss_rel_diff",
            "profile"} <= set(got)
    assert got["device"] == "cpu" and got["fast_path"] and got["model"]["num_hidden_layers"] == 12
    old, new = got["budgets"]["old"], got["budgets"]["new"]
    for b in (old, new):
        assert len(b["seconds"]) == len(b["peak_allocated_gib"]) == len(b["losses"]) == 2
        assert b["losses"] == [b["loss"]] * 2
    assert got["scale"] > 1.5 and new["max_tokens"] > old["max_tokens"]
    assert new["forwards"] < old["forwards"]
    assert abs(new["loss"] - old["loss"]) <= 1e-5 * abs(old["loss"]) and got["loss_rel_diff"] <= 1e-5
    assert got["train_steps"]["steps"] == 2 and got["validation_examples"] == 64
    for name in ("validation_profile_cpu.txt", "validation_profile_gpu.txt"):
        text = (out.parent / name).read_text()
        assert "Self CPU" in text
