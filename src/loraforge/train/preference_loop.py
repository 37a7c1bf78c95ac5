"""The preference-tuning loop (objective dpo | orpo | simpo | kto): train.loop's step, on pairs.

A micro-batch of B pairs is one forward over 2B rows (chosen_1..B then rejected_1..B, right-padded),
which gives each completion's summed log-prob at its loss tokens only (train.logprobs). The reference
(DPO, KTO) is the same model with the adapter switched off: with `preference.reference: cached` its
log-probs are computed once per example, the first time the example comes (from the same batch, in eval
mode, without gradients), and kept (`reference_logps.json` in the run folder, reused by --resume);
`live` computes them in every step instead. The loss of a
step is the mean of its examples' losses, over all ranks, so the curve does not depend on the number of
processes; batch order, checkpoints, SIGTERM handling and resume are train.loop's.

Validation reports the loss, the reward accuracy (the share of held-out pairs whose chosen completion
gets the higher implicit reward, a tie counting half) and the mean reward margin. The base model's
figures come from the reference log-probs (the untrained adapter is the identity): for DPO its margins
are 0 and its accuracy 50% by construction; for SimPO/ORPO they are the base's own length-normalised
log-probs. Both, with per-pair scores for confidence intervals, go to `preference_eval.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.config import RunConfig
from loraforge.data.batching import collate, split_validation
from loraforge.data.preference import TokenizeReport, read_pairs, tokenize_preferences
from loraforge.errors import LoraforgeError
from loraforge.files import write_json
from loraforge.train import distributed as D
from loraforge.train.logprobs import reference_token_logps, row_sums, wrap_logp_step
from loraforge.train.loop import LoopResult, LoopSetup, _track_validation, seed_micro_batch, to_device
from loraforge.train.objectives import REFERENCE_FREE, beta_of, kto_loss, pair_loss
from loraforge.train.steps import (advance, checkpoint_or_stop, metrics_row, next_group, optimizer_step, session,
                                   objective_start)

REFERENCE_FILE = "reference_logps.json"


@dataclass
class ObjectiveResult(LoopResult):
    report: dict = field(default_factory=dict)  # added to summary.json


def load_preference_data(cfg: RunConfig, tokenizer, log=print) -> tuple[list, list, dict]:
    """Pairs (or KTO records) of data.train / data.validation, tokenized; a data report like SFT's."""
    d, p = cfg.data, cfg.preference
    if not d.train:
        raise LoraforgeError("no training data: set data.train", hint="a JSONL of {prompt, chosen, rejected}")
    unpaired, skipped = cfg.objective == "kto", []
    train = read_pairs(d.train, d.system_prompt, unpaired, skipped)
    if d.validation:
        val = read_pairs(d.validation, d.system_prompt, unpaired, skipped)
    else:
        train, val = split_validation(train, d.validation_split, cfg.seed)
    train_items, tr = tokenize_preferences(tokenizer, train, d.max_seq_length, p.max_prompt_length, "training data")
    val_items, vr = tokenize_preferences(tokenizer, val, d.max_seq_length, p.max_prompt_length, "validation data") \
        if val else ([], TokenizeReport())
    report = {"objective": cfg.objective, **tr.to_dict("train"), **vr.to_dict("validation"),
              "max_seq_length": d.max_seq_length, "max_prompt_length": p.max_prompt_length,
              "train_tokens": sum(len(it.input_ids) for it in train_items),
              "skipped_pairs": len(skipped), "skipped_sources": skipped[:20]}
    if skipped:
        log(f"[yellow]warning:[/] {len(skipped)} records have an empty or duplicated side and were left out "
            f"(first: {skipped[0]}); `loraforge data validate` lists them all")
    dropped = len(tr.too_long) + len(vr.too_long)
    if dropped:
        log(f"[yellow]warning:[/] {dropped} examples are longer than max_seq_length={d.max_seq_length} even with their "
              f"prompt cut to {p.max_prompt_length} tokens, and were left out "
              f"(first: {(tr.too_long + vr.too_long)[0]})")
    return train_items, val_items, report


