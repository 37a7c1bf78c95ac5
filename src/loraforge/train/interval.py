"""A metrics row's device values: what the training loop accumulates between rows and how it reads them.

LogInterval sums the steps' losses and gradient norms on the device since the last row; Readings copies a due
row's sums to the host behind the step that made them, so the loop reads them without draining the work queued
since (train.loop writes the row one step later).
"""

from __future__ import annotations

import time

import torch


class LogInterval:
    """The steps since the last metrics row: their summed loss and gradient norms stay on the device until
    the row is due (then Readings takes them to the host)."""

    def __init__(self, device):
        self.device = device
        self.reset(time.time())

    def reset(self, now: float) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float32)
        self.grad_norm = None
        self.steps = self.n_loss = self.tokens = 0
        self.since = now

    def add(self, loss_sum: torch.Tensor, n_loss: int, tokens: int, grad_norm) -> None:
        self.loss += loss_sum
        if grad_norm is not None:
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            self.grad_norm = grad_norm.float() if self.grad_norm is None else self.grad_norm + grad_norm.float()
        self.steps, self.n_loss, self.tokens = self.steps + 1, self.n_loss + n_loss, self.tokens + tokens


class Readings:
    """A due row's device values (summed loss, summed grad norm) copied to the host behind the step that made
    them. On CUDA the copies go to pinned memory and an event is recorded after them, so reading waits for that
    step only: float() of a CUDA tensor synchronises the whole stream, the step queued since included. In the
    135M BANKING77 run's profile (bench/results/train_e2e/s20/profile_135m) the host waited 4.5 ms a step so for
    the step it had just queued, then prepared and launched the next one while the GPU idled (busy 62% of the
    time). Not yet timed on a GPU with this change."""

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor | None):
        self.event = None
        if loss.is_cuda:
            stream = torch.cuda.current_stream(loss.device)   # where the copies below are queued
            loss, grad_norm = _pinned_copy(loss), None if grad_norm is None else _pinned_copy(grad_norm)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        self.loss, self.grad_norm = loss, grad_norm

    def read(self) -> tuple[float, float | None]:
        if self.event is not None:
            self.event.synchronize()
        return float(self.loss), None if self.grad_norm is None else float(self.grad_norm)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t.detach(), non_blocking=True)
