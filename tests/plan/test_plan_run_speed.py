"""The product-path speed model (plan.run_speed): the fit recovers its constants, the run's time adds up from
its shapes, and train.shapes counts the micro-batches the training loop really collates."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from loraforge.plan import KNOWN_MODELS, TrainSetup, find_gpu
from loraforge.plan.calibration import MAX_MFU, RunFit
from loraforge.plan.run_speed import (
    RunShapes, fit_runs, loop_parts, run_seconds, run_tokens_per_second, seconds_from_parts,
)
from loraforge.plan.throughput import flops_per_token, seconds_per_micro_batch

LLAMA1B = KNOWN_MODELS["Llama-3.2-1B"]


def _parts(ideal, graph, eager, val, shapes):
    return {"ideal_seconds": ideal, "loop_seconds": 0.0, "graph_layers": graph, "eager_layers": eager,
            "val_layers": val, "shapes": shapes}


def test_fit_recovers_utilisations_and_the_shared_fixed_costs():
    costs = dict(warmup_s=12.0, shape_s=0.5, graph_step_s=0.0002, eager_step_s=0.001, val_s=0.002)
    truth = {"lora/small": RunFit(mfu=0.4, **costs), "qlora/large": RunFit(mfu=0.6, **costs)}
    points = []
    for key, ideal, graph, eager, val, shapes in [
            ("lora/small", 3.0, 18000, 0, 3000, 3), ("lora/small", 10.0, 0, 9600, 640, 43),
            ("lora/small", 40.0, 38400, 0, 9000, 6), ("lora/small", 1.0, 0, 1280, 160, 20),
            ("qlora/large", 25.0, 16000, 0, 3072, 6), ("qlora/large", 9.0, 0, 704, 1152, 22),
            ("qlora/large", 60.0, 2880, 0, 960, 6)]:
        parts = _parts(ideal, graph, eager, val, shapes)
        points.append((key, parts, seconds_from_parts(parts, truth[key])))
    fits = fit_runs(points)
    for key, want in truth.items():
        for name in ("mfu", "warmup_s", "shape_s", "graph_step_s", "eager_step_s", "val_s"):
            assert getattr(fits[key], name) == pytest.approx(getattr(want, name), rel=1e-6), (key, name)
    assert fits["lora/small"].points == 4 and fits["qlora/large"].points == 3


def test_fit_drops_a_negative_cost_and_never_claims_more_than_the_gpus_matmuls():
    loads = [(5.0, 1000), (20.0, 9000), (9.0, 500), (30.0, 2000)]
    # measured faster than any warm-up allows: the constant term goes, the rest stays positive
    slow = fit_runs([("lora/small", _parts(i, 0, e, 0, 1), i / 0.5 + 0.001 * e - 1.0) for i, e in loads])["lora/small"]
    assert slow.warmup_s == 0.0 and 0.4 < slow.mfu < 0.8 and slow.eager_step_s > 0
    # matmuls faster than MAX_MFU allows are held at it
    fast = fit_runs([("lora/small", _parts(i, 0, e, 0, 1), i / 0.95 + 0.01 * e) for i, e in loads])["lora/small"]
    assert fast.mfu == pytest.approx(MAX_MFU) and fast.eager_step_s > 0
    with pytest.raises(ValueError):
        fit_runs([])


def test_run_time_adds_training_validation_and_fixed_costs():
    gpu, setup = find_gpu("H100"), TrainSetup(method="lora", batch=4, seq=512, grad_accum=1)
    shapes = RunShapes(batches=((4, 256, 10), (4, 512, 5)), real_tokens=15_000, epochs=2.0,
                       val_batches=((4, 128, 3),), evaluations=4)
    one = {n: seconds_per_micro_batch(gpu, LLAMA1B, setup, 4, n, n) for n in (128, 256, 512)}
    parts = loop_parts(gpu, LLAMA1B, setup, shapes)
    assert parts["loop_seconds"] == pytest.approx(2 * (10 * one[256] + 5 * one[512]) + 4 * 3 * one[128] / 3, rel=1e-9)
    flops = {n: flops_per_token(LLAMA1B, setup, n) * 4 * n for n in (128, 256, 512)}
    peak = gpu.bf16_tflops * 1e12
    assert parts["ideal_seconds"] == pytest.approx((2 * (10 * flops[256] + 5 * flops[512]) + 4 * 3 * flops[128] / 3)
                                                   / peak, rel=1e-9)
    layers = LLAMA1B.layers
    assert parts["eager_layers"] == 30 * layers and parts["graph_layers"] == 0
    assert parts["val_layers"] == 12 * layers and parts["shapes"] == 2
    fit = RunFit(mfu=0.5, warmup_s=7.0, shape_s=0.5, graph_step_s=0.0001, eager_step_s=0.001, val_s=0.002)
    want = 7.0 + 0.5 * 2 + parts["ideal_seconds"] / 0.5 + 0.001 * 30 * layers + 0.002 * 12 * layers
    assert run_seconds(gpu, LLAMA1B, setup, shapes, fit) == pytest.approx(want)
    assert run_tokens_per_second(gpu, LLAMA1B, setup, shapes, fit) == pytest.approx(30_000 / want)
    graphed = RunShapes(shapes.batches, shapes.real_tokens, 2.0, None, shapes.val_batches, 4, graphs=True)
    assert run_seconds(gpu, LLAMA1B, setup, graphed, fit) == pytest.approx(want - (0.001 - 0.0001) * 30 * layers)
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
    assert shapes.epochs == pytest.approx(2.0) and shapes.graphs == bool(buckets)
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
    cal["runs"] = {"host": {"warmup_s": 5.0, "shape_s": 0.0, "graph_step_s": 0.0, "eager_step_s": 0.001,
                            "val_s": 0.0}, "lora/small": {"mfu": 0.5, "points": 3}}
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
        assert speed == pytest.approx(40_000 / (5.0 + parts["ideal_seconds"] / 0.5 + 0.001 * parts["eager_layers"]),
                                      rel=1e-6)
        shown = float(re.search(r"~([\d,]+) tokens/s", text)[1].replace(",", ""))
        assert shown == pytest.approx(speed, abs=1) and "2 batch shapes" in text
        inputs = speed_inputs(cfg, llama1b, shapes, *h100)
        assert inputs["key"] == "lora/small"
        assert inputs["eager_layers"] == pytest.approx(parts["eager_layers"], abs=0.01)
        assert inputs["planned_seconds"] == pytest.approx(40_000 / speed, rel=1e-3)
    finally:
        calibration.load_runs.cache_clear()
        calibration.load_calibration.cache_clear()


def test_plan_guesses_the_shapes_from_the_data_size():
    from loraforge.plan.run_speed import approx_shapes
    from loraforge.plan.throughput import DataSize

    data = DataSize(examples=1000, epochs=2.0, avg_tokens=200, assumed=False)
    unpacked = approx_shapes(TrainSetup(method="lora", batch=4, seq=1024, grad_accum=2), data)
    assert sum(n for _, _, n in unpacked.batches) == 250 and unpacked.distinct == 6
    assert all(r == 4 and 256 <= n < 262 for r, n, _ in unpacked.batches)   # avg x 1.25, to 16 (+ a token a shape)
    assert unpacked.real_tokens == 200_000 and unpacked.context is None
    # 250 steps / 50; 100 examples, 16 a forward (validation fills 4 x 1,024 tokens with rows of 256)
    assert unpacked.evaluations == 5 and unpacked.val_batches == ((16, 256, 7),)
    packed = approx_shapes(TrainSetup(method="lora", batch=1, seq=2048, grad_accum=2, packing=True), data)
    assert sum(n for _, _, n in packed.batches) == 98 and packed.context == 200   # 200,000 / 2,048 rows
    assert packed.distinct == 2   # rows of 2,048, segment offsets padded to a power of two
    assert packed.val_batches == ((1, 2048, 10),)   # 100 examples x 200 tokens in rows of 2,048
    # a long run validates about ten times under train.eval_every auto, or every N steps when the config says N
    big = DataSize(examples=20_000, epochs=2.0, avg_tokens=200, assumed=False)   # 5,000 steps
    setup = TrainSetup(method="lora", batch=4, seq=1024, grad_accum=2)
    assert approx_shapes(setup, big).evaluations == 10 and approx_shapes(setup, big, 50).evaluations == 100


def test_plan_inputs_carry_the_configs_validation_spacing():
    from loraforge.config import load_config
    from loraforge.plan.inputs import from_config

    assert from_config(load_config(None, ["base_model=meta-llama/Llama-3.2-1B"])).eval_every is None
    cfg = load_config(None, ["base_model=meta-llama/Llama-3.2-1B", "train.eval_every=40"])
    assert from_config(cfg).eval_every == 40


def test_a_cold_kernel_cache_costs_its_compile_seconds_once_and_the_fit_finds_them():
    costs = dict(warmup_s=2.0, compile_s=8.0, shape_s=0.5, graph_step_s=0.0002, val_s=0.002)
    truth = RunFit(mfu=0.3, **costs)
    points = []
    for ideal, graph, val, shapes, cold in [(3.0, 18000, 3000, 3, 0.0), (3.0, 18000, 3000, 3, 1.0),
                                            (40.0, 38400, 9000, 6, 0.0), (1.0, 1280, 160, 20, 1.0),
                                            (10.0, 9600, 640, 4, 0.0), (25.0, 16000, 3072, 6, 0.0)]:
        parts = {**_parts(ideal, graph, 0, val, shapes), "cold": cold}
        points.append(("lora/small", parts, seconds_from_parts(parts, truth)))
    # the same run on a fresh machine takes compile_s longer, and nothing else changes
    assert points[1][2] - points[0][2] == pytest.approx(8.0)
    fit = fit_runs(points)["lora/small"]
    assert fit.compile_s == pytest.approx(8.0, rel=1e-6) and fit.mfu == pytest.approx(0.3, rel=1e-6)
    # rows measured before the flag existed carry no "cold" key: priced warm
    old = _parts(3.0, 18000, 0, 3000, 3)
    assert seconds_from_parts(old, fit) == pytest.approx(points[0][2])


def test_plan_assumes_a_fresh_machine_and_the_shapes_say_so():
    from loraforge.plan.run_speed import approx_shapes
    from loraforge.plan.throughput import DataSize

    data = DataSize(examples=2000, epochs=1.0, avg_tokens=300, assumed=False)
    setup = TrainSetup(method="lora", batch=4, seq=1024, grad_accum=2)
    assert approx_shapes(setup, data).cold_kernels is True
    gpu, fit = find_gpu("H100"), RunFit(mfu=0.3, compile_s=8.0)
    cold = approx_shapes(setup, data)
    warm = approx_shapes(setup, data, cold_kernels=False)
    assert loop_parts(gpu, LLAMA1B, setup, cold)["cold"] == 1.0
    assert run_seconds(gpu, LLAMA1B, setup, cold, fit) - run_seconds(gpu, LLAMA1B, setup, warm, fit) == \
        pytest.approx(8.0)
