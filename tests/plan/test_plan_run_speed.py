"""The product-path speed model (plan.run_speed): the fit recovers its constants, the run's time adds up from
its shapes, and train.shapes counts the micro-batches the training loop really collates."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from loraforge.plan import KNOWN_MODELS, TrainSetup, find_gpu
from loraforge.plan.calibration import RunFit
from loraforge.plan.run_speed import (
    RunShapes, fit_runs, loop_parts, run_seconds, run_tokens_per_second, seconds_from_parts,
)
from loraforge.plan.throughput import seconds_per_micro_batch

LLAMA1B = KNOWN_MODELS["Llama-3.2-1B"]


def _parts(loop, micro, val, shapes):
    return {"loop_seconds": loop, "micro_batches": micro, "val_forwards": val, "shapes": shapes}


def test_fit_recovers_scales_and_the_shared_fixed_costs():
    truth = {"lora/small": RunFit(scale=0.4, warmup_s=12.0, shape_s=0.5, step_s=0.004, val_s=0.02),
             "qlora/large": RunFit(scale=1.3, warmup_s=12.0, shape_s=0.5, step_s=0.004, val_s=0.02)}
    points = []
    for key, loop, micro, val, shapes in [("lora/small", 3.0, 600, 100, 3), ("lora/small", 10.0, 300, 40, 6),
                                          ("lora/small", 40.0, 2400, 900, 43), ("lora/small", 1.0, 80, 10, 6),
                                          ("qlora/large", 25.0, 500, 96, 6), ("qlora/large", 9.0, 22, 36, 22),
                                          ("qlora/large", 60.0, 90, 300, 6)]:
        parts = _parts(loop, micro, val, shapes)
        points.append((key, parts, seconds_from_parts(parts, truth[key])))
    fits = fit_runs(points)
    for key, want in truth.items():
        got = fits[key]
        for name in ("scale", "warmup_s", "shape_s", "step_s", "val_s"):
            assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-6), (key, name)
    assert fits["lora/small"].points == 4 and fits["qlora/large"].points == 3


def test_fit_drops_a_fixed_cost_that_would_be_negative():
    # measured faster than any warm-up allows: the constant term goes, the scale stays positive
    points = [("lora/small", _parts(loop, micro, 0, 1), 2.0 * loop + 0.001 * micro - 1.0)
              for loop, micro in [(5.0, 100), (20.0, 900), (9.0, 50), (30.0, 200)]]
    fit = fit_runs(points)["lora/small"]
    assert fit.warmup_s == 0.0 and fit.scale > 0 and fit.step_s >= 0 and fit.val_s == 0.0
    with pytest.raises(ValueError):
        fit_runs([])


def test_run_time_adds_training_validation_and_fixed_costs():
    gpu, setup = find_gpu("H100"), TrainSetup(method="lora", batch=4, seq=512, grad_accum=1)
    shapes = RunShapes(batches=((4, 256, 10), (4, 512, 5)), real_tokens=15_000, epochs=2.0,
                       val_batches=((4, 128, 3),), evaluations=4)
    one = {n: seconds_per_micro_batch(gpu, LLAMA1B, setup, 4, n, n) for n in (128, 256, 512)}
    parts = loop_parts(gpu, LLAMA1B, setup, shapes)
    assert parts["loop_seconds"] == pytest.approx(2 * (10 * one[256] + 5 * one[512]) + 4 * 3 * one[128] / 3, rel=1e-9)
    assert parts["micro_batches"] == 30 and parts["val_forwards"] == 12 and parts["shapes"] == 2
    fit = RunFit(scale=3.0, step_s=0.01, warmup_s=7.0, shape_s=0.5, val_s=0.02)
    want = 7.0 + 0.5 * 2 + 3.0 * parts["loop_seconds"] + 0.01 * 30 + 0.02 * 12
    assert run_seconds(gpu, LLAMA1B, setup, shapes, fit) == pytest.approx(want)
    assert run_tokens_per_second(gpu, LLAMA1B, setup, shapes, fit) == pytest.approx(30_000 / want)
    # packed rows attend over their examples only: a shorter context costs less than the padded length
    packed = RunShapes(batches=((1, 2048, 10),), real_tokens=20_000, context=250)
    full = RunShapes(batches=((1, 2048, 10),), real_tokens=20_000)
    cost = lambda shapes: loop_parts(gpu, LLAMA1B, setup, shapes)["loop_seconds"]  # noqa: E731
    assert cost(packed) < cost(full)


@pytest.mark.parametrize("packing,buckets", [(False, None), (False, [16, 32, 64]), (True, None)])
def test_run_shapes_count_what_the_loop_collates(tiny_model, tmp_path, packing, buckets):
    from conftest import chat_rows, tiny_config, write_jsonl

    from loraforge.config import build_config
    from loraforge.data.batching import collate
    from loraforge.data.formats import Example
    from loraforge.data.packing import pack
    from loraforge.data.templates import tokenize_example
    from loraforge.model.load import load_base
    from loraforge.train.loop import micro_batches
    from loraforge.train.shapes import run_shapes

    _, tok, _ = load_base(str(tiny_model))
    rows = chat_rows(37)
    for i in range(0, 37, 5):   # a few longer examples
        rows[i]["messages"][1]["content"] += " It is a lovely shade, really." * (i % 3 + 1)
    items = [tokenize_example(tok, Example(r["messages"], f"r{i}"), "assistant") for i, r in enumerate(rows)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    tree = tiny_config(tiny_model, data, tmp_path / "run", epochs=2, batch_size=3, eval_every=4, grad_accum=2)
    tree["data"].update(packing=packing, max_seq_length=128)
    cfg = build_config(tree)
    trained = pack(items, 128) if packing else items
    shapes = run_shapes(trained, items[:7], cfg, buckets)
    batches = micro_batches(trained, cfg, SimpleNamespace(epoch=0, batch_in_epoch=0))
    seen = Counter()
    for _ in range(-(-len(trained) // 3)):
        _, _, group = next(batches)
        ids = collate(group, tok.pad_token_id, buckets, 3 if buckets else None)["input_ids"]
        seen[tuple(ids.shape)] += 1
    assert Counter({(r, n): c for r, n, c in shapes.batches}) == seen
    assert shapes.real_tokens == sum(len(t.input_ids) for t in trained)
    assert shapes.epochs == pytest.approx(2.0)
    assert sum(c for _, _, c in shapes.val_batches) >= 1 and shapes.evaluations >= 1
    assert (shapes.context is not None) == packing


def test_the_trainers_estimate_uses_the_runs_shapes(monkeypatch, tmp_path):
    import json as _json
    import re

    from loraforge.config import build_config
    from loraforge.plan import calibration
    from loraforge.plan.for_run import estimate_for_run, gpu_from_device, speed_inputs
    from loraforge.plan.inputs import setup_from_config
    from loraforge.plan.shapes import shape_from_config

    llama1b = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64,
               "_name_or_path": "/m/llama-1b"}
    cal = _json.loads(calibration.CALIBRATION_FILE.read_text())
    cal["runs"] = {"host": {"warmup_s": 5.0, "shape_s": 0.0, "step_s": 0.01, "val_s": 0.0},
                   "lora/small": {"scale": 2.0, "points": 3}}
    path = tmp_path / "cal.json"
    path.write_text(_json.dumps(cal))
    monkeypatch.setenv("LORAFORGE_PLAN_CALIBRATION", str(path))
    calibration.load_runs.cache_clear()
    calibration.load_calibration.cache_clear()
    try:
        cfg = build_config({"data": {"max_seq_length": 512}, "train": {"batch_size": 4, "epochs": 1}})
        shapes = RunShapes(batches=((4, 256, 40), (4, 512, 10)), real_tokens=40_000,
                           val_batches=((4, 300, 4),), evaluations=2)
        h100 = ("NVIDIA H100 80GB HBM3", 81559 * 2**20)
        text, _, speed = estimate_for_run(cfg, llama1b, [200] * 200, *h100, shapes=shapes)
        shape = shape_from_config(llama1b, "llama-1b")
        setup = setup_from_config(cfg, shape, seq=200, gpus=1)
        gpu = gpu_from_device(*h100)
        parts = loop_parts(gpu, shape, setup, shapes)
        assert speed == pytest.approx(40_000 / (5.0 + 2.0 * parts["loop_seconds"] + 0.01 * parts["micro_batches"]),
                                      rel=1e-6)
        shown = float(re.search(r"~([\d,]+) tokens/s", text)[1].replace(",", ""))
        assert shown == pytest.approx(speed, abs=1) and "2 batch shapes" in text
        inputs = speed_inputs(cfg, llama1b, shapes, *h100)
        assert inputs["key"] == "lora/small"
        assert inputs["micro_batches"] == pytest.approx(parts["micro_batches"], abs=0.01)
        assert inputs["planned_seconds"] == pytest.approx(40_000 / speed, rel=1e-3)
    finally:
        calibration.load_runs.cache_clear()
        calibration.load_calibration.cache_clear()
