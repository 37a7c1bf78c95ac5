"""Is `loraforge plan` right? Train real LoRA/QLoRA configurations on the GPU and compare with the planner.

    python bench/plan_accuracy.py --out $OUT/plan_accuracy.json               # measure + compare (CUDA)
    python bench/plan_accuracy.py --calibrate --out $OUT/plan_accuracy.json   # + fit speed, write calibration.json
    python bench/plan_accuracy.py --device cpu --tiny                         # smoke test on a CPU (~1 min)
    python bench/plan_accuracy.py --device cuda --from-json OLD.json          # re-compare old measurements

Each configuration (Llama-3.2-1B and Llama-3.1-8B shapes from plan/shapes.py; LoRA bf16 and QLoRA nf4;
seq 512/2048/4096; batch 1 and 4; gradient checkpointing on and off) runs in its own subprocess, so memory
statistics start clean and an out-of-memory error or a crash is one row, not the end of the bench. A child
builds the model from a LlamaConfig with random weights directly on the GPU (nothing is downloaded: speed and
memory do not depend on the values), prepares it for training with the trainer's own functions (see
`build_for_training`, the one hook to change when the model loading changes), then runs optimizer steps on
random token ids of exactly `seq` tokens with every position carrying loss (the trainer's `loss_sum`, fused
AdamW from `make_optimizer`, bf16 autocast, gradient clipping, as in train/loop.py): `--warmup` steps, then
`--steps` timed ones. Measured memory = torch.cuda.max_memory_reserved() + the CUDA context (device memory in
use before the first allocation); tokens/s = batch x seq x steps / seconds.

The parent asks the planner for the same setup (plan.estimate, plan.throughput.tokens_per_second on the card
the child saw) and writes one JSON object: rows {config, status, measured_gib, planned_gib, mem_err,
measured_tok_s, planned_tok_s, tok_err, ...} and a summary (pass: every measured row within +-10% memory and
+-25% tokens/s, and at least 8 measured rows). `--calibrate` first fits the speed model of plan/calibration.py
to the measured rows, per (method, size class), writes it to src/loraforge/plan/calibration.json and compares
against the calibrated planner; each row then also carries `loo_tok_err`, the error of a fit made without that
row (an honest check, since the calibrated rows are the rows compared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing

from loraforge.plan.calibration import (  # noqa: E402
    CALIBRATION_FILE, SpeedFit, fit_speed, parse_calibration, passes, speed_key,
)
from loraforge.plan.for_run import gpu_from_device  # noqa: E402
from loraforge.plan.gpus import GPU  # noqa: E402
from loraforge.plan.inputs import setup_from_config  # noqa: E402
from loraforge.plan.memory import GIB, estimate  # noqa: E402
from loraforge.plan.shapes import KNOWN_MODELS, ModelShape  # noqa: E402
from loraforge.plan.throughput import flops_per_token, tokens_per_second  # noqa: E402

MARK = "PLAN_ACCURACY_ROW "
MEM_TOL, TOK_TOL, MIN_ROWS = 0.10, 0.25, 8
# (model, method, seq, batch, gradient checkpointing): 1B first (fast), both methods on both shapes, every seq,
# batch 1 and 4, checkpointing on and off; each fits an 80 GB card by the planner's estimate.
CONFIGS = [
    ("Llama-3.2-1B", "lora", 512, 1, False),
    ("Llama-3.2-1B", "lora", 2048, 4, False),
    ("Llama-3.2-1B", "lora", 4096, 1, True),
    ("Llama-3.2-1B", "qlora", 2048, 1, False),
    ("Llama-3.2-1B", "qlora", 4096, 4, True),
    ("Llama-3.1-8B", "lora", 2048, 1, True),
    ("Llama-3.1-8B", "lora", 4096, 1, False),
    ("Llama-3.1-8B", "lora", 512, 4, False),
    ("Llama-3.1-8B", "qlora", 512, 4, False),
    ("Llama-3.1-8B", "qlora", 4096, 1, True),
    ("Llama-3.1-8B", "qlora", 2048, 4, True),
]
TINY_SHAPES = {
    "tiny-64": ModelShape("tiny-64", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256,
                          tied_embeddings=True),
    "tiny-128": ModelShape("tiny-128", hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vocab=512,
                           tied_embeddings=False),
}
TINY_CONFIGS = [
    ("tiny-64", "lora", 32, 1, False), ("tiny-64", "lora", 64, 2, True), ("tiny-128", "lora", 64, 1, False),
    ("tiny-128", "lora", 32, 2, True), ("tiny-64", "qlora", 32, 1, False), ("tiny-128", "qlora", 64, 2, True),
]


def shape_of(model: str) -> ModelShape:
    return TINY_SHAPES.get(model) or KNOWN_MODELS[model]


def selected(name: str, only: str | None) -> bool:
    """--only: alternatives separated by ';', each a comma-separated list of words the name must all contain."""
    return not only or any(all(w in name for w in alt.split(",")) for alt in only.split(";"))


def setup_of(spec: dict):
    """The planner's TrainSetup for a spec, as `loraforge plan CONFIG` would read it."""
    return setup_from_config(config_for(spec), shape_of(spec["model"]))


