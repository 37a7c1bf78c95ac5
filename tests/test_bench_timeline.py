"""bench/_timeline.py: the compute stream's idle time per step from a profiler trace, split into gaps where
the host launched the next kernel late (host-bound) and gaps where it was launched in time but waited, each
blamed on the CPU ops that launched it; host syncs counted. Checked on a hand-built trace."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_timeline", Path(__file__).resolve().parents[1] / "bench" / "_timeline.py")
timeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timeline)


def _k(ts, dur, corr, stream=7):
    return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur,
            "args": {"stream": stream, "correlation": corr}}


def _launch(ts, corr, dur=5):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": dur,
            "args": {"correlation": corr}}


def _op(name, ts, dur):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur}


def test_idle_gaps_are_measured_and_blamed():
    events = [
        _op("RecomputedLayerBackward", 0, 1000), _op("LoraGroupFn", 100, 500), _op("aten::mm", 390, 20),
        _k(10, 100, 1), _launch(5, 1),          # busy 10-110
        _k(110, 90, 2), _launch(20, 2),         # busy 110-200 (back to back)
        _k(400, 100, 3), _launch(395, 3),       # gap 200-400 = 200 us: launched at 395-400 > 200: host-bound
        _k(700, 50, 4), _launch(450, 4),        # gap 500-700 = 200 us: launched at 450: waiting
        _k(760, 10, 5), _launch(460, 5),        # gap 750-760 = 10 us < min gap: ignored
        _k(300, 50, 6, stream=9), _launch(30, 6),   # another stream: not the compute stream
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 800, "dur": 3, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 810, "dur": 3, "args": {}},
        _op("RopeQKVBackward", 820, 30), _op("aten::clone", 825, 10),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 760, "dur": 8,
         "args": {"stream": 7, "correlation": 8}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 826, "dur": 3, "args": {"correlation": 8}},
    ]
    s = timeline.idle_summary({"traceEvents": events}, steps=2, min_gap_us=20)
    assert s["compute_stream"] == 7
    assert s["wall_ms_per_step"] == pytest.approx((770 - 10) / 2 / 1e3)
    assert s["device_copies_ms_per_step"] == {
        "RecomputedLayerBackward > RopeQKVBackward > aten::clone": pytest.approx(8 / 2 / 1e3)}
    assert s["compute_busy_ms_per_step"] == pytest.approx((100 + 90 + 100 + 50 + 10) / 2 / 1e3)
    assert s["idle_ms_per_step"] == pytest.approx((200 + 200 + 10) / 2 / 1e3)
    assert s["idle_host_bound_ms_per_step"] == pytest.approx(200 / 2 / 1e3)
    assert s["idle_waiting_ms_per_step"] == pytest.approx(200 / 2 / 1e3)
    assert s["gaps_over_min_per_step"] == 1.0
    assert s["host_syncs"] == {"cudaStreamSynchronize": 1}
    assert s["host_sync_sites_per_step"] == {"RecomputedLayerBackward": 0.5}
    causes = s["top_idle_causes_ms_per_step"]
    assert causes == {"host-bound: RecomputedLayerBackward > LoraGroupFn > aten::mm": 0.1,
                      "waiting: RecomputedLayerBackward > LoraGroupFn": 0.1}


def test_triton_launches_through_the_driver_api_are_found():
    """Triton kernels are launched with cuLaunchKernel (category cuda_driver): a late one is host-bound, not
    an unexplained wait."""
    late = {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 395, "dur": 5, "args": {"correlation": 2}}
    events = [_op("LigerRMSNormFunction", 380, 40), _k(10, 100, 1), _launch(5, 1), _k(400, 100, 2), late]
    s = timeline.idle_summary({"traceEvents": events}, steps=1, min_gap_us=20)
    assert s["idle_host_bound_ms_per_step"] == pytest.approx(290 / 1e3)
    assert s["top_idle_causes_ms_per_step"] == {"host-bound: LigerRMSNormFunction": 0.29}


def test_idle_is_split_by_the_phase_whose_launch_ended_the_gap():
    """The loop's `phase:` annotations split the idle time: a gap ended by a launch in the forward counts
    for the forward, one whose launch no phase encloses (host work between steps) for "outside"; the blame
    strings leave the annotations out."""
    ann = {"ph": "X", "cat": "user_annotation"}
    events = [ann | {"name": "phase:forward", "ts": 0, "dur": 300},
              ann | {"name": "phase:backward", "ts": 300, "dur": 300},
              _op("aten::mm", 250, 20),
              _k(10, 100, 1), _launch(5, 1),
              _k(260, 40, 2), _launch(255, 2),     # gap 110-260 (150 us), launched late in the forward
              _k(400, 50, 3), _launch(310, 3),     # gap 300-400 (100 us), launched early in the backward
              _k(700, 50, 4), _launch(650, 4)]     # gap 450-700 (250 us), launched after both phases
    s = timeline.idle_summary({"traceEvents": events}, steps=1, min_gap_us=20)
    assert s["idle_by_phase_ms_per_step"] == {"outside": 0.25, "forward": 0.15, "backward": 0.1}
    assert s["top_idle_causes_ms_per_step"]["host-bound: aten::mm"] == 0.15
    plain = timeline.idle_summary({"traceEvents": events[2:]}, steps=1, min_gap_us=20)
    assert "idle_by_phase_ms_per_step" not in plain


def test_trace_without_gpu_events_is_reported():
    assert "error" in timeline.idle_summary({"traceEvents": [_op("x", 0, 1)]}, steps=1)


memory_spec = importlib.util.spec_from_file_location("bench_memory", Path(__file__).resolve().parents[1] / "bench" / "_memory.py")
memory = importlib.util.module_from_spec(memory_spec)
memory_spec.loader.exec_module(memory)


def _fr(path, line, name):
    return {"filename": path, "line": line, "name": name}


def test_memory_peak_is_found_and_split_by_allocating_line():
    ours = [_fr("/x/torch/nn/functional.py", 1, "linear"),
            _fr("/v/site-packages/loraforge/model/fast/lora.py", 120, "forward")]
    other = [_fr("/x/bench/train_speed.py", 9, "run_row")]
    gib = 2 ** 30
    trace = [
        {"action": "alloc", "addr": 1, "size": 2 * gib, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 1 * gib, "frames": other},
        {"action": "free_requested", "addr": 2, "size": 1 * gib},
        {"action": "free_completed", "addr": 2, "size": 1 * gib},
        {"action": "alloc", "addr": 3, "size": 3 * gib, "frames": ours},     # peak here: 2 + 3 GiB alive
        {"action": "free_completed", "addr": 1, "size": 2 * gib},
        {"action": "alloc", "addr": 4, "size": 1 * gib, "frames": other},
        {"action": "free_completed", "addr": 99, "size": 5 * gib},           # allocated before recording
    ]
    s = memory.peak_breakdown({"device_traces": [trace]}, base_bytes=4 * gib)
    assert s["during_step_at_peak_gib"] == 5.0 and s["peak_allocated_gib"] == 9.0
    assert s["before_recording_gib"] == 4.0
    assert s["at_peak_by_line_gib"] == {"loraforge/model/fast/lora.py:120 (forward)": 5.0}
    assert "error" in memory.peak_breakdown({"device_traces": [[]]})
