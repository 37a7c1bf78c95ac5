"""Which attention kernels run while a model decodes (eval generation, `loraforge chat`, `loraforge serve`),
and in the trainer's validation forwards (a new padded shape per batch).

On CUDA, SDPA's cuDNN backend builds an execution plan for every new (batch, key length) shape, and
decoding meets a new key length at every step: on an H100, batched greedy generation for evaluation took
5.81 s with cuDNN allowed and 1.87 s without (bench/results/eval_generate_gpu.json, --compare-backends).
So generation (and validation) runs with flash / memory-efficient / math attention; training steps keep torch's
default choice.
"""

from __future__ import annotations

import contextlib


def decode_attention(device, cudnn: bool = False):
    """A context for the decoding forwards on `device` (thread-local: enter it in the thread that decodes)."""
    if getattr(device, "type", device) != "cuda" or cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
