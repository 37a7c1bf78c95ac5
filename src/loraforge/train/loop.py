"""The training loop: read it top to bottom.

One optimizer step = `grad_accum` micro-batches. The loss is the sum of token losses over the whole
step divided by the number of loss tokens in the step, so every token weighs the same whatever the
padding or batch split (not a mean of per-batch means). Logits are computed only at positions that
carry loss, never for the whole sequence. Checkpoints are written every `save_every` steps and when
SIGTERM/SIGINT arrives (after the step in progress); a resumed run replays the same batch order and
RNG states, so it ends with the same losses as an uninterrupted one.

Under torchrun the step's micro-batches are dealt to the ranks (see train.distributed): every rank runs
the same number of forwards, the loss is normalised by the global loss-token count, gradients are reduced
once per step, and dropout is seeded per (step, micro-batch), so the curve does not depend on the number
of processes. Rank 0 alone writes metrics and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraforge.config import RunConfig
from loraforge.data.batching import batch_order, collate
from loraforge.data.packing import segment_attention
from loraforge.data.templates import IGNORE_INDEX, Tokenized
from loraforge.errors import LoraforgeError
from loraforge.train import distributed as D
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
    if hasattr(parts, "loss_sum"):  # the fast Llama-family path (loraforge.model.fast)
        return parts.loss_sum(batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "segment_ids" in batch:  # packed rows: each example attends only to itself, positions restart
        inputs.update(attention_mask=segment_attention(batch["segment_ids"]), position_ids=batch["position_ids"])
    if parts is None:  # the plain path: the model's own forward builds every logit
        logits = model(**inputs).logits
        return F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum"), n
    decoder, head = parts
    hidden = decoder(**inputs).last_hidden_state
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum"), n


class StepModule(torch.nn.Module):
    """The model and its loss as one module: the forward DDP/FSDP2 hook (loss_sum's fast paths call
    submodules of the model directly, which a wrapper around the model alone would not see)."""

    def __init__(self, model, fast=None):
        super().__init__()
        self.model = model
        self.parts = fast or split_model(model)  # plain attribute, not registered as a submodule again

    def forward(self, batch: dict):
        return loss_sum(self.model, batch, self.parts)


def prepare_model(model, dist: D.DistContext, device: str, fast=None) -> torch.nn.Module:
    """The module train_loop runs: StepModule, wrapped in DDP or sharded by FSDP2 under torchrun.
    Build the optimizer after this call (FSDP2 replaces the parameters)."""
    return D.wrap(StepModule(model, fast), dist, device)


@torch.no_grad()
def evaluate_loss(model, items: list[Tokenized], batch_size: int, pad_id: int, device, autocast,
                  fast=None, dist: D.DistContext = D.SINGLE, step_module=None) -> float:
    """Mean token loss over `items`; under torchrun each rank takes every W-th batch (and runs as many
    forwards as the others, a repeat counted as nothing) and the sums are added across ranks."""
    was_training = model.training
    model.eval()
    forward = step_module if step_module is not None else StepModule(model, fast)
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    starts = list(range(0, len(order), batch_size))
    mine = starts[dist.rank::dist.world]
    for j in range(math.ceil(len(starts) / dist.world)):
        start = mine[j] if j < len(mine) else starts[0]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in order[start:start + batch_size]],
                                                     pad_id).items()}
        with autocast():
            s, n = forward(batch)
        if j < len(mine):
            total, count = total + float(s), count + n
    total, count = dist.all_sum([total, count], device)
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


def seed_micro_batch(device: torch.device, seed: int, step: int, micro: int) -> None:
    """Each micro-batch draws its dropout masks from its own seed, whichever rank runs it (only this
    device's generator: torch.manual_seed would also seed every other backend, at a cost per call)."""
    value = (seed * 1_000_003 + step * 4099 + micro) % (2 ** 63)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)


