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

The host never waits for the GPU inside a step: token counts and loss positions come from the host's own
lists, batches are copied from pinned memory without blocking, and the loss and gradient norm stay on the
device (LogInterval) until a metrics row is due (every `log_every` steps), which is read one step late, once
the next step is queued, so the GPU always has work. Where the fast path replays CUDA graphs, batches are
padded to a few lengths (data.batching.length_buckets) so that their shapes repeat.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loraforge.config import RunConfig
from loraforge.data import prefix
from loraforge.data.batching import batch_order, collate, length_buckets
from loraforge.data.packing import segment_attention
from loraforge.data.templates import IGNORE_INDEX, Tokenized
from loraforge.errors import LoraforgeError, Stopped
from loraforge.model.adapters import base_of
from loraforge.model.attention import decode_attention
from loraforge.train import distributed as D
from loraforge.train.checkpoint import CheckpointWriter, TrainerState, save_checkpoint
from loraforge.train.flat import stepped_parameters
from loraforge.train.interval import LogInterval, Readings
from loraforge.train.precision import Precision
from loraforge.train.progress import TrainProgress, announce_stop
from loraforge.train.validation_forwards import validation_groups, validation_layout


class TrainingInterrupted(Stopped):
    """Raised after a checkpoint was saved in answer to SIGTERM/SIGINT."""


@dataclass
class LoopResult:
    state: TrainerState
    final_train_loss: float | None
    final_val_loss: float | None
    seconds: float
    seconds_in: dict = field(default_factory=dict)   # of `seconds`: validation, checkpoints (the rest: steps)


def split_model(model):
    """(decoder, lm_head) of a causal LM (PEFT-wrapped or not), or None when the model needs its own
    forward (logit soft-capping, custom heads)."""
    base = base_of(model)
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the loss tokens of (B, T) labels, predicted from positions 0..T-2."""
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def to_device(batch: dict, device) -> dict:
    """A collated host batch on `device`, with its loss positions (`loss_index`) found on the host: on CUDA
    copied from pinned memory without blocking, so the host goes on queueing work; the ids stay on the host
    too (`host_input_ids`: an embedding kept in host memory, model.host_embedding, gathers from them)."""
    batch = {**batch, "loss_index": loss_positions(batch["labels"])}
    flags = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}   # e.g. shared_prefix
    tensors = {k: v for k, v in batch.items() if k not in flags}
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()} | flags
    pinned = {k: v.pin_memory() for k, v in tensors.items()}
    return {k: v.to(device, non_blocking=True) for k, v in pinned.items()} | flags | \
        {"host_input_ids": pinned["input_ids"]}


def model_inputs(batch: dict) -> dict:
    """A collated batch as the model's own forward takes it: packed rows (data.packing, data.prefix) as each
    segment's attention (an example sees itself, and a shared prefix) and their positions."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "segment_ids" in batch:
        inputs.update(attention_mask=segment_attention(batch["segment_ids"]), position_ids=batch["position_ids"])
    return inputs


