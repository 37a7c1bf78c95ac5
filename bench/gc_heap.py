"""What a full garbage collection costs before a CUDA graph capture, with and without the settled heap (#19).

    python bench/gc_heap.py --train .e2e/snips-train.jsonl --val .e2e/snips-val.jsonl --smol .e2e/tok \\
        --out bench/results/train_e2e/s23/gc_heap_cpu.json

model.fast.graphs.capturing runs gc.collect() before each capture (two a new batch shape). This sets up the run
bench/train_e2e.py calls 135m-snips through loraforge's own stages (bench/validation_speed.py's set-up: its data,
tokenised; a tiny random Llama on the CPU, as validation_speed.py --cpu-smoke, since the heap is the libraries'
and the data's objects more than the model's), then times --repeats full collections as the heap is, and again
inside model.fast.graphs.settled_heap (what `loraforge train` wraps its loop in). Writes the objects tracked and
each collection's seconds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402


def collections(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append(round(time.perf_counter() - t0, 5))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--smol", required=True, help="a tokenizer folder (SmolLM2's)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lf-gcheap"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from loraforge.model.fast.graphs import settled_heap
    from validation_speed import run_config, setup, tiny_model

    a.cache.mkdir(parents=True, exist_ok=True)
    run = setup(run_config(a.train, a.val, tiny_model(a.smol, a.cache), a.cache, True))
    objects = len(gc.get_objects())
    plain = collections(a.repeats)
    with settled_heap():
        settled = collections(a.repeats)
        frozen = gc.get_freeze_count()
    result = {"command": " ".join(["python", "bench/gc_heap.py", *(sys.argv[1:] if argv is None else argv)]),
              "device": "cpu", "training_items": len(run.train_items), "objects_tracked": objects,
              "frozen_in_settled_heap": frozen, "collect_s": plain, "collect_s_settled": settled,
              "median_s": statistics.median(plain), "median_s_settled": statistics.median(settled)}
    emit(result, a.out)
    return result


if __name__ == "__main__":
    main()
