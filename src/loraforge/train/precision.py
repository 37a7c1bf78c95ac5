"""Compute precision of a training run: which autocast dtype, and fp16's loss scaling.

`train.precision`: fp32 (no autocast), bf16 (autocast to bfloat16; refused where the device has none),
fp16 (autocast to float16 with a `torch.amp.GradScaler`: the loss is scaled up before backward so small
gradients do not underflow, the gradients are unscaled before clipping, and a step whose gradients
overflowed is skipped while the scale backs off), auto (bf16 where the device has it; else fp16 on a CUDA
GPU, the T4/V100 case; else fp32).

The training loop calls `backward`, `unscale` (before clipping) and `step` instead of the plain calls; the
scaler's state is kept in the TrainerState so a resumed run continues with the same scale. Under FSDP2 each
process holds a shard of the gradients, so the scaler is torch's ShardedGradScaler, which agrees across the
processes on whether a step overflowed (under DDP the gradients are already the same on every process).
"""

from __future__ import annotations

import contextlib

import torch

from loraforge.errors import LoraforgeError


def has_bf16(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_precision(requested: str, device: str) -> str:
    """fp32 | bf16 | fp16: what `requested` means on this device."""
    if requested == "bf16" and not has_bf16(device):
        raise LoraforgeError(f"train.precision=bf16 but this {device} has no bf16 support",
                             hint="use train.precision=fp16 on a GPU, fp32 (or auto)")
    if requested != "auto":
        return requested
    if has_bf16(device):
        return "bf16"
    return "fp16" if device == "cuda" else "fp32"


class Precision:
    """Autocast and (fp16) loss scaling for one run."""

    DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str, device: str, backward=None, sharded: bool = False):
        self.name, self.device = name, device
        self.dtype = self.DTYPES[name]
        self.scaler = None
        if name == "fp16" and sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device)
        elif name == "fp16":
            self.scaler = torch.amp.GradScaler(device)
        self._backward = backward or (lambda loss: loss.backward())
        self.state = None  # the TrainerState the scaler's state is kept in (see track)

    @classmethod
    def for_run(cls, requested: str, device: str, backward=None, sharded: bool = False) -> Precision:
        return cls(pick_precision(requested, device), device, backward, sharded)

    def autocast(self):
        return torch.autocast(self.device, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._backward(self.scaler.scale(loss) if self.scaler else loss)

    def unscale(self, optimizer) -> None:
        """Before clipping: the gradients back at their true size (once per step)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """optimizer.step(), or with fp16 the scaler's step (skipped on inf/NaN gradients) and update.
        Returns whether the step was taken."""
        if not self.scaler:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.state is not None:
            self.state.grad_scaler = self.scaler.state_dict()
        return self.scaler.get_scale() >= scale  # the scale backs off only when the step was skipped

    def track(self, state) -> None:
        """Keep the scaler's state in `state` (saved with checkpoints); restore it from there on resume."""
        self.state = state
        if self.scaler and getattr(state, "grad_scaler", None):
            self.scaler.load_state_dict(state.grad_scaler)
