"""What is alive on the GPU at a training step's peak, from torch's allocator history (bench/train_speed.py
--profile): the allocation/free events of one recorded step are replayed, the moment of the highest
allocated total is found, and the blocks alive then are summed by the Python line that allocated them
(the innermost frame inside loraforge, liger, bitsandbytes, peft, transformers or unsloth; else the
innermost frame). Memory that predates the recording (weights, optimizer state) is reported as one
`before recording` figure, taken from the allocator's statistics (blocks allocated before the recording
and freed during it are not subtracted, so the peak is an upper bound by at most their size).

    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    ... one step ...
    summary = peak_breakdown(torch.cuda.memory._snapshot(), base_bytes=allocated_before)
"""

from __future__ import annotations

from collections import Counter

OURS = ("loraforge", "liger_kernel", "bitsandbytes", "peft", "transformers", "unsloth")


def _where(frames: list[dict]) -> str:
    for f in frames:  # innermost first
        name = f.get("filename", "")
        if any(f"/{p}/" in name for p in OURS):
            short = name[name.rfind("/site-packages/") + 15:] if "/site-packages/" in name else name
            short = short[short.find("loraforge/"):] if "loraforge/" in short else short
            return f"{short}:{f.get('line')} ({f.get('name')})"
    f = frames[0] if frames else {}
    return f"{f.get('filename', '?')}:{f.get('line', '?')} ({f.get('name', '?')})"


def peak_breakdown(snapshot: dict, base_bytes: int = 0, device: int = 0, top: int = 15) -> dict:
    trace = snapshot.get("device_traces", [[]])[device]
    live: dict[int, tuple[int, list]] = {}
    total = peak = 0
    peak_at = -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    if peak_at < 0:
        return {"error": "no allocations recorded"}
    live.clear()
    for ev in trace[:peak_at + 1]:  # replay up to the peak: what is alive then
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
        elif ev["action"] in ("free_requested", "free_completed"):
            live.pop(ev["addr"], None)
    by_line: Counter = Counter()
    for size, frames in live.values():
        by_line[_where(frames)] += size
    gib = 2 ** 30
    return {"peak_allocated_gib": round((base_bytes + peak) / gib, 3),
            "before_recording_gib": round(base_bytes / gib, 3),
            "during_step_at_peak_gib": round(peak / gib, 3),
            "at_peak_by_line_gib": {k: round(v / gib, 4) for k, v in by_line.most_common(top)}}
