"""Where the first steps of a bucketed run go (issue 19): the 135m-snips run's first --steps steps through
`loraforge train`'s own stages and loop, with the warm-up's parts timed.

    python bench/warmup_cost.py --train .e2e/snips-train.jsonl --val .e2e/snips-val.jsonl --smol .e2e/tok \\
        --out $OUT/warmup_cost.json [--sdpa default,flash] [--steps 40]
    python bench/warmup_cost.py --train T.jsonl --val V.jsonl --smol TOKDIR --cpu-smoke --sdpa default --steps 6

Session 22's SNIPS run spent 7.5 s in its first 20 steps (4 batch shapes, ~1.1 s a captured shape, ~0.4 s a new
shape's first eager step) against 17.6 ms a step after. For each --sdpa choice (`default`: torch's own pick,
cuDNN's attention on an H100; `flash`, `cudnn`, `efficient`: torch.nn.attention.sdpa_kernel around the loop), one
fresh process runs train_e2e.py's 135m-snips config (max_steps --steps, no validation or checkpoint in the way)
set up by train.run.TrainingRun, with timers wrapped around the warm-up's parts: the collections and cache
releases before a capture (gc.collect, torch.cuda.empty_cache), the forward and backward captures
(model.fast.graphs.StackGraphs), and each step's wall time from the loop's own metrics rows. Prints and writes
one JSON object: per choice, the step clock, the seconds and count of each part, the steps that were a new shape's
first (eager) step and those that captured, and the median step after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402

BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


class Timed:
    """Wrap `owner.name` so that each call's seconds (synchronised on CUDA) are recorded under `key`."""

    def __init__(self, owner, name: str, key: str, log: dict, sync):
        self.real, self.key, self.log, self.sync = getattr(owner, name), key, log, sync
        setattr(owner, name, self)

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.real(*a, **k)
        finally:
            self.sync()
            self.log.setdefault(self.key, []).append(round(time.perf_counter() - t0, 4))

    def __get__(self, obj, cls=None):   # as a method of the class it replaced
        return self if obj is None else (lambda *a, **k: self(obj, *a, **k))


def one(args) -> dict:
    """One --sdpa choice in this process."""
    import contextlib
    import gc

    import torch

    from loraforge.model.fast import graphs
    from validation_speed import run_config, setup

    cfg = run_config(args.train, args.val, args.model_dir, args.cache, args.cpu_smoke)
    cfg["output_dir"] = str(args.cache / f"run-{args.sdpa}")
    cfg["train"].update(max_steps=args.steps, eval_every=10 ** 6, save_every=10 ** 6, log_every=1)
    log: dict[str, list[float]] = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    Timed(gc, "collect", "gc_collect", log, sync)
    Timed(torch.cuda, "empty_cache", "empty_cache", log, sync)
    Timed(graphs.StackGraphs, "_capture_forward", "capture_forward", log, sync)
    Timed(graphs.StackGraphs, "_capture_backward", "capture_backward", log, sync)
    run = setup(cfg)
    run.open_folder()
    kernel = contextlib.nullcontext()
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(getattr(SDPBackend, BACKENDS[args.sdpa]))
    t0 = time.perf_counter()
    with kernel:
        result = run.train()
    loop_seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    clock = [(r["step"], r["elapsed_s"]) for r in rows if "elapsed_s" in r and "loss" in r]
    steps = [round(b[1] - a[1], 4) for a, b in zip([(0, 0.0)] + clock, clock)]
    after = steps[len(steps) // 2:]
    return {"sdpa": args.sdpa, "loop_seconds": round(loop_seconds, 3), "steps": len(steps), "step_seconds": steps,
            "median_step_after_warmup_s": statistics.median(after) if after else None,
            "parts": {k: {"calls": len(v), "seconds": round(sum(v), 4), "each": v} for k, v in log.items()},
            "final_train_loss": result.final_train_loss, "seconds_in": result.seconds_in}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--smol", required=True, help="SmolLM2-135M(-Instruct)'s HF folder, or its tokenizer alone")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lf-warmup"))
    ap.add_argument("--sdpa", default="default,flash")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny random Llama on the CPU (smoke test)")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)   # set by the parent for each child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(one(args)))
        return None
    import torch

    from train_e2e import RUNS, model_dir

    dtype = torch.get_default_dtype()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        from validation_speed import tiny_model

        built = tiny_model(args.smol, args.cache)
    else:
        built = model_dir(RUNS["135m-snips"]["model"], args.smol, args.cache)
    torch.set_default_dtype(dtype)
    rows = []
    for choice in args.sdpa.split(","):   # each in a fresh process: kernels, plans and graphs start cold
        cmd = [sys.executable, __file__, "--child", "--train", str(args.train), "--val", str(args.val), "--smol",
               args.smol, "--cache", str(args.cache), "--sdpa", choice, "--steps", str(args.steps),
               "--model-dir", str(built)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        last = [x for x in p.stdout.splitlines() if x.startswith("{")]
        rows.append(json.loads(last[-1]) if p.returncode == 0 and last else
                    {"sdpa": choice, "error": (p.stderr or p.stdout)[-1500:]})
        print({k: v for k, v in rows[-1].items() if k not in ("step_seconds", "parts")}, flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"command": " ".join(["python", "bench/warmup_cost.py", *(sys.argv[1:] if argv is None else argv)]),
              "device": device, "rows": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
