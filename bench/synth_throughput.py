"""Requests per second of `loraforge data synth` against a stub server that answers instantly; prints JSON.

    python bench/synth_throughput.py --requests 4000 --concurrency 64

The stub (tests/synth/stub.py) runs in a process of its own, so client and server each have a core. The
spec is distill mode (one request per item) with verification on (record checks, exact + MinHash dedup);
a fresh journal each round, fsync'd as in a real run. `requests_per_s` is answered requests over the
request phase (first request to last journal line); `end_to_end_per_s` includes verification and writing.
Rounds are repeated and the median reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "synth"))


def _serve(port_q) -> None:
    from stub import StubServer

    with StubServer() as stub:
        port_q.put(stub.port)
        while True:
            time.sleep(3600)


def one_round(url: str, n: int, concurrency: int, stream: bool) -> dict:
    from loraforge.synth.run import synth
    from loraforge.synth.spec import build_spec

    with tempfile.TemporaryDirectory() as d:
        prompts = [f"question {k}: " + " ".join(str(k * 7919 % (j + 11)) for j in range(12)) for k in range(n)]
        spec = build_spec({"endpoint": {"base_url": url, "model": "stub", "concurrency": concurrency,
                                        "stream": stream},
                           "task": "Answer the question.", "mode": "distill", "count": n, "prompts": prompts,
                           "verify": {"dedup": True}})
        t0 = time.perf_counter()
        report = synth(spec, Path(d) / "out.jsonl", embeddings=False)
        total = time.perf_counter() - t0
    u = report["usage"]
    assert u["requests"] == n and not u["failures"], u
    return {"requests": u["requests"], "request_seconds": report["request_seconds"],
            "requests_per_s": round(u["requests"] / report["request_seconds"], 1),
            "end_to_end_s": round(total, 3), "end_to_end_per_s": round(n / total, 1), "kept": report["kept"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", action="store_true", help="server-sent events instead of one JSON body")
    args = ap.parse_args()
    load_before = os.getloadavg()
    q = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(target=_serve, args=(q,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{q.get(timeout=30)}/v1"
    try:
        one_round(url, 200, args.concurrency, args.stream)  # warm-up: imports, connections
        rounds = [one_round(url, args.requests, args.concurrency, args.stream) for _ in range(args.rounds)]
    finally:
        server.terminate()
    med = statistics.median(r["requests_per_s"] for r in rounds)
    print(json.dumps({"bench": "synth_throughput", "command": "python bench/synth_throughput.py " + " ".join(sys.argv[1:]),
                      "requests": args.requests, "concurrency": args.concurrency, "stream": args.stream,
                      "median_requests_per_s": med,
                      "median_end_to_end_per_s": statistics.median(r["end_to_end_per_s"] for r in rounds),
                      "rounds": rounds, "cpus": os.cpu_count(), "python": platform.python_version(),
                      "load_avg_before": [round(x, 2) for x in load_before],
                      "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))


if __name__ == "__main__":
    main()
