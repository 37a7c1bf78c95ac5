"""GRPO with verifiable rewards (objective grpo): sample, score, and push up what scored above its group.

Each micro-batch of `train.batch_size` prompts is decoded `grpo.group_size` (G) times per prompt by
loraforge's own batched decoder (model.decode) from the PEFT model being trained, adapter active: no
inference server, no copy of the weights; on CUDA through the fast path's layers with a static KV cache and
one CUDA graph replayed per token (model.fast.decode). The completions are scored by the reward functions
(train.rewards), each prompt's G rewards are normalised into advantages (objectives.group_advantages),
and the prompt + completion rows (on the CPU one row per prompt, holding it once: data.share_prefix) go
through one forward that gives every completion token's log-prob
(train.logprobs, fast path or plain) for the clipped surrogate (objectives.grpo_loss); with
`grpo.kl_beta > 0` the reference (adapter off) adds a KL penalty. One update per sampled batch, so the
"old" policy is the current one (the ratio's value is 1, its gradient is the policy gradient; clipping
matters only for reuse). Sampling is seeded per (seed, step, micro-batch), so --resume reproduces an
uninterrupted run. Checkpoints, signals and the step's bookkeeping are train.loop's (train.steps).

Validation decodes greedily on held-out prompts: the mean reward and the pass rate (reward at least
`grpo.pass_threshold`), for the base before training and the adapter after (`grpo_eval.json`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from loraforge.config import RunConfig
from loraforge.data.batching import collate, split_validation
from loraforge.data.packing import collate_rows
from loraforge.data.prefix import share_prefix
from loraforge.data.preference import read_prompts
from loraforge.data.templates import IGNORE_INDEX, Tokenized, prompt_text
from loraforge.errors import LoraforgeError
from loraforge.files import write_json
from loraforge.model.decode import decode_ids, stop_token_ids
from loraforge.train import distributed as D
from loraforge.train.logprobs import reference_token_logps, wrap_logp_step
from loraforge.train.loop import LoopSetup, seed_micro_batch, share_prefix_tokens, to_device
from loraforge.train.objectives import group_advantages, grpo_loss
from loraforge.train.preference_loop import ObjectiveParts, ObjectiveResult
from loraforge.train.rewards import load_rewards, score
from loraforge.train.steps import (advance, checkpoint_or_stop, metrics_row, next_group, optimizer_step, session,
                                   objective_start)

BASE_EVAL = "grpo_base_eval.json"


@dataclass
class PromptItem:
    input_ids: list[int]   # the prompt as the model sees it, generation prompt included
    text: str              # its last user turn: the `prompt` a reward function gets
    row: dict              # the record's other fields
    source: str
    labels: list = field(default_factory=list)


def load_grpo_data(cfg: RunConfig, tokenizer, log=print) -> tuple[list, list, dict]:
    d, g = cfg.data, cfg.grpo
    if not d.train:
        raise LoraforgeError("no prompts: set data.train", hint="a JSONL of {prompt, answer} or any SFT format")
    columns = {"prompt_column": d.prompt_column, "response_column": d.response_column}
    train = read_prompts(d.train, d.format, d.system_prompt, **columns)
    if d.validation:
        val = read_prompts(d.validation, d.format, d.system_prompt, **columns)
    else:
        train, val = split_validation(train, d.validation_split, cfg.seed)
    report = {"objective": "grpo", "max_seq_length": d.max_seq_length}
    out = []
    for what, rows in (("train", train), ("validation", val)):
        texts = [prompt_text(tokenizer, r.prompt) for r in rows]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        items = [PromptItem(x, next((t["content"] for t in reversed(r.prompt) if t["role"] == "user"), ""), r.row,
                            r.source) for x, r in zip(ids, rows) if len(x) + g.max_new_tokens <= d.max_seq_length]
        report.update({f"{what}_prompts": len(items), f"{what}_dropped_too_long": len(rows) - len(items)})
        out.append(items)
    if not out[0]:
        raise LoraforgeError(f"no prompt leaves room for grpo.max_new_tokens={g.max_new_tokens} within "
                             f"data.max_seq_length={d.max_seq_length}", where=str(d.train))
    dropped = report["train_dropped_too_long"] + report["validation_dropped_too_long"]
    if dropped:
        log(f"[yellow]warning:[/] {dropped} prompts leave no room for {g.max_new_tokens} new tokens within "
            f"max_seq_length={d.max_seq_length} and were left out")
    return out[0], out[1], report


def sample(model, tokenizer, items: list, cfg: RunConfig, seed: int, greedy: bool = False, fast=None) -> list:
    """G completions per item (item-major), decoded with the adapter active; one per item when greedy. With
    the run's FastLlama (`fast`) a CUDA run decodes through its layers (model.fast.decode)."""
    g = cfg.grpo
    n = 1 if greedy else g.group_size
    prompts = [it.input_ids for it in items for _ in range(n)]
    return decode_ids(model, prompts, stops=stop_token_ids(tokenizer, model), pad_id=tokenizer.pad_token_id,
                      max_new_tokens=g.max_new_tokens, batch_size=cfg.eval.batch_size if greedy else len(prompts),
                      temperature=0.0 if greedy else g.temperature, top_p=g.top_p, seed=seed, fast=fast)


