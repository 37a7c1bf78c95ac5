"""The training loop: read it top to bottom.

One optimizer step = `grad_accum` micro-batches. The loss is the sum of token losses over the whole
step divided by the number of loss tokens in the step, so every token weighs the same whatever the
padding or batch split (not a mean of per-batch means). Logits are computed only at positions that
carry loss, never for the whole sequence. Checkpoints are written every `save_every` steps and when
SIGTERM/SIGINT arrives (after the step in progress); a resumed run replays the same batch order and
RNG states, so it ends with the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraforge.config import RunConfig
from loraforge.data.batching import batch_order, collate
from loraforge.data.templates import IGNORE_INDEX, Tokenized
from loraforge.errors import LoraforgeError
from loraforge.train.checkpoint import TrainerState, save_checkpoint
from loraforge.train.progress import TrainProgress


class TrainingInterrupted(LoraforgeError):
    """Raised after a checkpoint was saved in answer to SIGTERM/SIGINT."""


@dataclass
class LoopResult:
    state: TrainerState
    final_train_loss: float | None
    final_val_loss: float | None
    seconds: float


def split_model(model):
    """(decoder, lm_head) of a causal LM (PEFT-wrapped or not), or None when the model needs its own
    forward (logit soft-capping, custom heads)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def loss_sum(model, batch: dict, parts=None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the loss tokens of a batch, and their count."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    if parts is None:  # the plain path: the model's own forward builds every logit
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum"), n
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum"), n


@torch.no_grad()
def evaluate_loss(model, items: list[Tokenized], batch_size: int, pad_id: int, device, autocast) -> float:
    was_training = model.training
    model.eval()
    parts = split_model(model)
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in collate([items[i] for i in order[start:start + batch_size]],
                                                     pad_id).items()}
        with autocast():
            s, n = loss_sum(model, batch, parts)
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def plan_steps(n_items: int, cfg: RunConfig) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps in the run)."""
    per_epoch = math.ceil(n_items / cfg.train.batch_size)
    total_micro = max(1, round(per_epoch * cfg.train.epochs))
    steps = math.ceil(total_micro / cfg.train.grad_accum)
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    return per_epoch, steps


def micro_batches(items: list[Tokenized], cfg: RunConfig, state: TrainerState) -> Iterator[tuple[int, int, list]]:
    """(epoch, index in epoch, items) from the saved position onwards, for ever (the caller stops)."""
    lengths = [len(t.input_ids) for t in items]
    epoch, start = state.epoch, state.batch_in_epoch
    while True:
        order = batch_order(lengths, cfg.train.batch_size, cfg.seed, epoch)
        for bi in range(start, len(order)):
            yield epoch, bi, [items[i] for i in order[bi]]
        epoch, start = epoch + 1, 0


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (restored on exit)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train_loop(model, tokenizer, optimizer, scheduler, accelerator, autocast, train_items: list[Tokenized],
               val_items: list[Tokenized], cfg: RunConfig, run_dir: Path, state: TrainerState,
               log=print) -> LoopResult:
    tc = cfg.train
    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    per_epoch, total_steps = plan_steps(len(train_items), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    parts = split_model(model)
    metrics_path = run_dir / "metrics.jsonl"
    config_yaml = cfg.to_yaml()
    batches = micro_batches(train_items, cfg, state)
    last_train = None
    val_loss = state.history[-1]["val_loss"] if state.history else None
    t0 = time.time()
    model.train()

    with _StopFlag() as stop, TrainProgress(total_steps, state.step) as progress, metrics_path.open("a") as mlog:
        while state.step < total_steps:
            # 1. gather this step's micro-batches and count its loss tokens
            group = []
            for _ in range(tc.grad_accum):
                epoch, bi, items = next(batches)
                group.append((epoch, bi, collate(items, pad_id)))
                if epoch * per_epoch + bi + 1 >= round(per_epoch * tc.epochs):
                    break  # the last micro-batch of the run
            n_loss = sum(int((g[2]["labels"][:, 1:] != IGNORE_INDEX).sum()) for g in group)
            n_tokens = sum(int(g[2]["attention_mask"].sum()) for g in group)

            # 2. forward + backward, each micro-batch weighted by its share of the step's loss tokens
            step_start, step_loss = time.time(), 0.0
            for _, _, batch in group:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast():
                    s, _ = loss_sum(model, batch, parts)
                accelerator.backward(s / n_loss)
                step_loss += float(s.detach())

            # 3. clip, step, schedule
            grad_norm = None
            if tc.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(params, tc.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # 4. bookkeeping: position, metrics, validation, checkpoint
            epoch, bi, _ = group[-1]
            state.step += 1
            state.epoch, state.batch_in_epoch = (epoch + 1, 0) if bi + 1 == per_epoch else (epoch, bi + 1)
            state.tokens_seen += n_tokens
            last_train = step_loss / n_loss
            tok_s = n_tokens / max(time.time() - step_start, 1e-9)
            row = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / per_epoch, 4),
                   "loss": last_train, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_s": round(tok_s, 1), "elapsed_s": round(time.time() - t0, 2)}
            if state.step % tc.eval_every == 0 or state.step == total_steps:
                if val_items:
                    val_loss = evaluate_loss(model, val_items, tc.batch_size, pad_id, device, autocast)
                    row["val_loss"] = val_loss
                    _track_validation(state, val_loss, last_train, log)
            if math.isnan(last_train):
                raise LoraforgeError(f"the loss became NaN at step {state.step}",
                                     hint="lower train.learning_rate or use train.precision=fp32")
            mlog.write(json.dumps(row) + "\n")
            mlog.flush()
            progress.update(state.step, last_train, row["lr"], tok_s, val_loss)
            if state.step % tc.save_every == 0 or stop.signum is not None:
                ckpt = save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state, config_yaml,
                                       tc.keep_last)
                if stop.signum is not None:
                    name = signal.Signals(stop.signum).name
                    raise TrainingInterrupted(f"{name} received: stopped after step {state.step}/{total_steps}; "
                                              f"checkpoint saved in {ckpt}",
                                              hint="continue with the same command and --resume")
    return LoopResult(state, last_train, val_loss, time.time() - t0)


def _track_validation(state: TrainerState, val_loss: float, train_loss: float, log) -> None:
    state.history.append({"step": state.step, "val_loss": val_loss, "train_loss": train_loss})
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step = val_loss, state.step
    losses = [h["val_loss"] for h in state.history[-3:]]
    if len(losses) == 3 and losses[0] < losses[1] < losses[2]:
        log(f"[yellow]warning:[/] validation loss rose for 2 evaluations in a row ({losses[0]:.4f} -> "
            f"{losses[2]:.4f}): the model may be overfitting; best was step {state.best_step}")
    if train_loss < 0.2 and not any(h["train_loss"] < 0.2 for h in state.history[:-1]):
        log(f"[yellow]warning:[/] train loss {train_loss:.3f} is under 0.2 (validation {val_loss:.3f}): "
            f"the model may be memorising its data; watch the validation loss")