def spec_name(spec: dict) -> str:
    return (f"{spec['model']} {spec['method']} seq{spec['seq']} b{spec['batch']} "
            f"ckpt-{'on' if spec['checkpointing'] else 'off'}")


def config_for(spec: dict):
    """The run config of a spec: the trainer's defaults (r16 on all linear layers, AdamW) + the spec's knobs."""
    from loraforge.config import build_config

    return build_config({
        "base_model": spec["model"],
        "model": {"quantization": "nf4" if spec["method"] == "qlora" else "none",
                  "gradient_checkpointing": spec["checkpointing"]},
        "data": {"max_seq_length": spec["seq"]},
        "train": {"batch_size": spec["batch"], "grad_accum": 1},
    })


# ----------------------------------------------------------------------------------------------------------
# How the trainer turns a loaded base into what it trains: the same function `loraforge train` calls.
# ----------------------------------------------------------------------------------------------------------
def build_for_training(model, cfg, device: str):
    """(model, parts for loss_sum) exactly as `loraforge train` prepares them (loraforge.model.prepare);
    the random-weight model is quantised in memory first when the config asks for NF4."""
    import torch

    from loraforge.model.prepare import prepare_for_training
    from loraforge.train.loop import split_model

    if cfg.model.quantization == "nf4":
        if device != "cuda":
            raise NotImplementedError("model.quantization=nf4 (QLoRA) needs a CUDA GPU")
        from loraforge.model.quant import quantize_linears_

        quantize_linears_(model, device)
        model.is_loaded_in_4bit = True  # as transformers' bnb quantizer marks it: PEFT then wraps Linear4bit
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, fast = prepare_for_training(model, cfg, device, dtype, log=lambda m: print(m, file=sys.stderr))
    return model, fast or split_model(model)


