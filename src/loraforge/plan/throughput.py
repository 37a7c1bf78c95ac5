"""Training speed from FLOPs: tokens/s = achievable TFLOP/s / FLOPs per token, then time for a dataset.

A forward pass costs 2 FLOPs per weight per token (the linear layers and the lm_head) plus causal attention,
2 * layers * q_dim * context per token (QK^T and AV at half the context on average). Backward costs twice the
forward when weights are trained (full fine-tuning: 6N in total) but only once for a frozen base (LoRA: no
weight grads, 4N), and gradient checkpointing adds one more forward (Chinchilla/PaLM-style accounting).
Where calibration.json has an entry for the method and model size (fitted from GPU measurements by
bench/plan_accuracy.py --calibrate), its utilisation and fixed cost per step replace the MFU guess below.
Several GPUs (data parallel) multiply the speed by gpus x MULTI_GPU_EFFICIENCY.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraforge.plan.calibration import SpeedFit, load_calibration, speed_key, step_seconds
from loraforge.plan.gpus import GPU
from loraforge.plan.memory import TrainSetup, adapter_params
from loraforge.plan.shapes import ModelShape

# Model FLOPs utilisation reached by a plain PyTorch + SDPA training loop; a guess from published fine-tuning
# runs (30-45% on A100/H100). Calibration against bench/results/ measurements will replace it per GPU.
MFU = 0.35
# bitsandbytes dequantises NF4 weights in every matmul: QLoRA steps run ~25-40% slower than bf16 LoRA.
QLORA_SPEED = 0.75
# Offloaded optimizer states (full fine-tuning) move weights/grads over PCIe every step (ZeRO-Offload).
OFFLOAD_SPEED = 0.6
# Without packing, a batch pads to its longest example: extra tokens computed, as a fraction of the real ones.
PADDING_WASTE = 0.25
# Data-parallel scaling: N GPUs run at N x this fraction of one GPU's speed (gradient all-reduce and FSDP
# all-gathers are not fully hidden behind compute). Measured on 2 x H200, Llama-3.1-8B QLoRA on the fast path
# (bench/results/multi_gpu/): DDP 0.93-1.03 over three calls, FSDP2 0.88 (gathered head) and 0.93 (sharded head);
# Llama-3.1-70B QLoRA under FSDP2 0.91.
MULTI_GPU_EFFICIENCY = 0.9


@dataclass(frozen=True)
class DataSize:
    """How much training there is: examples x epochs of about `avg_tokens` tokens each."""

    examples: int = 1000
    epochs: float = 3.0
    avg_tokens: int = 512
    assumed: bool = True  # True when the numbers are defaults, not read from the user or the data


def flops_per_token(shape: ModelShape, setup: TrainSetup, context: int) -> float:
    """Training FLOPs (forward + backward [+ recompute]) per token at an average attended context."""
    matmul_fwd = 2 * (shape.linear_params + shape.vocab * shape.hidden)
    attention_fwd = 2 * shape.layers * shape.q_dim * context
    recompute = 1 if setup.gradient_checkpointing else 0
    if not setup.is_lora:
        return (3 + recompute) * (matmul_fwd + attention_fwd)
    adapter = 2 * adapter_params(shape, setup)
    return (2 + recompute) * matmul_fwd + (3 + recompute) * (attention_fwd + adapter)


def seconds_per_micro_batch(gpu: GPU, shape: ModelShape, setup: TrainSetup, rows: int, length: int,
                            context: int, calibration: dict[str, SpeedFit] | None = None) -> float:
    """Seconds of one micro-batch of `rows` x `length` tokens attending over `context` tokens, on one GPU.

    `calibration` defaults to the committed calibration.json; pass {} for the uncalibrated MFU model.
    """
    fit = (load_calibration() if calibration is None else calibration).get(speed_key(setup.method, shape))
    flops = flops_per_token(shape, setup, context) * rows * length
    if fit:
        seconds = step_seconds(fit, flops, gpu.bf16_tflops, shape.params, setup.gradient_checkpointing)
    else:
        seconds = flops / (gpu.bf16_tflops * 1e12 * MFU * (QLORA_SPEED if setup.method == "qlora" else 1))
    if setup.offload and not setup.is_lora:
        seconds /= OFFLOAD_SPEED
    return seconds


def tokens_per_second(gpu: GPU, shape: ModelShape, setup: TrainSetup, context: int,
                      calibration: dict[str, SpeedFit] | None = None) -> float:
    """Tokens/s of all `setup.gpus` GPUs together, for micro-batches of `setup.batch` x `context` tokens.

    `calibration` defaults to the committed calibration.json; pass {} for the uncalibrated MFU model.
    """
    seconds = seconds_per_micro_batch(gpu, shape, setup, setup.batch, context, context, calibration)
    scale = setup.gpus * (MULTI_GPU_EFFICIENCY if setup.gpus > 1 else 1.0)
    return setup.batch * context / seconds * scale


def tokens_per_example(setup: TrainSetup, data: DataSize) -> float:
    """Tokens computed per example: truncated to seq, plus padding when batches are not packed."""
    real = min(data.avg_tokens, setup.seq)
    waste = PADDING_WASTE if setup.batch > 1 and not setup.packing else 0.0
    return min(real * (1 + waste), setup.seq)


def total_tokens(setup: TrainSetup, data: DataSize) -> float:
    return data.examples * data.epochs * tokens_per_example(setup, data)


def optimizer_steps(setup: TrainSetup, data: DataSize) -> int:
    rows = data.examples if not setup.packing else math.ceil(data.examples * min(data.avg_tokens, setup.seq)
                                                             / setup.seq)
    # grad_accum counts the micro-batches of one step over all GPUs (as the trainer deals them out), so
    # a config makes the same optimizer steps on any GPU count
    return math.ceil(data.epochs * math.ceil(rows / (setup.batch * setup.grad_accum)))


def train_seconds(gpu: GPU, shape: ModelShape, setup: TrainSetup, data: DataSize) -> float:
    context = min(data.avg_tokens, setup.seq)
    return total_tokens(setup, data) / tokens_per_second(gpu, shape, setup, context)
