"""The common GPUs `plan` compares: usable memory and peak dense bf16 tensor throughput.

Memory is `nvidia-smi --query-gpu=memory.total` in MiB / 1024 (what the driver exposes, before the CUDA
context takes its share). TFLOP/s is the vendor's peak dense bf16/fp16 tensor figure with fp32 accumulation,
no sparsity (NVIDIA Ampere/Ada/Hopper whitepapers and datasheets; GeForce cards run fp32 accumulation at half
the fp16-accumulate rate). `--gpu` accepts any unambiguous part of a name: `4090`, `h100`, `a100-80`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from loraforge.errors import LoraforgeError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float


GPUS: tuple[GPU, ...] = (
    GPU("RTX 3060 12GB", 12288 / 1024, 25.6),
    GPU("RTX 4070 Ti 12GB", 12282 / 1024, 80.2),
    GPU("RTX 3090 24GB", 24576 / 1024, 71.0),
    GPU("RTX 4090 24GB", 24564 / 1024, 165.2),
    GPU("L4 24GB", 23034 / 1024, 121.0),
    GPU("A10G 24GB", 23028 / 1024, 70.0),  # AWS's A10 variant runs lower clocks than the A10 (125)
    GPU("A100 40GB", 40960 / 1024, 312.0),
    GPU("A100 80GB", 81920 / 1024, 312.0),
    GPU("H100 80GB", 81559 / 1024, 989.4),  # SXM; the PCIe card peaks at 756
    GPU("H200 141GB", 143771 / 1024, 989.4),
)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def find_gpu(name: str, gpus: tuple[GPU, ...] = GPUS) -> GPU:
    """The one card whose name contains `name` (ignoring case, spaces and dashes)."""
    query = _norm(name)
    exact = [g for g in gpus if _norm(g.name) == query]
    matches = exact or [g for g in gpus if query and query in _norm(g.name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LoraforgeError(f"GPU '{name}' is ambiguous: {', '.join(g.name for g in matches)}",
                             hint="add the memory size, e.g. 'A100 80GB'")
    close = difflib.get_close_matches(name, [g.name for g in gpus], n=2, cutoff=0.3)
    maybe = f" Did you mean {' or '.join(close)}?" if close else ""
    raise LoraforgeError(f"unknown GPU '{name}'.{maybe}", hint="choose one of: " + ", ".join(g.name for g in gpus))