# ----------------------------------------------------------------------------------------------------------
# child: one configuration, in its own process
# ----------------------------------------------------------------------------------------------------------
def measure(spec: dict, device: str, warmup: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraforge.model.adapters import trainable_parameters
    from loraforge.train.loop import loss_sum
    from loraforge.train.run import make_optimizer

    cfg, shape = config_for(spec), shape_of(spec["model"])
    row: dict = {"device": "cpu"}
    context = 0
    if device == "cuda":
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
        props = torch.cuda.get_device_properties(0)
        row.update(device=props.name, device_memory_bytes=props.total_memory, context_gib=context / GIB)
    torch.manual_seed(0)
    llama = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim or shape.hidden // shape.heads,
                        vocab_size=shape.vocab, tie_word_embeddings=shape.tied_embeddings,
                        max_position_embeddings=max(8192, spec["seq"]), use_cache=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    model, parts = build_for_training(model, cfg, device)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg, device)
    row["fast_path"] = hasattr(parts, "loss_sum")
    row["build_s"] = round(time.perf_counter() - t0, 2)
    row["trainable_params"] = sum(p.numel() for p in params)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    batch_shape = (spec["batch"], spec["seq"])

    def step() -> float:
        ids = torch.randint(0, shape.vocab, batch_shape, device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with autocast():
            s, n = loss_sum(model, batch, parts)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(s.detach()) / n  # the trainer reads the loss every step too (a sync)

    for _ in range(warmup):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t1
    row.update(status="ok", loss=loss, steps=steps, seconds=seconds,
               measured_tok_s=spec["batch"] * spec["seq"] * steps / seconds)
    if device == "cuda":
        row.update(measured_gib=(torch.cuda.max_memory_reserved() + context) / GIB,
                   reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                   allocated_gib=torch.cuda.max_memory_allocated() / GIB)
    return row


def child_main(spec: dict, device: str, warmup: int, steps: int) -> None:
    try:
        row = measure(spec, device, warmup, steps)
    except Exception as e:  # one row per outcome: the parent goes on with the next configuration
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            row = {"status": "oom", "error": str(e).splitlines()[0]}
        elif isinstance(e, (NotImplementedError, ImportError)):
            row = {"status": "skipped", "error": f"{type(e).__name__}: {e}"}
        else:
            row = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        if device == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            row.update(device=props.name, device_memory_bytes=props.total_memory)
    print(MARK + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------------------
# parent: run every configuration, ask the planner, compare, calibrate
# ----------------------------------------------------------------------------------------------------------
def run_child(spec: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # the caching allocator as users get it (no expandable segments)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {args.timeout} s", "wall_s": round(time.perf_counter() - t0, 1)}
    rows = [line[len(MARK):] for line in done.stdout.splitlines() if line.startswith(MARK)]
    if not rows:
        return {"status": "error", "error": f"exit {done.returncode}: {done.stderr[-1500:]}",
                "wall_s": round(time.perf_counter() - t0, 1)}
    return {**json.loads(rows[-1]), "wall_s": round(time.perf_counter() - t0, 1)}


def card_for(row: dict, device: str) -> GPU | None:
    if device != "cuda" or "device_memory_bytes" not in row:
        return None
    gpu = gpu_from_device(row["device"], row["device_memory_bytes"])
    return gpu if gpu.bf16_tflops else None


def speed_point(spec: dict, row: dict, gpu: GPU) -> tuple[float, float, float]:
    """(seconds at 100% MFU, billions of params x passes / 2, measured seconds) of one micro-batch, for fit_speed."""
    shape, setup = shape_of(spec["model"]), setup_of(spec)
    tokens = spec["batch"] * spec["seq"]
    ideal = flops_per_token(shape, setup, spec["seq"]) * tokens / (gpu.bf16_tflops * 1e12)
    return ideal, shape.params / 1e9 * passes(setup.gradient_checkpointing) / 2, tokens / row["measured_tok_s"]


def calibrate(results: list[tuple[dict, dict]], gpu: GPU, device_name: str) -> tuple[dict, dict]:
    """(calibration file content, {row index: leave-one-out tok/s}) from the measured rows."""
    groups: dict[str, list[int]] = {}
    for i, (spec, row) in enumerate(results):
        if row.get("status") == "ok":
            groups.setdefault(speed_key(spec["method"], shape_of(spec["model"])), []).append(i)
    entries, loo = {}, {}
    for key, idx in sorted(groups.items()):
        points = [speed_point(*results[i], gpu) for i in idx]
        fit = fit_speed(points, gpu.bf16_tflops)
        entries[key] = {"mfu": round(fit.mfu, 4), "overhead_s_per_gparam": round(fit.overhead_s_per_gparam, 6),
                        "points": fit.points}
        for j, i in enumerate(idx):
            others = points[:j] + points[j + 1:]
            if others:
                spec = results[i][0]
                cal = {key: fit_speed(others, gpu.bf16_tflops)}
                loo[i] = tokens_per_second(gpu, shape_of(spec["model"]), setup_of(spec),
                                           spec["seq"], calibration=cal)
    data = {"gpu": device_name, "gpu_tflops": gpu.bf16_tflops, "measured": time.strftime("%Y-%m-%d"),
            "command": "python bench/plan_accuracy.py --calibrate", "entries": entries}
    return data, loo


def compare(spec: dict, row: dict, gpu: GPU | None, calibration: dict[str, SpeedFit] | None) -> dict:
    shape, setup = shape_of(spec["model"]), setup_of(spec)
    mem = estimate(shape, setup)
    out = {"config": spec_name(spec), **spec, **row, "planned_gib": mem.total,
           "planned_parts_gib": {k: round(v, 3) for k, v in mem.parts().items()}}
    if row.get("measured_gib") is not None:
        out["mem_err"] = (mem.total - row["measured_gib"]) / row["measured_gib"]
    if gpu is not None:
        out["planned_tok_s"] = tokens_per_second(gpu, shape, setup, spec["seq"], calibration=calibration)
        out["planned_tok_s_uncalibrated"] = tokens_per_second(gpu, shape, setup, spec["seq"], calibration={})
        if row.get("measured_tok_s"):
            out["tok_err"] = (out["planned_tok_s"] - row["measured_tok_s"]) / row["measured_tok_s"]
        if row.get("status") == "oom":
            out["oom_predicted"] = mem.total > gpu.memory_gib
    return out


SPEC_KEYS = ("model", "method", "seq", "batch", "checkpointing")
PLANNED_KEYS = ("config", "planned_gib", "planned_parts_gib", "mem_err", "planned_tok_s", "planned_tok_s_uncalibrated",
                "tok_err", "loo_tok_err", "oom_predicted")


def measured_pair(row: dict) -> tuple[dict, dict]:
    """(spec, measurement) of a row of an earlier report, without what the planner said then."""
    return ({k: row[k] for k in SPEC_KEYS},
            {k: v for k, v in row.items() if k not in SPEC_KEYS and k not in PLANNED_KEYS})


def summarize(rows: list[dict]) -> dict:
    measured = [r for r in rows if r.get("status") == "ok"]
    mem_ok = [r for r in measured if "mem_err" in r and abs(r["mem_err"]) <= MEM_TOL]
    tok_ok = [r for r in measured if "tok_err" in r and abs(r["tok_err"]) <= TOK_TOL]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.get("status", "?")] = statuses.get(r.get("status", "?"), 0) + 1
    worst = {k: max((abs(r[k]) for r in measured if k in r), default=None) for k in ("mem_err", "tok_err")}
    return {"rows": len(rows), "statuses": statuses, "measured": len(measured),
            "memory_within_10pct": len(mem_ok), "tokens_per_s_within_25pct": len(tok_ok),
            "worst_abs_mem_err": worst["mem_err"], "worst_abs_tok_err": worst["tok_err"],
            "pass": len(measured) >= MIN_ROWS and len(mem_ok) == len(tok_ok) == len(measured)}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def parent_main(args) -> int:
    configs = TINY_CONFIGS if args.tiny else CONFIGS
    specs = [dict(zip(("model", "method", "seq", "batch", "checkpointing"), c)) for c in configs]
    specs = [s for s in specs if selected(spec_name(s), args.only)]
    results = []
    t0 = time.perf_counter()
    if args.from_json:  # compare measurements already taken with the planner as it is now: no GPU needed
        results = [measured_pair(r) for r in json.loads(Path(args.from_json).read_text())["rows"]]
        results = [(s, r) for s, r in results if selected(spec_name(s), args.only)]
    for spec in specs if not args.from_json else []:
        row = run_child(spec, args)
        results.append((spec, row))
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("status", "measured_gib", "measured_tok_s", "build_s", "wall_s", "error")}
        print(f"{spec_name(spec):40s} {json.dumps(shown)}", file=sys.stderr, flush=True)
    ok = [(s, r) for s, r in results if r.get("status") == "ok"]
    gpu = next((g for g in (card_for(r, args.device) for _, r in ok) if g), None)
    calibration, loo, cal_data = None, {}, None
    if args.calibrate and ok:
        name = ok[0][1].get("device", "cpu")
        ref = gpu or GPU("cpu", 0.0, 1.0)  # a CPU smoke test fits against a nominal 1 TFLOP/s
        cal_data, loo = calibrate(results, ref, name)
        cal_data["command"] = "python bench/plan_accuracy.py " + " ".join(sys.argv[1:])
        target = Path(args.calibration_file) if args.calibration_file else (
            CALIBRATION_FILE if args.device == "cuda" and not args.tiny else None)
        if target:
            write_json(target, cal_data)
            print(f"calibration written to {target}", file=sys.stderr)
        calibration = parse_calibration(cal_data)
    rows = []
    for i, (spec, row) in enumerate(results):
        out = compare(spec, row, card_for(row, args.device), calibration)
        if i in loo and gpu is not None and row.get("measured_tok_s"):
            out["loo_tok_err"] = (loo[i] - row["measured_tok_s"]) / row["measured_tok_s"]
        rows.append(out)
    report = {"command": "python bench/plan_accuracy.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": args.device,
              "gpu": ok[0][1].get("device") if ok else None,
              "warmup_steps": args.warmup if not args.from_json else None,
              "timed_steps": args.steps if not args.from_json else sorted({r.get("steps") for _, r in ok}),
              "measured_in": args.from_json,
              "tolerance": {"memory": MEM_TOL, "tokens_per_s": TOK_TOL}, "calibration": cal_data,
              "seconds": round(time.perf_counter() - t0, 1), "summary": summarize(rows), "rows": rows}
    if args.out:
        write_json(Path(args.out), report)
    print(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random shapes (smoke test)")
    p.add_argument("--calibrate", action="store_true", help="fit the speed model and write the calibration file")
    p.add_argument("--calibration-file", help="where --calibrate writes (default: the package's calibration.json "
                                              "on CUDA; nowhere for --tiny/--device cpu)")
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--from-json", help="re-compare the measured rows of an earlier report (no GPU needed)")
    p.add_argument("--only", help="words a configuration's name must all contain, e.g. 1B,qlora; alternatives "
                                  "separated by ';'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=150, help="seconds per configuration")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child), args.device, args.warmup, args.steps)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
