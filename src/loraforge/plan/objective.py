"""Time of a run by objective: what a step computes beyond SFT's one sequence per example (a rough model).

    seconds = objective_seconds(gpu, shape, setup, data)   # == throughput.train_seconds for objective sft

- dpo/orpo/simpo train on both sides of a pair (2 rows per example); kto on one completion per example.
- dpo/kto also run the reference (adapter off) forward without gradients: with `preference.reference: cached`
  once per example (the first epoch), with `live` every time. A forward is 1 / (2 + recompute) of a LoRA
  training token's FLOPs (throughput.flops_per_token: backward through a frozen base costs one forward).
- grpo trains on G rows of prompt + completion per prompt, every completion assumed to run to
  `completion` tokens (an upper bound); before that it decodes them: `completion` decode steps per
  micro-batch of batch x G rows, each step a fixed cost per layer (transformers' generate launches
  kernels layer by layer: a guess, not measured) plus the rows' matmul FLOPs at throughput.MFU, and a
  prefill of the prompts. The decode figures are the roughest part of the plan; the output says so.
"""

from __future__ import annotations

import math
from dataclasses import replace

from loraforge.plan.gpus import GPU
from loraforge.plan.memory import PAIRED, TrainSetup
from loraforge.plan.shapes import ModelShape
from loraforge.plan.throughput import MFU, DataSize, tokens_per_example, tokens_per_second

# transformers' generate on a PEFT model decodes one token per row per step, launching each layer's kernels
# from Python: ~0.7 ms per layer per step on a recent GPU at small batch (a guess from typical HF decode
# speeds of 25-40 tokens/s for 7-8B models; not measured for loraforge).
DECODE_LAYER_SECONDS = 0.0007


def reference_passes(setup: TrainSetup, data: DataSize, live: bool = False) -> float:
    """Reference forwards per example over the run: once (cached) or every epoch (live); 0 without one."""
    if not setup.with_reference:
        return 0.0
    return data.epochs if live or setup.objective == "grpo" else min(1.0, data.epochs)


def row_tokens(setup: TrainSetup, data: DataSize) -> float:
    """Tokens of one training row: a pair's side or KTO/SFT example; GRPO's prompt (avg_tokens) + completion."""
    if setup.objective == "grpo":
        return tokens_per_example(setup, replace(data, avg_tokens=data.avg_tokens + setup.completion))
    return tokens_per_example(setup, data)


def row_context(setup: TrainSetup, data: DataSize) -> int:
    """The average attended context of a training row (GRPO's: prompt + completion)."""
    return min(data.avg_tokens + (setup.completion if setup.objective == "grpo" else 0), setup.seq)


def training_tokens(setup: TrainSetup, data: DataSize) -> float:
    """Tokens the training forward/backward computes over the whole run."""
    return data.examples * data.epochs * setup.rows * row_tokens(setup, data)


def decode_seconds(gpu: GPU, shape: ModelShape, setup: TrainSetup, data: DataSize) -> float:
    """GRPO's sampling over the run (0 for other objectives), all GPUs decoding their own prompts."""
    if setup.objective != "grpo":
        return 0.0
    rows = setup.batch * setup.generations
    flops_per_row = 2 * (shape.linear_params + shape.vocab * shape.hidden)
    rate = gpu.bf16_tflops * 1e12 * MFU
    step = shape.layers * DECODE_LAYER_SECONDS + rows * flops_per_row / rate
    prefill = rows * min(data.avg_tokens, setup.seq) * flops_per_row / rate
    micro_batches = math.ceil(data.examples / setup.batch) * data.epochs
    return micro_batches * (setup.completion * step + prefill) / setup.gpus


def objective_seconds(gpu: GPU, shape: ModelShape, setup: TrainSetup, data: DataSize, live: bool = False) -> float:
    """Wall time of the run: training tokens (+ the reference's forwards) at the training speed, + decoding."""
    speed = tokens_per_second(gpu, shape, setup, row_context(setup, data))
    forward_share = 1 / (2 + setup.gradient_checkpointing)
    reference = data.examples * setup.rows * row_tokens(setup, data) * reference_passes(setup, data, live)
    return (training_tokens(setup, data) + forward_share * reference) / speed + decode_seconds(gpu, shape, setup, data)


def run_rows(objective: str, token_lengths: list[int], max_seq: int, completion: int) -> list[int]:
    """Training rows' lengths for the trainer's examples (`loraforge train`'s token counts): a pair's count is
    both sides (each side taken as half of it, capped at max_seq: exact for sides of equal length); a GRPO
    prompt's row is the prompt + `completion` (grpo.max_new_tokens); others are cut at max_seq."""
    if objective in PAIRED:
        return [min(-(-n // 2), max_seq) for n in token_lengths]
    extra = completion if objective == "grpo" else 0
    return [min(n + extra, max_seq) for n in token_lengths]


def run_time_line(gpu: GPU, shape: ModelShape, setup: TrainSetup, lengths: list[int], epochs: float,
                  max_steps: int | None, live: bool,
                  duration=lambda s: f"{s / 60:,.0f} min") -> tuple[str, float | None]:
    """`loraforge train`'s time line for an objective other than SFT (rich markup): the training speed and the
    run's time with the reference forwards and GRPO's decoding, from the trainer's own example lengths; and the
    speed to compare with the run's measured tokens/s (None for GRPO, whose measured speed includes decoding)."""
    examples = len(lengths) * epochs
    if max_steps:
        examples = min(examples, max_steps * setup.batch * setup.grad_accum)
    completion = setup.completion if setup.objective == "grpo" else 0  # avg_tokens: a GRPO row's prompt
    data = DataSize(examples=max(1, round(examples)), epochs=1.0,
                    avg_tokens=max(1, round(sum(lengths) / len(lengths)) - completion), assumed=False)
    speed = tokens_per_second(gpu, shape, setup, row_context(setup, data))
    seconds, tokens = objective_seconds(gpu, shape, setup, data, live), training_tokens(setup, data)
    decode = decode_seconds(gpu, shape, setup, data)
    rough = f", of which ~{duration(decode)} decoding (a rough guess)" if decode else ""
    return (f"plan: ~{speed:,.0f} tokens/s training ({setup.objective}: {setup.rows} rows per example) -> "
            f"~{duration(seconds)} for {tokens / 1e6:.2f}M training tokens{rough}", None if decode else speed)
