"""The calibrated speed model: fitting (mfu, fixed cost per step) from measurements, reading the committed file,
and tokens/s from it by hand; plus the accuracy bench's CPU path on one tiny configuration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loraforge.plan import KNOWN_MODELS, TrainSetup, find_gpu, flops_per_token
from loraforge.plan.calibration import (
    CALIBRATION_FILE, MAX_MFU, SpeedFit, fit_speed, load_calibration, parse_calibration, speed_key, step_seconds,
)
from loraforge.plan.throughput import tokens_per_second

LLAMA8B, LLAMA1B = KNOWN_MODELS["Llama-3.1-8B"], KNOWN_MODELS["Llama-3.2-1B"]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "plan_accuracy.py"


def test_fit_recovers_utilisation_and_fixed_cost():
    # seconds = ideal / 0.4 + 0.01 s per billion params: points at several sizes of work and two model sizes
    points = [(x, p, x / 0.4 + 0.01 * p) for x, p in [(0.05, 1.2), (0.2, 1.2), (0.8, 8.0), (0.1, 8.0), (1.5, 8.0)]]
    fit = fit_speed(points, gpu_tflops=989.4)
    assert fit.mfu == pytest.approx(0.4, rel=1e-9)
    assert fit.overhead_s_per_gparam == pytest.approx(0.01, rel=1e-9)
    assert fit.points == 5 and fit.gpu_tflops == 989.4


def test_fit_without_a_separable_fixed_cost():
    one = fit_speed([(0.3, 8.0, 1.0)], gpu_tflops=100)
    assert (one.mfu, one.overhead_s_per_gparam) == (pytest.approx(0.3), 0.0)
    # faster than the FLOPs alone allow at small sizes would need a negative fixed cost: it is dropped
    fit = fit_speed([(0.1, 1.0, 0.1 / 0.5 - 0.05), (1.0, 1.0, 1.0 / 0.5 - 0.05)], gpu_tflops=100)
    assert fit.overhead_s_per_gparam == 0.0 and 0.45 < fit.mfu < 0.6
    with pytest.raises(ValueError):
        fit_speed([], gpu_tflops=100)


def test_fit_never_claims_more_than_the_matmul_peak():
    # points made with mfu 0.95 and a fixed cost: capped at MAX_MFU (0.8), the fixed cost fitted alone
    points = [(x, 1.0, x / 0.95 + 0.05) for x in (0.1, 0.4)]
    assert fit_speed(points[:1] + points[1:], gpu_tflops=100) == fit_speed(points, gpu_tflops=100)
    fit = fit_speed(points, gpu_tflops=100)
    assert fit.mfu == MAX_MFU and 0 < fit.overhead_s_per_gparam < 0.05
    assert all(abs(x / fit.mfu + fit.overhead_s_per_gparam * p - t) / t < 0.15 for x, p, t in points)


def test_calibrated_tokens_per_second_by_hand():
    h100, a100 = find_gpu("H100"), find_gpu("A100 80GB")
    setup = TrainSetup(method="qlora", batch=4, seq=2048, gradient_checkpointing=True)
    cal = {"qlora/large": SpeedFit(mfu=0.3, overhead_s_per_gparam=0.02, gpu_tflops=989.4)}
    tokens = 4 * 1000
    flops = flops_per_token(LLAMA8B, setup, 1000) * tokens
    # checkpointing: three passes over the weights (forward, recomputed forward, backward) instead of two
    seconds = flops / (989.4e12 * 0.3) + 0.02 * LLAMA8B.params / 1e9 * 3 / 2
    assert tokens_per_second(h100, LLAMA8B, setup, 1000, calibration=cal) == pytest.approx(tokens / seconds)
    # another card: its own peak; the fixed cost scaled by the peak ratio
    seconds_a100 = flops / (312e12 * 0.3) + 0.02 * LLAMA8B.params / 1e9 * 3 / 2 * 989.4 / 312
    assert tokens_per_second(a100, LLAMA8B, setup, 1000, calibration=cal) == pytest.approx(tokens / seconds_a100)
    # no entry for this method/size: the MFU guess
    assert speed_key("lora", LLAMA1B) == "lora/small" and speed_key("qlora", LLAMA8B) == "qlora/large"
    assert tokens_per_second(h100, LLAMA1B, setup, 1000, calibration=cal) == pytest.approx(
        tokens_per_second(h100, LLAMA1B, setup, 1000, calibration={}))
    assert step_seconds(cal["qlora/large"], flops, 989.4, LLAMA8B.params, checkpointing=True) == pytest.approx(seconds)
    no_ckpt = flops / (989.4e12 * 0.3) + 0.02 * LLAMA8B.params / 1e9
    assert step_seconds(cal["qlora/large"], flops, 989.4, LLAMA8B.params) == pytest.approx(no_ckpt)


def test_calibration_file_round_trip(tmp_path):
    data = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_tflops": 989.4, "measured": "2026-11-23",
            "entries": {"lora/small": {"mfu": 0.25, "overhead_s_per_gparam": 0.003, "points": 3}}}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    loaded = load_calibration(str(path))
    assert loaded == {"lora/small": SpeedFit(0.25, 0.003, 989.4, 3)} == parse_calibration(data)
    assert load_calibration(str(tmp_path / "missing.json")) == {}
    if CALIBRATION_FILE.is_file():  # the committed table parses and holds sane utilisations
        assert all(0.02 < f.mfu < 1 and f.overhead_s_per_gparam >= 0 for f in load_calibration().values())


def _bench():
    spec = importlib.util.spec_from_file_location("plan_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_measures_a_tiny_config_on_cpu_and_skips_nf4():
    bench = _bench()
    spec = {"model": "tiny-64", "method": "lora", "seq": 32, "batch": 2, "checkpointing": True}
    row = bench.measure(spec, "cpu", warmup=1, steps=2)
    assert row["status"] == "ok" and row["measured_tok_s"] > 0 and row["loss"] > 0
    # r=16 on 7 modules of 2 layers: (64+64)+(64+32)x2+(64+64)+(64+128)x2+(128+64) = 1024 per rank per layer
    assert row["trainable_params"] == 2 * 16 * 1024
    compared = bench.compare(spec, row, None, None)
    assert compared["planned_gib"] > 0 and "tok_err" not in compared
    assert compared["config"] == "tiny-64 lora seq32 b2 ckpt-on"
    with pytest.raises(NotImplementedError):
        bench.measure({**spec, "method": "qlora"}, "cpu", warmup=1, steps=1)
    summary = bench.summarize([compared, {"status": "skipped"}])
    assert summary["measured"] == 1 and summary["pass"] is False and summary["statuses"] == {"ok": 1, "skipped": 1}