def completion_batch(items: list, completions: list, pad_id: int, share: int = 0) -> tuple[dict, torch.Tensor]:
    """Prompt + completion rows (the stop token included when the model stopped), loss on the completion, and
    the completion each loss token belongs to, in the batch's order of loss tokens. With `share` (data.share_prefix
    as collate takes it; 0: never) each prompt's G rows come as one row holding the prompt once (data.prefix:
    the same log-probs), where that pays for every prompt of the batch. On the CPU GRPO's step follows its
    tokens, and a short answer's rows are mostly prompt: BANKING77's G = 8 rows of a ~90-token prompt and a
    label of ~6 tokens are ~770 tokens padded, ~190 shared."""
    n = len(completions) // len(items)
    rows, counts = [], []
    for k, c in enumerate(completions):
        new = c.ids + ([c.stop_id] if c.stopped else [])
        prompt = items[k // n].input_ids
        rows.append(Tokenized(prompt + new, [IGNORE_INDEX] * len(prompt) + new, items[k // n].source))
        counts.append(len(new))
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts, dtype=torch.long))
    if share and n > 1:
        groups = [share_prefix(rows[i * n:(i + 1) * n], share) for i in range(len(items))]
        if all(row is not None for row in groups):
            return collate_rows(groups, pad_id), owner
    return collate(rows, pad_id), owner


def rewards_of(rewards: list, tokenizer, items: list, completions: list) -> list[float]:
    n = len(completions) // len(items)
    return [score(rewards, items[k // n].text, tokenizer.decode(c.ids, skip_special_tokens=True).strip(),
                  items[k // n].row, items[k // n].source) for k, c in enumerate(completions)]


def grpo_eval(model, tokenizer, items: list, rewards: list, cfg: RunConfig, fast=None) -> dict:
    """Greedy answers to held-out prompts: mean reward and pass rate, with per-prompt values."""
    values = rewards_of(rewards, tokenizer, items,
                        sample(model, tokenizer, items, cfg, cfg.seed, greedy=True, fast=fast))
    passes = [float(v >= cfg.grpo.pass_threshold) for v in values]
    n = max(len(items), 1)
    return {"mean_reward": sum(values) / n, "pass_rate": sum(passes) / n, "examples": len(items),
            "rewards": values, "passes": passes}


def grpo_loop(setup: LoopSetup) -> ObjectiveResult:
    model, tokenizer, optimizer, scheduler, cfg, run_dir, state = (
        setup.model, setup.tokenizer, setup.optimizer, setup.scheduler, setup.cfg, setup.run_dir, setup.state)
    val_items, log, dist = setup.val_items, setup.log, setup.dist
    autocast = setup.precision.autocast
    tc, g = cfg.train, cfg.grpo
    if dist.enabled and dist.mode == "fsdp":
        raise LoraforgeError("objective grpo decodes with the whole model on each process; FSDP2 shards it",
                             hint="use train.distributed=ddp")
    st = objective_start(setup)  # shared with the other objective's loop (train.steps)
    device, pad_id, per_epoch, total_steps, params = st.device, st.pad_id, st.per_epoch, st.total_steps, st.params
    step_module, batches, config_yaml = st.step_module, st.batches, st.config_yaml
    rewards = load_rewards(g.rewards, cfg.eval.pattern, cfg.eval.schema_file)
    share = share_prefix_tokens(cfg, torch.device(device))   # a group's prompt once (data.share_prefix)
    base_path = run_dir / BASE_EVAL
    base_eval = None
    if val_items:
        base_eval = json.loads(base_path.read_text()) if base_path.is_file() else \
            grpo_eval(model, tokenizer, val_items, rewards, cfg, setup.fast)
        if dist.is_main and not base_path.is_file():
            write_json(base_path, base_eval, indent=None)
        log(f"base model on {len(val_items)} held-out prompts: mean reward {base_eval['mean_reward']:.3f}, "
            f"pass rate {base_eval['pass_rate']:.1%}")
    last_train, val_eval, val_loss = None, None, None
    t0 = time.time()
    model.train()
    with session(run_dir, tc, state, total_steps, dist) as (stop, progress, mlog):
        while state.step < total_steps:
            group = next_group(batches, per_epoch, tc)
            mine = list(range(dist.rank, len(group), dist.world))
            n_rows = dist.all_sum([sum(len(group[j][2]) * g.group_size for j in mine)], device)[0]
            step_start = time.time()
            sums = {"loss": 0.0, "reward": 0.0, "passed": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0}
            n_fwd = math.ceil(len(group) / dist.world)
            for k in range(n_fwd):
                j = mine[k] if k < len(mine) else None  # None: a weightless repeat (every rank runs as many)
                items = group[j if j is not None else 0][2]
                seed = (cfg.seed * 1_000_003 + state.step * 4099 + (j or 0)) % (2 ** 63)
                completions = sample(model, tokenizer, items, cfg, seed, fast=setup.fast)
                values = rewards_of(rewards, tokenizer, items, completions)
                adv = group_advantages(torch.tensor(values).view(len(items), g.group_size)).flatten().to(device)
                batch, owner = completion_batch(items, completions, pad_id, share)
                batch, owner = to_device(batch, device), owner.to(device)
                ref = None
                if g.kl_beta > 0:
                    with autocast():
                        ref = reference_token_logps(model, batch)[0].float()
                seed_micro_batch(device, cfg.seed, state.step, j or 0)
                with D.grad_sync(step_module, dist, sync=k == n_fwd - 1):
                    with autocast():
                        logp, _ = step_module(batch, per_token=True)   # its rows: the batch's, not completions
                    logp = logp.float()
                    losses, stats = grpo_loss(logp, logp.detach(), adv, owner, len(completions), g.clip_eps,
                                              ref, g.kl_beta)
                    (losses.sum() * (dist.world / n_rows if j is not None else 0.0)).backward()
                if j is not None:
                    n = len(completions)
                    sums["loss"] += float(losses.detach().sum())
                    sums["reward"] += sum(values)
                    sums["passed"] += sum(v >= g.pass_threshold for v in values)
                    sums["clipped"] += stats["clipped"] * n
                    sums["kl"] += stats.get("kl", 0.0) * n
                    sums["tokens"] += sum(len(it.input_ids) for it in items) * g.group_size + len(owner)
            grad_norm = optimizer_step(params, optimizer, scheduler, tc.max_grad_norm)
            *totals, stopping = dist.all_sum([*sums.values(), float(stop.signum is not None)], device)
            sums = dict(zip(sums, totals))
            advance(state, group, per_epoch, sums["tokens"])
            last_train = sums["loss"] / n_rows
            row = metrics_row(state, per_epoch, last_train, scheduler, grad_norm, sums["tokens"], step_start, t0,
                              reward=sums["reward"] / n_rows, pass_rate=sums["passed"] / n_rows,
                              clipped=sums["clipped"] / n_rows, kl=sums["kl"] / n_rows)
            if val_items and (state.step % st.eval_every == 0 or state.step == total_steps):
                val_eval = grpo_eval(model, tokenizer, val_items, rewards, cfg, setup.fast)
                row.update(val_reward=val_eval["mean_reward"], val_pass_rate=val_eval["pass_rate"])
            if math.isnan(last_train):
                raise LoraforgeError(f"the loss became NaN at step {state.step}", hint="lower train.learning_rate")
            mlog.write(json.dumps(row) + "\n")
            mlog.flush()
            progress.update(state.step, last_train, row["lr"], row["tokens_per_s"], val_loss)
            checkpoint_or_stop(run_dir, model, optimizer, scheduler, state, config_yaml, tc, total_steps,
                               st.save_every, stopping,
                               stop.signum, dist, step_module, writer=setup.writer)
    if val_items and val_eval is None:
        val_eval = grpo_eval(model, tokenizer, val_items, rewards, cfg, setup.fast)
    report = {}
    if base_eval and val_eval:
        keys = ("mean_reward", "pass_rate", "examples")
        report = {"grpo": {"base": {k: base_eval[k] for k in keys}, "tuned": {k: val_eval[k] for k in keys}}}
        if dist.is_main:
            write_json(run_dir / "grpo_eval.json", {**report["grpo"], "base_rewards": base_eval["rewards"],
                       "tuned_rewards": val_eval["rewards"], "base_passes": base_eval["passes"],
                       "tuned_passes": val_eval["passes"]}, indent=None)
        log(f"held-out pass rate: base {base_eval['pass_rate']:.1%} -> tuned {val_eval['pass_rate']:.1%} "
            f"(mean reward {base_eval['mean_reward']:.3f} -> {val_eval['mean_reward']:.3f})")
    return ObjectiveResult(state, last_train, None, time.time() - t0, report=report)


GRPO_PARTS = ObjectiveParts(load_grpo_data, wrap_logp_step, grpo_loop)
