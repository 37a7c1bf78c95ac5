"""The plan shown at the start of `loraforge train`: peak memory against the card it runs on, speed, time.

    text, fits, tokens_per_s = estimate_for_run(cfg, model.config.to_dict(), [len(t.input_ids) for t in train_items],
                                                "NVIDIA H100 80GB HBM3", 85_520_809_984, n_gpus=1)

The trainer knows what `loraforge plan` has to assume: the model's real config.json, every example's token
count (the peak comes from the longest batch, not from max_seq_length) and the GPU's name and memory. The text
is rich markup, 2-4 lines; a run that will not fit gets a yellow warning with the cheapest fix as config
overrides. On CPU it is one line (no GPU memory to check). A model `plan` cannot read (not Llama-style) gets a
one-line note: the estimate never stops a run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.markup import escape

from loraforge.errors import LoraforgeError
from loraforge.plan.calibration import speed_key
from loraforge.plan.fit import suggest
from loraforge.plan.gpus import GPU, GPUS
from loraforge.plan.inputs import setup_from_config
from loraforge.plan.memory import GIB, TrainSetup, estimate
from loraforge.plan.objective import run_rows, run_time_line
from loraforge.plan.run_speed import RunShapes, loop_parts, run_fit, run_seconds, seconds_from_parts
from loraforge.plan.shapes import shape_from_config
from loraforge.plan.throughput import tokens_per_second

if TYPE_CHECKING:
    from loraforge.config import RunConfig

# Device names that differ in speed from the table's card of the same family (torch reports "NVIDIA H100 PCIe").
_VARIANT_TFLOPS = {("h100", "pcie"): 756.0, ("h100", "nvl"): 835.0}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def gpu_from_device(name: str, memory_bytes: int) -> GPU:
    """The table's card for a CUDA device name (nearest in memory among matches), with the device's memory;
    bf16_tflops is 0 when the card is not in the table."""
    dev, memory_gib = _norm(name), memory_bytes / GIB
    family = {g: _norm(re.sub(r"\s*\d+GB$", "", g.name)) for g in GPUS}
    matches = [g for g, fam in family.items() if fam in dev]
    if not matches:
        return GPU(name, memory_gib, 0.0)
    card = min(matches, key=lambda g: (-len(family[g]), abs(g.memory_gib - memory_gib)))
    tflops = next((t for (fam, tag), t in _VARIANT_TFLOPS.items() if fam == family[card] and tag in dev),
                  card.bf16_tflops)
    return GPU(name, memory_gib, tflops)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fix_overrides(old: TrainSetup, new: TrainSetup) -> list[str] | None:
    """`key=value` config overrides that turn setup `old` into `new`; None if a change has no config key."""
    keys = {"gradient_checkpointing": ("model.gradient_checkpointing", lambda v: str(v).lower()),
            "batch": ("train.batch_size", str), "grad_accum": ("train.grad_accum", str),
            "optimizer": ("train.optimizer", str), "rank": ("lora.r", str), "seq": ("data.max_seq_length", str),
            "method": ("model.quantization", lambda v: "nf4" if v == "qlora" else "none")}
    out = []
    for field in TrainSetup.__dataclass_fields__:
        before, after = getattr(old, field), getattr(new, field)
        if before == after:
            continue
        if field not in keys:
            return None
        key, fmt = keys[field]
        out.append(f"{key}={fmt(after)}")
    return out


class RunEstimate(NamedTuple):
    text: str                     # rich markup to print
    fits: bool                    # whether the peak fits the card
    tokens_per_s: float | None    # the predicted training speed (None: no GPU or no speed model for it)


def estimate_for_run(cfg: RunConfig, model_config: dict[str, Any], token_lengths: list[int],
                     gpu_name: str | None, gpu_mem_bytes: int | None, n_gpus: int = 1,
                     shapes: RunShapes | None = None) -> RunEstimate:
    """The estimate for `cfg` on the model and data the trainer has loaded.

    `token_lengths` are the training examples' token counts; `gpu_name`/`gpu_mem_bytes` come from
    torch.cuda.get_device_properties (None on CPU); `n_gpus` data-parallel processes, `batch` per GPU.
    `shapes` (one GPU): the run's micro-batches as the trainer pads them; the speed then comes from
    plan.run_speed's product-path model (warm-up, validation and padding included), else from the loop model.
    """
    name = Path(str(model_config.get("_name_or_path") or cfg.base_model)).name or cfg.base_model
    if not token_lengths:
        return RunEstimate("plan: no training examples to estimate", True, None)
    # training rows: the trainer drops or cuts longer ones; a pair is two rows, a GRPO prompt G of prompt + completion
    lengths = run_rows(cfg.objective, token_lengths, cfg.data.max_seq_length, cfg.grpo.max_new_tokens)
    longest, avg = max(lengths), max(1, round(sum(lengths) / len(lengths)))
    try:
        shape = shape_from_config(model_config, name)
        setup = setup_from_config(cfg, shape, seq=longest, gpus=n_gpus)
        mem = estimate(shape, setup)
    except LoraforgeError as e:
        return RunEstimate(f"[dim]plan: no memory estimate for this model ({escape(str(e).splitlines()[0])})[/]",
                           True, None)
    if gpu_name is None or gpu_mem_bytes is None:
        return RunEstimate(f"[dim]plan: training on CPU; on a GPU this run would need ~{mem.total:.1f} GiB "
                           f"(`loraforge plan` compares cards)[/]", True, None)
    gpu, card = gpu_from_device(gpu_name, gpu_mem_bytes), escape(gpu_name)
    fits = mem.total <= gpu.memory_gib
    parts = sorted(mem.parts().items(), key=lambda kv: -kv[1])[:3]
    per_gpu = " per GPU" if n_gpus > 1 else ""
    phase = "" if cfg.objective == "sft" else f", {cfg.objective}'s {mem.phase} phase"
    lines = [f"plan: peak memory ~{mem.total:.1f} GiB{per_gpu} of {gpu.memory_gib:.1f} GiB on {card}{phase} (longest "
             f"{'row' if phase else 'example'} {longest} tokens x batch {setup.batch}; "
             + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts) + ")"]
    speed = None
    if gpu.bf16_tflops and cfg.objective != "sft":
        line, speed = run_time_line(gpu, shape, setup, lengths, cfg.train.epochs, cfg.train.max_steps,
                                    cfg.preference.reference == "live", _duration)
        lines.append(line)
    elif gpu.bf16_tflops and shapes is not None and n_gpus == 1:
        seconds = run_seconds(gpu, shape, setup, shapes)
        tokens = shapes.real_tokens * shapes.epochs
        speed = tokens / seconds
        lines.append(f"plan: ~{speed:,.0f} tokens/s -> ~{_duration(seconds)} for {_amount(tokens)} tokens "
                     f"({shapes.distinct} batch shapes, validation and warm-up included"
                     f"{'; first run on this machine: its kernels compile' if shapes.cold_kernels else ''})")
    elif gpu.bf16_tflops:
        speed = tokens_per_second(gpu, shape, setup, avg)
        tokens = sum(lengths) * cfg.train.epochs
        if cfg.train.max_steps:
            tokens = min(tokens, cfg.train.max_steps * setup.batch * setup.grad_accum * avg)
        lines.append(f"plan: ~{speed:,.0f} tokens/s -> ~{_duration(tokens / speed)} for {_amount(tokens)} tokens")
    if not fits:
        lines.append(f"[yellow]warning:[/] this run needs ~{mem.total:.1f} GiB but {card} has "
                     f"{gpu.memory_gib:.1f} GiB: it will likely run out of memory")
        found = suggest(shape, setup, gpu.memory_gib, limit=1)
        if found:
            fix = found[0]
            overrides = fix_overrides(setup, fix.setup)
            how = f" (add: {' '.join(overrides)})" if overrides else ""
            lines.append(f"  cheapest fix: {' + '.join(fix.changes)} -> ~{fix.total_gib:.1f} GiB{how}")
        else:
            lines.append("  no usual change makes it fit: use a larger card or several GPUs")
    return RunEstimate("\n".join(lines), fits, speed)


def speed_inputs(cfg: RunConfig, model_config: dict[str, Any], shapes: RunShapes, gpu_name: str,
                 gpu_mem_bytes: int) -> dict | None:
    """What bench/plan_runs.py fits calibration.json's "runs" from (summary.json's `plan_speed`): the run's terms
    of plan.run_speed's model (loop_parts) and the key of its (method, size class); None if unknown."""
    name = Path(str(model_config.get("_name_or_path") or cfg.base_model)).name or cfg.base_model
    try:
        shape = shape_from_config(model_config, name)
        setup = setup_from_config(cfg, shape, seq=max(n for _, n, _ in shapes.batches), gpus=1)
    except (LoraforgeError, ValueError):
        return None
    gpu = gpu_from_device(gpu_name, gpu_mem_bytes)
    if not gpu.bf16_tflops:
        return None
    parts = loop_parts(gpu, shape, setup, shapes)
    planned = seconds_from_parts(parts, run_fit(gpu, shape, setup))
    return {"key": speed_key(setup.method, shape), **{k: round(v, 4) for k, v in parts.items()},
            "planned_seconds": round(planned, 2)}


def _amount(tokens: float) -> str:
    return f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens:,.0f}"