def loss_sum(model, batch: dict, parts=None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the loss tokens of a batch, and their count."""
    if hasattr(parts, "loss_sum"):  # the fast Llama-family path (loraforge.model.fast)
        return parts.loss_sum(batch)
    idx = batch.get("loss_index")
    idx = loss_positions(batch["labels"]) if idx is None else idx
    labels = batch["labels"][:, 1:].flatten().index_select(0, idx)
    inputs = model_inputs(batch)
    if parts is None:  # the plain path: the model's own forward builds every logit
        logits = model(**inputs).logits[:, :-1]
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, idx)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), len(idx)
    decoder, head = parts
    hidden = decoder(**inputs).last_hidden_state[:, :-1]
    logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)).float()
    return F.cross_entropy(logits, labels, reduction="sum"), len(idx)


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
                  fast=None, dist: D.DistContext = D.SINGLE, step_module=None, pack_to: int | None = None,
                  share_prefix: int = 0, max_tokens: int | None = None) -> float:
    """Mean token loss over `items`, in the forwards of train.validation_forwards.validation_groups (a run's
    arguments: validation_layout); under torchrun each rank takes every W-th batch (and runs as many forwards as
    the others, a repeat counted as nothing) and the sums are added across ranks. `share_prefix`: as
    data.batching.collate's. The forwards run with flash attention rather than cuDNN's, which plans every new
    shape (model.attention)."""
    was_training = model.training
    model.eval()
    forward = step_module if step_module is not None else StepModule(model, fast)
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    groups, shape = validation_groups(items, batch_size, pack_to, max_tokens)
    mine = groups[dist.rank::dist.world]
    with decode_attention(torch.device(device)):
        for j in range(math.ceil(len(groups) / dist.world)):
            batch = to_device(collate(mine[j] if j < len(mine) else groups[0], pad_id, **shape,
                                      share_prefix=share_prefix), device)
            with autocast():
                s, n = forward(batch)
            if j < len(mine):   # summed on the device: one read at the end
                total, count = total + s.detach(), count + n
    total, count = dist.all_sum([float(total), count], device)
    model.train(was_training)
    return total / max(count, 1)


def share_prefix_tokens(cfg: RunConfig, device: torch.device, buckets=None) -> int:
    """data.share_prefix as collate's `share_prefix` (the shortest prefix worth sharing; 0: never). auto = on the
    CPU only, where the step's time follows its tokens, and not where batches come in buckets for CUDA graphs:
    on a GPU the small steps it would shorten are the host-bound ones that graphs replay, which a new row shape
    each batch prevents."""
    mode = cfg.data.share_prefix
    if mode == "off" or cfg.data.packing or (mode == "auto" and (device.type != "cpu" or buckets)):
        return 0
    return prefix.MIN_TOKENS


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


def next_group(batches, per_epoch: int, tc) -> list[tuple[int, int, list]]:
    """The step's (epoch, index in epoch, items) micro-batches: grad_accum of them, fewer at the run's end."""
    group = []
    for _ in range(tc.grad_accum):
        epoch, bi, items = next(batches)
        group.append((epoch, bi, items))
        if epoch * per_epoch + bi + 1 >= round(per_epoch * tc.epochs):
            break  # the last micro-batch of the run
    return group


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
        announce_stop(signum)

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


def loss_tokens(item: Tokenized) -> int:
    """The loss tokens loss_sum counts in an item: labels other than IGNORE_INDEX after the first position."""
    return sum(1 for x in item.labels[1:] if x != IGNORE_INDEX)


@dataclass
class LoopSetup:
    """Everything a training loop (train_loop, train.preference_loop, train.grpo_loop) runs with, built by
    train.run: the prepared model and its optimizer, the data and where to write."""

    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    precision: Precision                 # autocast, (scaled) backward, unscale, step
    train_items: list
    val_items: list
    cfg: RunConfig
    run_dir: Path
    state: TrainerState
    log: object = print
    fast: object = None                  # loraforge.model.fast's parts, or None (PEFT forward)
    dist: D.DistContext = field(default_factory=D.DistContext)
    step_module: torch.nn.Module | None = None   # prepare_model's (or the objective's) wrapped module
    buckets: list[int] | None = None     # SFT: the batches' padded lengths (batch_buckets), None: each its own
    writer: CheckpointWriter | None = None   # periodic checkpoints written in the background (one process)
    val_scale: float = 1.0               # a validation forward's tokens over the largest training batch's
                                         # (train.validation_forwards.validation_scale)


def train_loop(setup: LoopSetup, *, on_log=None, profiler=None, on_validate=None) -> LoopResult:
    """Run setup's SFT steps. on_log(row): called with every metrics row (train.tracking); profiler: a
    train.profiling.StepProfiler; on_validate(step, val_loss) -> dict: at each validation, the task metric,
    best checkpoint and early stop (train.selection), its entries added to the row ("stop": True ends the run
    there)."""
    model, tokenizer, optimizer, scheduler, cfg, run_dir, state = (
        setup.model, setup.tokenizer, setup.optimizer, setup.scheduler, setup.cfg, setup.run_dir, setup.state)
    train_items, val_items, log, fast, dist = setup.train_items, setup.val_items, setup.log, setup.fast, setup.dist
    precision, step_module = setup.precision, setup.step_module
    autocast = precision.autocast
    tc = cfg.train
    device = torch.device(setup.device)
    pad_id = tokenizer.pad_token_id
    per_epoch, total_steps = plan_steps(len(train_items), cfg)
    eval_every, save_every = tc.intervals(total_steps)   # auto: about ten a run
    params = stepped_parameters(optimizer)   # what clipping takes: one flat tensor under train.flat
    step_module = step_module if step_module is not None else prepare_model(model, dist, device.type, fast)
    metrics_path = run_dir / "metrics.jsonl"
    config_yaml = cfg.to_yaml()
    batches = micro_batches(train_items, cfg, state)
    buckets = setup.buckets
    if buckets:
        log(f"batches padded to {len(buckets)} lengths ({', '.join(map(str, buckets))} tokens) and "
            f"{tc.batch_size} rows, so that CUDA graphs replay them")
    rows = tc.batch_size if buckets else None
    val_layout = validation_layout(cfg, train_items, setup.val_scale)
    share = share_prefix_tokens(cfg, device, buckets)   # data.prefix: a batch's common prefix computed once
    n_loss_of = {id(t): loss_tokens(t) for t in train_items}   # counted once, on the host
    last_train = extra = None
    val_loss = state.history[-1]["val_loss"] if state.history else None
    t0 = state.start_clock()  # elapsed time continues across resumes
    model.train()
    interval, pending = LogInterval(device), None
    seconds_in = {"validation": 0.0, "checkpoints": 0.0}

    mlog = metrics_path.open("a") if dist.is_main else open(os.devnull, "w")  # rank 0 alone writes

    def write_row(row: dict) -> bool:
        """Read a due row's device values (waits for its last step), write it; True when a stop was asked."""
        nonlocal last_train
        (readings, n_loss), stopping = row.pop("_loss"), row.pop("_stop")
        loss, grad_norm = readings.read()
        loss, stopping = dist.all_sum([loss, float(stopping)], device)
        last_train = row["loss"] = loss / max(n_loss, 1)
        steps = row.pop("_steps")
        row["grad_norm"] = None if grad_norm is None else grad_norm / steps
        if math.isnan(last_train):
            raise LoraforgeError(f"the loss became NaN at step {row['step']}",
                                 hint="lower train.learning_rate or use train.precision=fp32")
        now = time.time()
        row["tokens_per_s"] = round(row.pop("_tokens") / max(now - row.pop("_since"), 1e-9), 1)
        row["elapsed_s"] = round(now - t0, 2)
        mlog.write(json.dumps(row) + "\n")
        mlog.flush()
        if on_log is not None:
            on_log(row)
        progress.update(row["step"], last_train, row["lr"], row["tokens_per_s"], val_loss)
        return stopping > 0

    with _StopFlag() as stop, TrainProgress(total_steps, state.step) as progress, mlog, \
            D.peer_failures(dist, tc.dist_timeout_s):
        while state.step < total_steps:
            if profiler is not None:
                profiler.before(state.step)
            # 1. this step's micro-batches (the same on every rank); this rank takes every W-th one; the
            #    step's loss tokens are counted over all of them on the host (every rank holds the whole step)
            group = next_group(batches, per_epoch, tc)
            mine = [(j, collate(group[j][2], pad_id, buckets, rows, share))
                    for j in range(dist.rank, len(group), dist.world)]
            n_loss = sum(n_loss_of[id(t)] for _, _, items in group for t in items)
            n_tokens = sum(len(t.input_ids) for _, _, items in group for t in items)

            # 2. forward + backward, each micro-batch weighted by its share of the step's loss tokens
            #    (times W: DDP/FSDP2 average the ranks' gradients); gradients are reduced once per step
            step_loss = torch.zeros((), device=device, dtype=torch.float32)
            n_fwd = math.ceil(len(group) / dist.world)
            for k in range(n_fwd):
                j, batch = mine[k] if k < len(mine) else (None, collate(group[0][2], pad_id, buckets, rows, share))
                batch = to_device(batch, device)   # j None: a weightless repeat, so every rank runs n_fwd
                seed_micro_batch(device, cfg.seed, state.step, j or 0)
                with D.grad_sync(step_module, dist, sync=k == n_fwd - 1):
                    with autocast():
                        s, _ = step_module(batch)
                    precision.backward(s * (dist.world / max(n_loss, 1) if j is not None else 0.0))
                if j is not None:
                    step_loss += s.detach().float()

            # 3. clip, step, schedule (the grad norm stays a device tensor)
            grad_norm = None
            if tc.max_grad_norm:
                precision.unscale(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            precision.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # 4. bookkeeping: position; the previous row, now that this step is queued; validation; checkpoint
            epoch, bi, _ = group[-1]
            state.step += 1
            state.epoch, state.batch_in_epoch = (epoch + 1, 0) if bi + 1 == per_epoch else (epoch, bi + 1)
            state.tokens_seen += n_tokens
            interval.add(step_loss, n_loss, n_tokens, grad_norm)
            stopping = pending is not None and write_row(pending)
            pending = None
            evaluate = state.step % eval_every == 0 or state.step == total_steps
            stopping = stopping or (not dist.enabled and stop.signum is not None)
            if state.step % tc.log_every == 0 or evaluate or stopping or state.step % save_every == 0:
                pending = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / per_epoch, 4),
                           "loss": None, "lr": scheduler.get_last_lr()[0], "grad_norm": None,
                           "_loss": (Readings(interval.loss, interval.grad_norm), interval.n_loss),
                           "_steps": interval.steps,
                           "_tokens": interval.tokens, "_since": interval.since, "_stop": stop.signum is not None}
                interval.reset(time.time())
            if pending is not None and (evaluate or stopping or state.step % save_every == 0
                                        or state.step == total_steps):
                row, pending = pending, None
                started = time.time()
                if evaluate and val_items:
                    val_loss = row["val_loss"] = evaluate_loss(
                        model, val_items, **val_layout, pad_id=pad_id, device=device, autocast=autocast, fast=fast,
                        dist=dist, step_module=step_module, share_prefix=share)
                if evaluate and on_validate is not None:   # the task metric, best checkpoint, early stop
                    extra = on_validate(state.step, row.get("val_loss"))
                    row.update({k: v for k, v in (extra or {}).items() if k != "stop"})
                seconds_in["validation"] += time.time() - started
                stopping = write_row(row) or stopping
                if "val_loss" in row:
                    _track_validation(state, val_loss, last_train, log)
                interval.since = time.time()   # the next row's rate leaves validation out
            if state.step % save_every == 0 or stopping:
                started = time.time()
                ckpt = save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state, config_yaml,
                                       tc.keep_last, dist=dist, step_module=step_module, writer=setup.writer,
                                       background=not stopping)
                interval.since = time.time()
                seconds_in["checkpoints"] += interval.since - started
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum is not None else "a stop signal"
                    raise TrainingInterrupted(f"{name} received: stopped after step {state.step}/{total_steps}; "
                                              f"checkpoint saved in {ckpt}",
                                              hint="continue with the same command and --resume")
            if extra and extra.get("stop"):
                break  # early stopping asked by on_validate: the caller saves the last step's checkpoint
        if pending is not None:
            write_row(pending)
        if profiler is not None:
            profiler.finish()
    return LoopResult(state, last_train, val_loss, time.time() - t0,
                      {k: round(v, 2) for k, v in seconds_in.items()})


def batch_buckets(items: list[Tokenized], cfg: RunConfig, fast) -> list[int] | None:
    """The padded lengths of the training batches where the fast path replays CUDA graphs (each length's
    shape then repeats), else None (each batch padded to its own longest example). Packed rows too: their
    lengths are the rows' (mostly max_seq_length), and collate adds the segment offsets graphs replay with."""
    if fast is None or not items:
        return None
    buckets = length_buckets([len(t.input_ids) for t in items], cfg.train.batch_size, cfg.seed)
    return buckets if fast.fit_graphs(cfg.train.batch_size * buckets[-1]) else None


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
