"""The whole plan: memory breakdown, one row per GPU (fit, limits, speed, time, cost) and suggestions.

    report = plan_run(from_config(load_config("run.yaml")), gpu="RTX 4090")
    print(report.to_json())

With `gpu`, suggestions target that card; without it they target the largest card when none fits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraforge.plan.fit import Suggestion, max_batch, max_seq, suggest
from loraforge.plan.gpus import GPU, GPUS, find_gpu
from loraforge.plan.inputs import PlanInputs
from loraforge.plan.memory import MemoryBreakdown, estimate
from loraforge.plan.prices import PRICES_SOURCE, load_prices
from loraforge.plan.calibration import load_runs, speed_key
from loraforge.plan.objective import objective_seconds, row_context, training_tokens
from loraforge.plan.run_speed import approx_shapes, run_seconds
from loraforge.plan.throughput import optimizer_steps, tokens_per_second


@dataclass(frozen=True)
class GpuRow:
    """One card (times setup.gpus): does the setup fit per GPU, how far it stretches, and what the dataset costs."""

    gpu: str
    memory_gib: float
    fits: bool
    max_batch: int
    max_seq: int
    tokens_per_s: float
    hours: float
    usd_per_hour: float | None
    cost_usd: float | None


@dataclass(frozen=True)
class PlanReport:
    inputs: PlanInputs
    memory: MemoryBreakdown
    rows: tuple[GpuRow, ...]
    target_gpu: str | None
    suggestions: tuple[Suggestion, ...]
    total_tokens: float
    optimizer_steps: int
    prices_source: str

    @property
    def cheapest_fit(self) -> GpuRow | None:
        """The card that finishes the dataset for the least money (fastest where prices are missing)."""
        fitting = [r for r in self.rows if r.fits]
        return min(fitting, key=lambda r: (r.cost_usd is None, r.cost_usd or 0.0, r.hours), default=None)

    def to_dict(self) -> dict[str, Any]:
        shape, setup, data = self.inputs.shape, self.inputs.setup, self.inputs.data
        cheapest = self.cheapest_fit
        return {
            "model": {**asdict(shape), "params": shape.params},
            "setup": asdict(setup),
            "data": {**asdict(data), "total_tokens": self.total_tokens, "optimizer_steps": self.optimizer_steps},
            "memory_gib": self.memory.to_dict(),
            "gpus": [asdict(r) for r in self.rows],
            "cheapest_fit": cheapest.gpu if cheapest else None,
            "target_gpu": self.target_gpu,
            "suggestions": [{"changes": list(s.changes), "total_gib": s.total_gib, "penalty": s.penalty}
                            for s in self.suggestions],
            "prices_source": self.prices_source,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _row(inputs: PlanInputs, gpu: GPU, total_gib: float, price: float | None) -> GpuRow:
    shape, setup, data = inputs.shape, inputs.setup, inputs.data
    seconds = objective_seconds(gpu, shape, setup, data, inputs.reference_live)
    context = row_context(setup, data)
    speed = tokens_per_second(gpu, shape, setup, context)
    if setup.objective == "sft" and setup.gpus == 1 and speed_key(setup.method, shape) in load_runs():
        # the product-path fit (plan.run_speed), as `train` prints it
        shapes = approx_shapes(setup, data, inputs.eval_every)
        seconds = run_seconds(gpu, shape, setup, shapes)
        speed = shapes.real_tokens * shapes.epochs / seconds
    hours = seconds / 3600
    return GpuRow(
        gpu=gpu.name, memory_gib=gpu.memory_gib, fits=total_gib <= gpu.memory_gib,
        max_batch=max_batch(shape, setup, gpu.memory_gib), max_seq=max_seq(shape, setup, gpu.memory_gib),
        tokens_per_s=speed, hours=hours,
        usd_per_hour=None if price is None else price * setup.gpus,  # all the run's cards together
        cost_usd=None if price is None else hours * price * setup.gpus,
    )


def plan_run(inputs: PlanInputs, gpu: str | None = None, prices_file: str | Path | None = None,
             gpus: tuple[GPU, ...] = GPUS) -> PlanReport:
    """Estimate `inputs` on every card in `gpus`; suggest changes for `gpu` (or the largest) if it does not fit.

    `prices_file` (YAML/JSON, GPU name -> USD/hour) overrides entries of the default price table.
    """
    prices = load_prices(prices_file)
    source = PRICES_SOURCE if prices_file is None else f"{PRICES_SOURCE}; overridden by {prices_file}"
    memory = estimate(inputs.shape, inputs.setup)
    rows = tuple(_row(inputs, g, memory.total, prices.get(g.name)) for g in gpus)
    target = find_gpu(gpu, gpus) if gpu else None
    if target is None and not any(r.fits for r in rows):
        target = max(gpus, key=lambda g: g.memory_gib)
    suggestions = suggest(inputs.shape, inputs.setup, target.memory_gib) if target else []
    return PlanReport(
        inputs=inputs, memory=memory, rows=rows, target_gpu=target.name if target else None,
        suggestions=tuple(suggestions), total_tokens=training_tokens(inputs.setup, inputs.data),
        optimizer_steps=optimizer_steps(inputs.setup, inputs.data), prices_source=source,
    )
