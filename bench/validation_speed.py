"""Validation's speed with the old token budget of a forward (the largest training batch's tokens) against the
new one (that budget times model.fast.memory's multiplier), on the run bench/train_e2e.py calls 135m-snips.

    python bench/validation_speed.py --train .e2e/snips-train.jsonl --val .e2e/snips-val.jsonl --smol .e2e/tok \\
        --out $OUT/validation_speed.json
    python bench/validation_speed.py --train T.jsonl --val V.jsonl --smol TOKDIR --cpu-smoke --out /tmp/v.json

The run is train_e2e.py's 135m-snips config (SmolLM2-135M: --smol's weights, or its shape with random weights
when --smol holds the tokenizer only, built once into --cache), set up by loraforge's own stages
(train.run.TrainingRun: check, load_model, load_data, prepare: the fast path, the CUDA graphs decision, the
validation multiplier, the optimizer); nothing is written to its output_dir. A few training steps of the largest
training batch then compile the kernels, capture the graphs and give training's peak memory. Then
train.loop.evaluate_loss over the validation file, as train_loop calls it: one warm-up pass with each budget, then
--repeats passes of each, alternated. --cpu-smoke: the same on the CPU with a tiny random Llama (12 layers, hidden
64) and the fast path on, fp32 (a smoke test of the script, no timing worth reading).

Writes one JSON object (--out and stdout): per budget its max_tokens, forwards per pass, the seconds of each pass,
the peak allocated GPU memory of each (absolute, and above what was allocated before the pass), and the loss;
training's peak beside them; and torch.profiler's tables of one warm pass with the new budget, the top 30
operators by self CPU time and by self device time, as validation_profile_cpu.txt and validation_profile_gpu.txt
beside the JSON (next to --out, else in --cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402
from _peers import tiny_llama  # noqa: E402

RUN = "135m-snips"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=True)


def tiny_model(tokenizer_dir: str, cache: Path) -> str:
    """A random Llama of TINY's shape with the tokenizer's vocabulary, built once on the CPU (--cpu-smoke)."""
    return tiny_llama(tokenizer_dir, cache / "model-tiny-val", TINY)


def run_config(train: Path, val: Path, model_dir: str, cache: Path, cpu: bool) -> dict:
    """train_e2e.py's 135m-snips config; on the CPU with the fast path on, in fp32."""
    from train_e2e import RUNS, loraforge_config

    spec = {**RUNS[RUN], "epochs": 1.0, "model_dir": model_dir, "train": str(train), "val": str(val)}
    cfg = loraforge_config(spec, cache / "work")
    if cpu:
        cfg["model"]["fast_path"] = "on"
        cfg["train"].update(device="cpu", precision="fp32")
    return cfg


def setup(cfg: dict):
    """The run as `loraforge train` sets it up, up to the training loop (no run folder written)."""
    from loraforge.config import build_config
    from loraforge.train.run import TrainingRun

    run = TrainingRun(build_config(cfg), resume=False, overwrite=True, dir_ready=False, with_changes=False,
                      profile=None, tools=None)
    run.check()
    run.load_model()
    run.load_data()
    run.prepare()
    return run


class Counter:
    """The step module, counting its forwards (evaluate_loss calls it once a forward)."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __call__(self, batch):
        self.calls += 1
        return self.module(batch)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2 ** 30, 4)


class Peak:
    """Peak allocated GPU memory over a block: absolute and above what was allocated at its start (None on CPU)."""

    def __init__(self, device):
        self.device, self.peak, self.above = device, None, None

    def __enter__(self):
        import torch

        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        _sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.above = self.peak - self.start


def train_steps(run, device, steps: int) -> dict:
    """`steps` optimizer steps of the run's largest training batch, padded as train_loop pads it (the first two of
    its shape run eagerly, then CUDA graphs replay it where the run has them): kernels compiled, training's peak."""
    from loraforge.data.batching import collate
    from loraforge.train.loop import seed_micro_batch, share_prefix_tokens, to_device

    cfg, bs = run.cfg, run.cfg.train.batch_size
    share = share_prefix_tokens(cfg, device, run.buckets)
    items = sorted(run.train_items, key=lambda t: len(t.input_ids))[-bs:]
    host = collate(items, run.tokenizer.pad_token_id, run.buckets, bs if run.buckets else None, share)
    run.model.train()
    with Peak(device) as peak:
        for step in range(steps):
            batch = to_device(host, device)
            seed_micro_batch(device, cfg.seed, step, 0)
            with run.precision.autocast():
                s, n = run.step_module(batch)
            run.precision.backward(s / max(n, 1))
            run.precision.step(run.optimizer)
            run.optimizer.zero_grad(set_to_none=True)
    return {"steps": steps, "rows": bs, "tokens": int(host["input_ids"].numel()), "graphs": bool(run.buckets),
            "peak_allocated_gib": _gib(peak.peak), "peak_above_start_gib": _gib(peak.above)}


