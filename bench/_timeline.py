"""Where a training step's GPU sits idle, from a torch.profiler Chrome trace (bench/train_speed.py --profile).

The kernel table says how long the GPU computes; when wall time per step is longer than that, the
difference is time the compute stream waits. This reads the trace's kernel and memcpy events, takes the
stream with the most kernel time as the compute stream, and measures its idle gaps; each gap is blamed on
what the host was doing: the CPU ops (outer to inner, e.g. `RecomputedLayerBackward > LoraGroupFn > aten::mm`) that
launched the kernel ending the gap, and whether the launch came late (the CPU was behind: host-bound) or
early (the stream waited on something else: an event, another stream, a sync). Host syncs
(cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, blocking cudaMemcpy) are counted, with
the CPU ops that made them, and device-to-device copies are summed by the CPU ops that launched them.
Where the profiled loop marks its phases with `torch.profiler.record_function("phase:forward")` (and
backward, optimizer), the idle time is also split by the phase whose launch ended each gap ("outside" where
none encloses it, e.g. the host work between two steps).

    summary = idle_summary(json.load(open("trace.json")), steps=2)
"""

from __future__ import annotations

from collections import Counter, defaultdict

SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
PHASE = "phase:"   # the prefix of the loop's phase annotations


def _busy(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def idle_summary(trace: dict, steps: int, min_gap_us: float = 20.0, top: int = 12) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    per_stream: dict = defaultdict(float)
    for e in gpu:
        if e.get("cat") == "kernel":
            per_stream[e.get("args", {}).get("stream", e.get("tid"))] += e["dur"]
    compute = max(per_stream, key=per_stream.get)
    on_compute = [e for e in gpu if e.get("args", {}).get("stream", e.get("tid")) == compute]
    busy = _busy([(e["ts"], e["ts"] + e["dur"]) for e in on_compute])
    start, end = busy[0][0], busy[-1][1]
    # host side: runtime launches by correlation id, CPU ops for the enclosing-op blame
    # (Triton kernels are launched through the driver API: cuLaunchKernel, category cuda_driver)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    cpu_ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation")),
                     key=lambda e: e["ts"])
    first_after = {}
    for e in sorted(on_compute, key=lambda e: e["ts"]):
        first_after.setdefault(e["ts"], e)
    blame: Counter = Counter()
    by_phase: Counter = Counter()
    phases = [e for e in cpu_ops if e["name"].startswith(PHASE)]
    host_bound = other = 0.0
    gaps = []
    for (_, prev_end), (nxt_start, _) in zip(busy, busy[1:]):
        gap = nxt_start - prev_end
        if gap < min_gap_us:
            continue
        kernel = first_after.get(nxt_start)
        launch = launches.get(kernel.get("args", {}).get("correlation")) if kernel else None
        late = launch is not None and launch["ts"] + launch["dur"] > prev_end
        where = _enclosing(cpu_ops, launch["ts"]) if launch else "?"
        if late:
            host_bound += gap
        else:
            other += gap
        blame[("host-bound: " if late else "waiting: ") + where] += gap
        by_phase[_phase(phases, launch["ts"] if launch else nxt_start)] += gap
        gaps.append(gap)
    sync_calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in SYNC_CALLS]
    syncs = Counter(e["name"] for e in sync_calls)
    # where each sync was called from: after one, the GPU has nothing queued until the host launches again
    sync_sites = Counter(_enclosing(cpu_ops, e["ts"]) for e in sync_calls)
    # device-to-device copies (clone, contiguous, copy_ of same-layout tensors): who launched them
    copies: Counter = Counter()
    for e in gpu:
        if "DtoD" in e["name"]:
            launch = launches.get(e.get("args", {}).get("correlation"))
            copies[_enclosing(cpu_ops, launch["ts"], depth=4) if launch else "?"] += e["dur"]
    wall = end - start
    busy_us = sum(e - s for s, e in busy)
    return {"compute_stream": compute, "steps": steps,
            "wall_ms_per_step": round(wall / steps / 1e3, 3),
            "compute_busy_ms_per_step": round(busy_us / steps / 1e3, 3),
            "idle_ms_per_step": round((wall - busy_us) / steps / 1e3, 3),
            "idle_host_bound_ms_per_step": round(host_bound / steps / 1e3, 3),
            "idle_waiting_ms_per_step": round(other / steps / 1e3, 3),
            "gaps_over_min_per_step": round(len(gaps) / steps, 1), "min_gap_us": min_gap_us,
            "host_syncs": dict(syncs),
            "host_sync_sites_per_step": {k: round(v / steps, 1) for k, v in sync_sites.most_common(top)},
            "top_idle_causes_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in blame.most_common(top)},
            "device_copies_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in copies.most_common(top)}} | \
        ({"idle_by_phase_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in by_phase.most_common()}}
         if phases else {})


def _phase(phases: list[dict], ts: float) -> str:
    """The phase (a `phase:` annotation) running at host time ts, or "outside"."""
    for e in phases:
        if e["ts"] <= ts <= e["ts"] + e["dur"]:
            return e["name"][len(PHASE):]
    return "outside"


def _enclosing(cpu_ops: list[dict], ts: float, depth: int = 3) -> str:
    """The innermost `depth` CPU ops running at host time ts, outer to inner."""
    stack = [e for e in cpu_ops if e["ts"] <= ts <= e["ts"] + e["dur"]]
    stack.sort(key=lambda e: (e["ts"], -e["dur"]))
    names = [e["name"] for e in stack if not e["name"].startswith(("ProfilerStep", PHASE))]
    return " > ".join(names[-depth:]) if names else "(no CPU op)"