def train_loop(model, tokenizer, optimizer, scheduler, accelerator, autocast, train_items: list[Tokenized],
               val_items: list[Tokenized], cfg: RunConfig, run_dir: Path, state: TrainerState,
               log=print, fast=None, dist: D.DistContext = D.SINGLE, step_module=None,
               on_validate=None) -> LoopResult:
    tc = cfg.train
    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    per_epoch, total_steps = plan_steps(len(train_items), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    step_module = step_module if step_module is not None else prepare_model(model, dist, device.type, fast)
    metrics_path = run_dir / "metrics.jsonl"
    config_yaml = cfg.to_yaml()
    batches = micro_batches(train_items, cfg, state)
    last_train = extra = None
    val_loss = state.history[-1]["val_loss"] if state.history else None
    t0 = time.time()
    model.train()

    mlog = metrics_path.open("a") if dist.is_main else open(os.devnull, "w")  # rank 0 alone writes
    with _StopFlag() as stop, TrainProgress(total_steps, state.step) as progress, mlog, \
            D.peer_failures(dist, tc.dist_timeout_s):
        while state.step < total_steps:
            # 1. this step's micro-batches (the same on every rank); this rank takes every W-th one;
            #    the loss tokens of the whole step are counted across ranks
            group = []
            for _ in range(tc.grad_accum):
                epoch, bi, items = next(batches)
                group.append((epoch, bi, items))
                if epoch * per_epoch + bi + 1 >= round(per_epoch * tc.epochs):
                    break  # the last micro-batch of the run
            mine = [(j, collate(group[j][2], pad_id)) for j in range(dist.rank, len(group), dist.world)]
            n_loss, n_tokens = dist.all_sum([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in mine),
                                             sum(int(b["attention_mask"].sum()) for _, b in mine)], device)

            # 2. forward + backward, each micro-batch weighted by its share of the step's loss tokens
            #    (times W: DDP/FSDP2 average the ranks' gradients); gradients are reduced once per step
            step_start, step_loss = time.time(), 0.0
            n_fwd = math.ceil(len(group) / dist.world)
            for k in range(n_fwd):
                j, batch = mine[k] if k < len(mine) else (None, collate(group[0][2], pad_id))  # weightless repeat
                batch = {key: v.to(device) for key, v in batch.items()}
                seed_micro_batch(device, cfg.seed, state.step, j or 0)
                with D.grad_sync(step_module, dist, sync=k == n_fwd - 1):
                    with autocast():
                        s, _ = step_module(batch)
                    accelerator.backward(s * (dist.world / n_loss if j is not None else 0.0))
                if j is not None:
                    step_loss += float(s.detach())

            # 3. clip, step, schedule
            grad_norm = None
            if tc.max_grad_norm:
                grad_norm = D.full_value(accelerator.clip_grad_norm_(params, tc.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # 4. bookkeeping: position, metrics, validation, checkpoint
            step_loss, stopping = dist.all_sum([step_loss, float(stop.signum is not None)], device)
            epoch, bi, _ = group[-1]
            state.step += 1
            state.epoch, state.batch_in_epoch = (epoch + 1, 0) if bi + 1 == per_epoch else (epoch, bi + 1)
            state.tokens_seen += int(n_tokens)
            last_train = step_loss / n_loss
            tok_s = n_tokens / max(time.time() - step_start, 1e-9)
            row = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / per_epoch, 4),
                   "loss": last_train, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_s": round(tok_s, 1), "elapsed_s": round(time.time() - t0, 2)}
            if state.step % tc.eval_every == 0 or state.step == total_steps:
                if val_items:
                    val_loss = evaluate_loss(model, val_items, tc.batch_size, pad_id, device, autocast, fast, dist,
                                             step_module)
                    row["val_loss"] = val_loss
                    _track_validation(state, val_loss, last_train, log)
                # on_validate(step, val_loss) -> dict: task metric, best checkpoint, early stop (train.selection)
                extra = on_validate(state.step, row.get("val_loss")) if on_validate is not None else None
                row.update({k: v for k, v in (extra or {}).items() if k != "stop"})
            if math.isnan(last_train):
                raise LoraforgeError(f"the loss became NaN at step {state.step}",
                                     hint="lower train.learning_rate or use train.precision=fp32")
            mlog.write(json.dumps(row) + "\n")
            mlog.flush()
            progress.update(state.step, last_train, row["lr"], tok_s, val_loss)
            if state.step % tc.save_every == 0 or stopping:
                ckpt = save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state, config_yaml,
                                       tc.keep_last, dist=dist, step_module=step_module)
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum is not None else "a stop signal"
                    raise TrainingInterrupted(f"{name} received: stopped after step {state.step}/{total_steps}; "
                                              f"checkpoint saved in {ckpt}",
                                              hint="continue with the same command and --resume")
            if extra and extra.get("stop"):
                break  # early stopping asked by on_validate: the caller saves the last step's checkpoint
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