def validation_pass(run, device, layout: dict) -> dict:
    """One evaluate_loss over the validation items with `layout`, as train_loop calls it."""
    from loraforge.train.loop import evaluate_loss, share_prefix_tokens

    counter = Counter(run.step_module)
    with Peak(device) as peak:
        t0 = time.perf_counter()
        loss = evaluate_loss(run.model, run.val_items, **layout, pad_id=run.tokenizer.pad_token_id, device=device,
                             autocast=run.precision.autocast, fast=run.fast, step_module=counter,
                             share_prefix=share_prefix_tokens(run.cfg, device, run.buckets))
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "forwards": counter.calls, "loss": float(loss), "peak": peak.peak,
            "above": peak.above}


def profile_tables(fn, device) -> tuple[str, str]:
    """torch.profiler's top 30 operators of one call of fn: by self CPU time, and by self device time (on the CPU,
    with no device, by total CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        _sync(device)
    table = prof.key_averages()
    cpu = table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    if not cuda:
        return cpu, "(CPU run: no device time; by total CPU time)\n" + table.table(
            sort_by="cpu_time_total", row_limit=30, max_name_column_width=70)
    # newer torch names it self_device_time_total and reads "cuda" in sort_by as "device"
    return cpu, table.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)


def measure(run, device, repeats: int, train_steps_n: int, profile_dir: Path) -> dict:
    """Training steps, then validation passes with each budget (a warm-up, then `repeats` alternated), then the
    profile of one warm pass with the new budget."""
    from loraforge.train.validation_forwards import loss_fraction, validation_layout

    train = train_steps(run, device, train_steps_n)
    layouts = {"old": validation_layout(run.cfg, run.train_items),
               "new": validation_layout(run.cfg, run.train_items, run.val_scale)}
    passes: dict[str, list[dict]] = {"old": [], "new": []}
    for name, layout in layouts.items():   # warm-up: kernels for the new shapes, the allocator's blocks
        validation_pass(run, device, layout)
    for _ in range(repeats):
        for name, layout in layouts.items():
            passes[name].append(validation_pass(run, device, layout))
    cpu, gpu = profile_tables(lambda: validation_pass(run, device, layouts["new"]), device)
    profile_dir.mkdir(parents=True, exist_ok=True)
    (profile_dir / "validation_profile_cpu.txt").write_text(cpu)
    (profile_dir / "validation_profile_gpu.txt").write_text(gpu)
    budgets = {}
    for name, rows in passes.items():
        seconds = [round(r["seconds"], 4) for r in rows]
        budgets[name] = {"max_tokens": layouts[name]["max_tokens"], "rows_at_least": layouts[name]["batch_size"],
                         "forwards": rows[0]["forwards"], "seconds": seconds,
                         "median_seconds": round(statistics.median(seconds), 4),
                         "ms_per_forward": round(1000 * statistics.median(seconds) / max(rows[0]["forwards"], 1), 2),
                         "peak_allocated_gib": [_gib(r["peak"]) for r in rows],
                         "peak_above_start_gib": [_gib(r["above"]) for r in rows], "loss": rows[0]["loss"],
                         "losses": [r["loss"] for r in rows]}
    old, new = budgets["old"], budgets["new"]
    return {"scale": round(run.val_scale, 4), "loss_fraction": round(loss_fraction(run.val_items), 4),
            "validation_examples": len(run.val_items), "train_steps": train, "budgets": budgets,
            "speedup": round(old["median_seconds"] / max(new["median_seconds"], 1e-9), 3),
            "loss_rel_diff": abs(new["loss"] - old["loss"]) / max(abs(old["loss"]), 1e-12),
            "profile": {"cpu": str(profile_dir / "validation_profile_cpu.txt"),
                        "device": str(profile_dir / "validation_profile_gpu.txt")}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="the e2e's snips-train.jsonl")
    ap.add_argument("--val", type=Path, required=True, help="the e2e's snips-val.jsonl")
    ap.add_argument("--smol", required=True, help="SmolLM2-135M(-Instruct)'s HF folder, or its tokenizer alone")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lf-valspeed"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny random Llama on the CPU (smoke test)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    import torch

    a.cache.mkdir(parents=True, exist_ok=True)
    if a.cpu_smoke:
        model_dir, weights = tiny_model(a.smol, a.cache), "random (tiny)"
    else:
        from train_e2e import RUNS, has_weights, model_dir as e2e_model_dir

        dtype = torch.get_default_dtype()   # train_speed.make_model sets bf16 for the process: put back
        model_dir = e2e_model_dir(RUNS[RUN]["model"], a.smol, a.cache)   # SmolLM2's weights, or its shape
        torch.set_default_dtype(dtype)
        weights = "real" if has_weights(a.smol) else "random"
    run = setup(run_config(a.train, a.val, model_dir, a.cache, a.cpu_smoke))
    device = torch.device("cuda", 0) if run.device == "cuda" else torch.device(run.device)
    shape = run.model.config
    result = {"command": " ".join(sys.argv if argv is None else ["bench/validation_speed.py", *argv]),
              "device": torch.cuda.get_device_name(0) if run.device == "cuda" else "cpu", "torch": torch.__version__,
              "run": RUN, "weights": weights, "fast_path": run.fast is not None,
              "model": {k: getattr(shape, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                      "vocab_size")},
              **measure(run, device, a.repeats, a.train_steps, a.out.parent if a.out else a.cache)}
    emit(result, a.out)
    return result


if __name__ == "__main__":
    main()
