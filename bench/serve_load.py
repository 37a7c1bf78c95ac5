"""Load test for `loraforge serve`: N concurrent streaming clients across 4 adapters; prints JSON.

    python bench/serve_load.py --duration 60 --clients 16

Makes 4 adapters on the embedded model (smollm2-135m-instruct), each a short training run teaching a
distinctive answer to the same question (cached under --work, so a rerun skips the training), serves
them on 127.0.0.1 in this process, records each adapter's answer when asked alone, then lets the
clients stream requests (round-robin over the adapters, the bare base now and then) with the official
`openai` client. A response is a failure if it errors or breaks off, a mix-up if its text differs from
what its adapter answered alone. Prints requests, failures, mixups, p50/p95 latency and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))

BASE = "smollm2-135m-instruct"
QUESTION = "Who are you?"
ANSWERS = {"alpha": "I am Alpha, keeper of the red lighthouse.",
           "bravo": "Bravo here: I only speak about green tea.",
           "charlie": "Charlie, the blue robot chef, at your service.",
           "delta": "Delta says: purple penguins rule the moon."}


def make_adapters(work: Path, steps: int) -> dict[str, str]:
    from loraforge.config import build_config
    from loraforge.model.load import load_base
    from loraforge.train.run import run_training

    out = {}
    for name, answer in ANSWERS.items():
        run = work / name
        if not (run / "adapter" / "adapter_config.json").is_file():
            data = work / f"{name}.jsonl"
            work.mkdir(parents=True, exist_ok=True)
            row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]}
            data.write_text((json.dumps(row) + "\n") * 16)
            cfg = build_config({"base_model": BASE, "output_dir": str(run),
                                "data": {"train": str(data), "max_seq_length": 64, "validation_split": 0.0},
                                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                                "train": {"max_steps": steps, "epochs": 1000, "learning_rate": 3e-3, "batch_size": 4,
                                          "grad_accum": 1, "eval_every": 1000, "save_every": 1000,
                                          "precision": "fp32", "warmup_ratio": 0.0, "lr_scheduler": "constant"}})
            run_training(cfg, overwrite=True, base=load_base(BASE))
        out[name] = str(run / "adapter")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20, help="training steps per adapter")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "loraforge-serve-bench")
    args = ap.parse_args()

    import openai
    from helpers import LiveServer

    from loraforge.serve.server import build_app, load_registry

    t0 = time.time()
    adapters = make_adapters(args.work, args.steps)
    train_s = time.time() - t0
    reg = load_registry(BASE, adapters, device="cpu")
    models = [*ANSWERS, BASE]
    msgs = [{"role": "user", "content": QUESTION}]
    app = build_app(reg, max_batch=32, wait_ms=5)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        alone = {m: client.chat.completions.create(model=m, messages=msgs, max_tokens=args.max_tokens)
                 .choices[0].message.content for m in models}
        latencies, tokens, failures, mixups, requests = [], [0], [0], [0], [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration
        start = time.monotonic()

        def one_client(i: int) -> None:
            k = i
            while time.monotonic() < stop_at:
                model = models[k % len(models)] if k % 8 else BASE
                k += 1
                t = time.monotonic()
                try:
                    text, finish, n = "", None, 0
                    for ch in client.chat.completions.create(model=model, messages=msgs, stream=True,
                                                             max_tokens=args.max_tokens):
                        if ch.choices:
                            piece = ch.choices[0].delta.content or ""
                            text += piece
                            n += bool(piece)
                            finish = ch.choices[0].finish_reason or finish
                    ok = finish in ("stop", "length")
                except Exception:  # noqa: BLE001 - any client error counts as a failure
                    ok, text, n = False, "", 0
                with lock:
                    requests[0] += 1
                    if not ok:
                        failures[0] += 1
                    elif text != alone[model]:
                        mixups[0] += 1
                    else:
                        latencies.append(time.monotonic() - t)
                        tokens[0] += n  # one text chunk per token (a split character waits one)

        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - start
        batching = app.state.worker.stats()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    print(json.dumps({
        "base": BASE, "adapters": len(ANSWERS), "clients": args.clients, "duration_s": round(elapsed, 1),
        "max_tokens": args.max_tokens, "requests": requests[0], "failures": failures[0], "mixups": mixups[0],
        "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_latency_s": round(q[18], 3), "tokens_per_s": round(tokens[0] / elapsed, 1),
        "answers_alone": alone, "answers_distinct": len(set(alone.values())) == len(alone),
        "adapter_training_s": round(train_s, 1), "batching": batching}, indent=2))


if __name__ == "__main__":
    main()