def sides_batch(items: list, pad_id: int) -> dict:
    """One right-padded batch of every completion: chosen_1..B then rejected_1..B (KTO: completions)."""
    rows = [it.sides()[k] for k in range(len(items[0].sides())) for it in items]
    return collate(rows, pad_id)


def _needs_reference(cfg: RunConfig) -> bool:
    return cfg.objective not in REFERENCE_FREE


def load_reference_cache(items: list, path: Path) -> None:
    """Reference log-probs saved by an earlier part of this run (keyed by the example's file:line)."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    for it in items:
        if it.ref is None and len(saved.get(it.source, ())) == len(it.sides()):
            it.ref = tuple(saved[it.source])


def save_reference_cache(items: list, path: Path) -> None:
    saved = {it.source: list(it.ref) for it in items if it.ref is not None}
    write_json(path, saved, indent=None)


def _store_reference(items: list, sums: torch.Tensor) -> None:
    """Rows of a sides_batch are side-major: row s * B + i is side s of item i."""
    b = len(items)
    values = sums.tolist()
    for i, it in enumerate(items):
        it.ref = tuple(values[s * b + i] for s in range(len(it.sides())))


@torch.no_grad()
def fill_reference(model, items: list, batch_size: int, pad_id: int, device, autocast,
                   dist: D.DistContext = D.SINGLE) -> None:
    """Set `item.ref` (the base model's summed log-prob of each side) for every item that has none. Under
    torchrun each rank computes every W-th batch and the values are summed across ranks."""
    todo = [it for it in items if it.ref is None]
    if not todo:
        return
    n_sides = len(todo[0].sides())
    values = [0.0] * (len(todo) * n_sides)
    starts = list(range(0, len(todo), batch_size))
    for start in starts[dist.rank::dist.world]:
        chunk = todo[start:start + batch_size]
        batch = to_device(sides_batch(chunk, pad_id), device)
        with autocast():
            _store_reference(chunk, row_sums(*reference_token_logps(model, batch), batch["input_ids"].shape[0])[0])
        for i, it in enumerate(chunk):
            values[(start + i) * n_sides:(start + i + 1) * n_sides] = it.ref
    values = dist.all_sum(values, device)
    for i, it in enumerate(todo):
        it.ref = tuple(values[i * n_sides:(i + 1) * n_sides])


def example_losses(cfg: RunConfig, items: list, logp: torch.Tensor, counts: torch.Tensor,
                   ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per example, score per example: 1 when the implicit reward ranks it right, 0.5 on a tie, else 0,
    margin) for a sides_batch of `items`; KTO ranks each reward against the batch's reference point."""
    if cfg.objective == "kto":
        desirable = torch.tensor([it.desirable for it in items], device=logp.device)
        p = cfg.preference
        loss, r = kto_loss(logp, ref, desirable, beta_of("kto", p.beta), p.kto_desirable_weight,
                           p.kto_undesirable_weight)
        z = r.mean().clamp(min=0)  # KTO's reference point: desirable above it, undesirable below
        signed = torch.where(desirable, r - z, z - r)
    else:
        loss, rc, rr = pair_loss(cfg.objective, logp, counts, ref, cfg.preference)
        signed = rc - rr
    return loss, (signed > 0).float() + 0.5 * (signed == 0).float(), signed


def _reference_of(model, items: list, batch: dict, cfg: RunConfig) -> torch.Tensor | None:
    """The reference's summed log-probs of a sides_batch: cached per example (computed the first time the
    example comes, from this very batch) or, with preference.reference=live, computed every time."""
    if not _needs_reference(cfg):
        return None
    if any(it.ref is None for it in items):
        sums = row_sums(*reference_token_logps(model, batch), batch["input_ids"].shape[0])[0]
        if cfg.preference.reference == "live":
            return sums
        _store_reference(items, sums)
    return torch.tensor([it.ref[k] for k in range(len(items[0].sides())) for it in items],
                        device=batch["input_ids"].device)


@torch.no_grad()
def preference_eval(step_module, model, items: list, cfg: RunConfig, pad_id: int, device, autocast,
                    dist: D.DistContext = D.SINGLE, base: bool = False) -> dict:
    """Loss, reward accuracy and mean margin over `items` (their per-example scores too). `base`: score the
    base model from the cached reference log-probs, without a forward."""
    was_training = model.training
    model.eval()
    bs = cfg.train.batch_size
    starts = list(range(0, len(items), bs))
    loss, scores, margins = [0.0] * len(items), [0.0] * len(items), [0.0] * len(items)
    for j in range(math.ceil(len(starts) / dist.world)):  # every rank runs as many forwards as the others
        k = j * dist.world + dist.rank
        start = starts[k] if k < len(starts) else starts[0]
        chunk = items[start:start + bs]
        batch = to_device(sides_batch(chunk, pad_id), device)
        counts = (batch["labels"][:, 1:] != -100).sum(1)
        ref = _reference_of(model, chunk, batch, cfg)
        if base:
            logp = torch.tensor([it.ref[s] for s in range(len(chunk[0].sides())) for it in chunk], device=device)
        else:
            with autocast():
                logp, counts = step_module(batch)
        lo, sc, mg = example_losses(cfg, chunk, logp.float(), counts, ref)
        if k < len(starts):
            for i, (a, b, c) in enumerate(zip(lo.tolist(), sc.tolist(), mg.tolist())):
                loss[start + i], scores[start + i], margins[start + i] = a, b, c
    loss, scores, margins = (dist.all_sum(x, device) for x in (loss, scores, margins))
    model.train(was_training)
    n = max(len(items), 1)
    return {"loss": sum(loss) / n, "reward_accuracy": sum(scores) / n, "reward_margin": sum(margins) / n,
            "examples": len(items), "scores": scores}


def preference_loop(setup: LoopSetup) -> ObjectiveResult:
    model, optimizer, scheduler, cfg, run_dir, state = (
        setup.model, setup.optimizer, setup.scheduler, setup.cfg, setup.run_dir, setup.state)
    train_items, val_items, log, dist = setup.train_items, setup.val_items, setup.log, setup.dist
    autocast = setup.precision.autocast
    tc = cfg.train
    st = objective_start(setup)  # shared with the other objective's loop (train.steps)
    device, pad_id, per_epoch, total_steps, params = st.device, st.pad_id, st.per_epoch, st.total_steps, st.params
    step_module, batches, config_yaml = st.step_module, st.batches, st.config_yaml
    # the reference of every validation example now (it also scores the base model); of a training example
    # the first time it comes (kept in the run folder for --resume)
    cache = run_dir / REFERENCE_FILE
    load_reference_cache(train_items + val_items, cache)

    def save_cache():
        if dist.is_main:
            save_reference_cache(train_items + val_items, cache)

    fill_reference(model, val_items, tc.batch_size, pad_id, device, autocast, dist)
    base_eval = preference_eval(step_module, model, val_items, cfg, pad_id, device, autocast, dist, base=True) \
        if val_items else None
    if base_eval:
        log(f"base model on {len(val_items)} held-out examples: reward accuracy {base_eval['reward_accuracy']:.1%}")
    last_train, val_eval = None, None
    val_loss = state.history[-1]["val_loss"] if state.history else None
    t0 = time.time()
    model.train()
    with session(run_dir, tc, state, total_steps, dist) as (stop, progress, mlog):
        while state.step < total_steps:
            group = next_group(batches, per_epoch, tc)
            mine = list(range(dist.rank, len(group), dist.world))
            n_ex, n_tokens = dist.all_sum([sum(len(group[j][2]) for j in mine),
                                           sum(len(it.input_ids) for j in mine for it in group[j][2])], device)
            # the step's summed loss and score stay on the device (float64, as Python floats would add them) and
            # are read once, after the optimizer step: one host sync a step, not two per micro-batch
            step_start, sums = time.time(), torch.zeros(2, device=device, dtype=torch.float64)
            n_fwd = math.ceil(len(group) / dist.world)
            for k in range(n_fwd):
                j = mine[k] if k < len(mine) else None  # None: a weightless repeat (every rank runs as many)
                items = group[j if j is not None else 0][2]
                batch = to_device(sides_batch(items, pad_id), device)
                with autocast():
                    ref = _reference_of(model, items, batch, cfg)
                seed_micro_batch(device, cfg.seed, state.step, j or 0)
                with D.grad_sync(step_module, dist, sync=k == n_fwd - 1):
                    with autocast():
                        logp, counts = step_module(batch)
                    losses, scores, _ = example_losses(cfg, items, logp.float(), counts, ref)
                    (losses.sum() * (dist.world / n_ex if j is not None else 0.0)).backward()
                if j is not None:
                    sums += torch.stack([losses.detach().sum(), scores.sum()]).double()
            grad_norm = optimizer_step(params, optimizer, scheduler, tc.max_grad_norm)

            step_loss, step_score, stopping = dist.all_sum([*sums.tolist(), float(stop.signum is not None)],
                                                           device)
            advance(state, group, per_epoch, n_tokens)
            last_train = step_loss / n_ex
            row = metrics_row(state, per_epoch, last_train, scheduler, grad_norm, n_tokens, step_start, t0,
                              reward_accuracy=step_score / n_ex)
            if val_items and (state.step % st.eval_every == 0 or state.step == total_steps):
                val_eval = preference_eval(step_module, model, val_items, cfg, pad_id, device, autocast, dist)
                val_loss = val_eval["loss"]
                row.update(val_loss=val_loss, val_reward_accuracy=val_eval["reward_accuracy"],
                           val_reward_margin=val_eval["reward_margin"])
                _track_validation(state, val_loss, last_train, log)
            if math.isnan(last_train):
                raise LoraforgeError(f"the loss became NaN at step {state.step}",
                                     hint="lower train.learning_rate or preference.beta")
            mlog.write(json.dumps(row) + "\n")
            mlog.flush()
            progress.update(state.step, last_train, row["lr"], row["tokens_per_s"], val_loss)
            checkpoint_or_stop(run_dir, model, optimizer, scheduler, state, config_yaml, tc, total_steps,
                               st.save_every, stopping,
                               stop.signum, dist, step_module, before_save=save_cache,
                               writer=setup.writer)
    if val_items and val_eval is None:  # a resumed run that had nothing left to do
        val_eval = preference_eval(step_module, model, val_items, cfg, pad_id, device, autocast, dist)
    report = write_preference_report(run_dir, cfg, base_eval, val_eval, dist, log)
    return ObjectiveResult(state, last_train, val_loss, time.time() - t0, report=report)


def write_preference_report(run_dir: Path, cfg: RunConfig, base: dict | None, tuned: dict | None,
                            dist: D.DistContext, log) -> dict:
    """summary.json's `preference` entry; per-example scores go to preference_eval.json."""
    if not (base and tuned):
        return {}
    keys = ("loss", "reward_accuracy", "reward_margin", "examples")
    out = {"objective": cfg.objective, "beta": beta_of(cfg.objective, cfg.preference.beta),
           "base": {k: base[k] for k in keys}, "tuned": {k: tuned[k] for k in keys}}
    if dist.is_main:
        write_json(run_dir / "preference_eval.json", {**out, "base_scores": base["scores"], "tuned_scores": tuned["scores"]}, indent=None)
    log(f"held-out reward accuracy: base {base['reward_accuracy']:.1%} -> tuned {tuned['reward_accuracy']:.1%} "
        f"(mean margin {tuned['reward_margin']:+.3f}, {tuned['examples']} examples)")
    return {"preference": out}


@dataclass(frozen=True)
class ObjectiveParts:
    """What train.run swaps in for an objective other than sft: data, the module DDP wraps, the loop."""

    load: object      # (cfg, tokenizer, log) -> (train items, validation items, data report)
    prepare: object   # (model, dist, device, fast) -> the wrapped module
    loop: object      # (train.loop.LoopSetup) -> ObjectiveResult


PREFERENCE_PARTS = ObjectiveParts(load_preference_data, wrap_logp_step, preference_loop)
