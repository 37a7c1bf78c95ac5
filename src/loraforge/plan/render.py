"""Terminal rendering of a PlanReport with rich: a summary, the memory breakdown, the GPU table, fixes."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from loraforge.plan.calibration import calibration_source
from loraforge.plan.memory import ALL_LINEAR
from loraforge.plan.objective import row_tokens
from loraforge.plan.report import PlanReport

_LABELS = {
    "weights": "weights", "quant_constants": "quantisation constants", "adapters": "LoRA adapters (fp32)",
    "gradients": "gradients", "optimizer": "optimizer states", "activations": "activations",
    "logits": "logits + loss", "kv_cache": "KV cache (generation)", "overhead": "CUDA context + allocator",
}
_OBJECTIVES = {
    "dpo": "chosen + rejected in one batch (2 rows a pair)", "orpo": "chosen + rejected in one batch, no reference",
    "simpo": "chosen + rejected in one batch, no reference", "kto": "one completion per example",
    "grpo": "G completions per prompt decoded with the adapter, then trained on",
}


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _notes(report: PlanReport) -> dict[str, str]:
    setup, mem = report.inputs.setup, report.memory
    host = setup.host_table(report.inputs.shape)   # model.host_embedding
    weights = {"qlora": "NF4 linear layers, " + ("bf16 head/norms; input embedding in host memory" if host
                                                 else "bf16 embeddings/norms"),
               "lora": "bf16, frozen" + ("; input embedding in host memory" if host else ""),
               "full": "bf16 (fp32 master copy under optimizer)"}[setup.method]
    other = "off" if setup.gradient_checkpointing else "on"
    alt = mem.activations_without_checkpointing if setup.gradient_checkpointing else mem.activations_with_checkpointing
    notes = {
        "weights": weights,
        "quant_constants": "absmax, blocksize 64, double-quant" if setup.method == "qlora" else "",
        "adapters": f"{_count(mem.trainable_params)} params" if setup.is_lora else "",
        "gradients": ("fp32, adapters only" if setup.is_lora else "bf16")
        + (", + DDP bucket copy" if setup.gpus > 1 and not setup.sharded else ""),
        "optimizer": setup.optimizer_name + (", offloaded to CPU" if setup.offload else ""),
        "activations": f"checkpointing {'on' if setup.gradient_checkpointing else 'off'} ({other}: {alt:.2f})",
        "logits": "fused cross-entropy: no logits kept" if setup.fast else "bf16 logits + fp32 loss copies",
        "kv_cache": f"bf16 k and v of {setup.batch} x {setup.generations} rows x {setup.seq} tokens",
        "overhead": "",
    }
    if mem.phase == "reference":
        notes.update(activations="reference forward, no grad (adapter off, no weight copy)",
                     logits="reference: logits at the loss positions + fp32 loss copies")
    elif mem.phase == "generation":
        notes.update(activations="prompt prefill, no grad", logits="sampling logits of one position per row")
    return notes


def _objective_line(report: PlanReport) -> str | None:
    setup, mem = report.inputs.setup, report.memory
    if setup.objective == "sft":
        return None
    what = _OBJECTIVES[setup.objective]
    if setup.objective == "grpo":
        what = (f"G={setup.generations} completions of up to {setup.completion} tokens per prompt after "
                f"{setup.seq - setup.completion} prompt tokens, decoded with the adapter, then trained on")
    if setup.with_reference:
        what += "; reference = the base with the adapter off (no weight copy)"
    phases = ", ".join(f"{k} {v:.1f}" for k, v in mem.phases.items())
    return f"objective [bold]{setup.objective}[/]: {what}\npeak in the {mem.phase} phase (GiB: {phases})"


def _summary(report: PlanReport) -> str:
    shape, setup, data = report.inputs.shape, report.inputs.setup, report.inputs.data
    size = f"{data.avg_tokens} tokens" if setup.objective == "sft" else \
        f"{setup.rows} rows of ~{row_tokens(setup, data):.0f} tokens"
    modules = "all linear layers" if setup.targets == ALL_LINEAR else ",".join(setup.targets)
    method = f"{setup.method} r{setup.rank} on {modules}" if setup.is_lora else setup.method
    gpus = f", {setup.gpus} GPUs ({setup.strategy.upper()}, memory per GPU)" if setup.gpus > 1 else ""
    lines = [
        f"[bold]{shape.name}[/] ({_count(shape.params)} params) - {method}{gpus}",
        f"seq {setup.seq}, batch {setup.batch} x grad-accum {setup.grad_accum}, checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}, {setup.optimizer_name}, packing "
        f"{'on' if setup.packing else 'off'}, {'fast path' if setup.fast else 'PEFT forward'}",
        f"data: {data.examples:,} examples x {size} x {data.epochs:g} epochs = "
        f"{report.total_tokens / 1e6:.2f}M tokens computed, {report.optimizer_steps:,} optimizer steps",
    ]
    objective = _objective_line(report)
    if objective:
        lines.append(objective)
    if data.assumed:
        lines.append("[dim](dataset size assumed: pass --examples and --avg-tokens, or a config with data.train)[/]")
    return "\n".join(lines)


def _memory_table(report: PlanReport) -> Table:
    phase = "" if report.memory.phase == "training" else f" ({report.memory.phase} phase)"
    table = Table(title=f"Peak GPU memory{phase}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("note", style="dim")
    notes = _notes(report)
    for name, gib in report.memory.parts().items():
        if gib or name == "activations":
            table.add_row(_LABELS[name], f"{gib:.2f}", notes[name])
    table.add_row("[bold]total[/]", f"[bold]{report.memory.total:.2f}[/]", "")
    return table


def _gpu_table(report: PlanReport) -> Table:
    n = report.inputs.setup.gpus
    title = f"Per GPU (max seq at batch {report.inputs.setup.batch}; time and cost for the whole dataset" + (
        f" on {n} of them)" if n > 1 else ")")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("GPU", "GiB", "fits", "max\nbatch", "max\nseq", "tok/s", "time", "USD\n/h", "cost\nUSD"):
        table.add_column(col, justify="left" if col == "GPU" else "right", no_wrap=True)
    for r in report.rows:
        table.add_row(
            r.gpu if n == 1 else f"{n} x {r.gpu}", f"{r.memory_gib:.1f}", "[green]yes[/]" if r.fits else "[red]no[/]",
            str(r.max_batch or "-"),
            f"{r.max_seq:,}" if r.max_seq else "-", f"{r.tokens_per_s:,.0f}", _duration(r.hours),
            "-" if r.usd_per_hour is None else f"{r.usd_per_hour:.2f}",
            "-" if r.cost_usd is None else f"{r.cost_usd:,.2f}",
            style=None if r.fits else "dim",
        )
    return table


def _advice(report: PlanReport) -> list[str]:
    total = report.memory.total
    lines = []
    cheapest = report.cheapest_fit
    if cheapest:
        cost = "" if cheapest.cost_usd is None else f", ${cheapest.cost_usd:,.2f}"
        lines.append(f"Cheapest card that fits: [bold]{cheapest.gpu}[/] ({_duration(cheapest.hours)}{cost}).")
    target = next((r for r in report.rows if r.gpu == report.target_gpu), None)
    if target and target.fits:
        lines.append(f"Fits on {target.gpu} with {target.memory_gib - total:.1f} GiB to spare.")
    elif target:
        lines.append(f"[red]Does not fit on {target.gpu}[/]: needs {total:.1f} GiB of {target.memory_gib:.1f}.")
        if report.suggestions:
            lines.append("Cheapest changes that make it fit:")
            lines += [f"  {i}. {' + '.join(s.changes)} -> {s.total_gib:.1f} GiB"
                      for i, s in enumerate(report.suggestions, 1)]
        else:
            lines.append("No combination of the usual changes makes it fit; use a larger card or several GPUs.")
    elif not all(r.fits for r in report.rows):
        lines.append("[dim]Pass --gpu NAME for the cheapest changes that make it fit on that card.[/]")
    return lines


def render(report: PlanReport, console: Console | None = None) -> None:
    """Print the report to the terminal."""
    console = console or Console(highlight=False)
    console.print(_summary(report))
    console.print(_memory_table(report))
    console.print(_gpu_table(report))
    for line in _advice(report):
        console.print(line)
    speed = calibration_source() or "speed assumes the MFU in plan/throughput.py"
    console.print(f"[dim]Estimates; {speed}. Prices: {report.prices_source}.[/]")
    if report.inputs.setup.objective == "grpo":
        console.print("[dim]GRPO's time is a rough guess: completions assumed full length, decoding at a per-layer "
                      "step cost that is not measured (plan/objective.py).[/]")
