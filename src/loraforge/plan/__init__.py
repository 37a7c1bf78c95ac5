"""Plan a fine-tuning run before renting a GPU: peak memory, fit per card, tokens/s, wall time and cost.

    loraforge plan run.yaml --gpu "RTX 4090"
    loraforge plan --model llama-3.1-8b --method qlora --seq 4096 --json

    from loraforge.plan import estimate, resolve_shape, from_config, plan_run
    mem = estimate(resolve_shape("llama-3.1-8b"), method="qlora", seq=2048, batch=1)
    report = plan_run(from_config(load_config("run.yaml")), gpu="4090")

Pure arithmetic on a model's shape (no torch, no weights, no downloads): shapes.py reads config.json or a
built-in table, memory.py counts bytes, throughput.py counts FLOPs, fit.py searches limits and fixes,
prices.py holds the editable price table, report.py assembles it all and render.py prints it. calibration.py
reads the speed fitted from GPU runs (bench/plan_accuracy.py); for_run.py is the estimate `loraforge train`
prints before it starts.
"""

from loraforge.plan.fit import Suggestion, max_batch, max_seq, suggest
from loraforge.plan.gpus import GPU, GPUS, find_gpu
from loraforge.plan.inputs import PlanInputs, from_config
from loraforge.plan.memory import MemoryBreakdown, TrainSetup, estimate
from loraforge.plan.prices import DEFAULT_PRICES, load_prices
from loraforge.plan.report import GpuRow, PlanReport, plan_run
from loraforge.plan.shapes import KNOWN_MODELS, ModelShape, resolve_shape
from loraforge.plan.throughput import DataSize, flops_per_token, tokens_per_second

__all__ = [
    "DEFAULT_PRICES", "GPU", "GPUS", "KNOWN_MODELS", "DataSize", "GpuRow", "MemoryBreakdown", "ModelShape",
    "PlanInputs", "PlanReport", "Suggestion", "TrainSetup", "estimate", "find_gpu", "flops_per_token",
    "from_config", "load_prices", "max_batch", "max_seq", "plan_run", "resolve_shape", "suggest",
    "tokens_per_second",
]
