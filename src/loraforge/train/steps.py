"""The parts of an optimizer step that every objective's loop shares (train.loop's SFT step does the same
things inline): taking the step's micro-batches, the optimizer update, the position bookkeeping, the
metrics row, and the checkpoint on schedule or on a stop signal."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loraforge.train.checkpoint import TrainerState, save_checkpoint
from loraforge.train.distributed import full_value, peer_failures
from loraforge.train.flat import stepped_parameters
from loraforge.train.logprobs import wrap_logp_step
from loraforge.train.loop import (LoopSetup, TrainingInterrupted, _StopFlag, micro_batches,  # noqa: F401
                                  next_group, plan_steps)
from loraforge.train.progress import TrainProgress


@dataclass
class ObjectiveStart:
    """What the preference and GRPO loops compute from their LoopSetup before the first step."""

    device: torch.device
    pad_id: int
    per_epoch: int
    total_steps: int
    eval_every: int   # train.eval_every / save_every, auto resolved against total_steps (TrainSection.intervals)
    save_every: int
    params: list
    step_module: torch.nn.Module
    batches: Iterator
    config_yaml: str


def objective_start(setup: LoopSetup) -> ObjectiveStart:
    """The schedule, trainable parameters, log-prob module (wrap_logp_step unless given) and batch iterator
    of an objective's loop."""
    device = torch.device(setup.device)
    per_epoch, total_steps = plan_steps(len(setup.train_items), setup.cfg)
    step_module = setup.step_module if setup.step_module is not None else \
        wrap_logp_step(setup.model, setup.dist, device.type, setup.fast)
    return ObjectiveStart(device, setup.tokenizer.pad_token_id, per_epoch, total_steps,
                          *setup.cfg.train.intervals(total_steps),
                          stepped_parameters(setup.optimizer), step_module,
                          micro_batches(setup.train_items, setup.cfg, setup.state), setup.cfg.to_yaml())


@contextlib.contextmanager
def session(run_dir, tc, state: TrainerState, total_steps: int, dist):
    """(stop flag, progress bar, metrics file) for a loop's steps: SIGTERM/SIGINT become a flag, rank 0 alone
    appends to metrics.jsonl, and a dead peer becomes one clear message."""
    mlog = (run_dir / "metrics.jsonl").open("a") if dist.is_main else open(os.devnull, "w")
    with _StopFlag() as stop, TrainProgress(total_steps, state.step) as progress, mlog, \
            peer_failures(dist, tc.dist_timeout_s):
        yield stop, progress, mlog


def optimizer_step(params: list, optimizer, scheduler, max_grad_norm: float | None) -> float | None:
    """Clip, step, schedule, clear; returns the gradient norm before clipping (None when not clipping)."""
    grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) if max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def advance(state: TrainerState, group: list, per_epoch: int, n_tokens: float) -> None:
    """Move the saved position past the step's last micro-batch."""
    epoch, bi, _ = group[-1]
    state.step += 1
    state.epoch, state.batch_in_epoch = (epoch + 1, 0) if bi + 1 == per_epoch else (epoch, bi + 1)
    state.tokens_seen += int(n_tokens)


def metrics_row(state: TrainerState, per_epoch: int, loss: float, scheduler, grad_norm, n_tokens: float,
                step_start: float, t0: float, **extra) -> dict:
    tok_s = n_tokens / max(time.time() - step_start, 1e-9)
    return {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / per_epoch, 4), "loss": loss,
            **extra, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": round(tok_s, 1),
            "elapsed_s": round(time.time() - t0, 2)}


def checkpoint_or_stop(run_dir, model, optimizer, scheduler, state: TrainerState, config_yaml: str, tc,
                       total_steps: int, save_every: int, stopping: bool, signum, dist, step_module,
                       before_save=None, writer=None) -> None:
    """Save every save_every steps and when a stop signal came; after a signal, stop with a message."""
    if not (state.step % save_every == 0 or stopping):
        return
    if before_save is not None:
        before_save()
    ckpt = save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state, config_yaml, tc.keep_last,
                           dist=dist, step_module=step_module, writer=writer, background=not stopping)
    if stopping:
        name = signal.Signals(signum).name if signum is not None else "a stop signal"
        raise TrainingInterrupted(f"{name} received: stopped after step {state.step}/{total_steps}; checkpoint "
                                  f"saved in {ckpt}", hint="continue with the same command and --resume")
