"""One training run, from config to artefacts: the function behind `loraforge train`.

    run_dir/
      config.yaml          the validated config (every artefact says how it was made)
      data_report.json     how many examples were read, dropped as too long, used
      metrics.jsonl        one row per optimizer step (loss, lr, grad norm, tokens/s, val_loss)
      checkpoints/         crash-safe checkpoints (see train.checkpoint)
      adapter/             the PEFT adapter + tokenizer (PeftModel.from_pretrained loads it): the last step's, or
                           the best validation step's with train.select_by=loss|metric (train.selection)
      replay.jsonl         with train.replay: the base model's answers mixed into training (train.replay)
      summary.json         final losses, steps, time (written last: its presence means the run finished), which
                           step's weights adapter/ holds and why
      resume_changes.jsonl what --resume-with-changes changed, and at which step
      tracking.json        the trackers' run ids and last steps (train.report_to; see train.tracking)
      tensorboard/, wandb/ TensorBoard event files, W&B offline runs (when reported to)

Everything is checked (run folder, data, model, adapter, optimizer) before the run folder is touched; see
train.folder for how an old run survives a failed --overwrite.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from loraforge.config import RunConfig
from loraforge.data.batching import split_validation
from loraforge.data.formats import Example, read_examples
from loraforge.data.packing import pack
from loraforge.data.readers import check_data_file
from loraforge.data.templates import tokenize_all
from loraforge.errors import LoraforgeError, NothingToDo
from loraforge.files import atomic_write_text, write_json, write_lines
from loraforge.model.adapters import save_adapter, trainable_parameters
from loraforge.model.prepare import prepare_for_training
from loraforge.model.load import base_dtype, load_base, pick_device
from loraforge.train import distributed as D
from loraforge.train.checkpoint import (PREFIX, TrainerState, gather_adapter, latest_good, load_checkpoint,
                                        save_checkpoint, write_adapter)
from loraforge.train.folder import RunFolder, apply_changes, check_output_dir, check_resume, record_changes
from loraforge.train.loop import TrainingInterrupted, batch_buckets, plan_steps, prepare_model, train_loop
from loraforge.train.precision import Precision
from loraforge.train.profiling import StepProfiler
from loraforge.train.tracking import Reporters, open_reporters
from loraforge.train.preference_loop import objective_parts
from loraforge.train.replay import replay_examples
from loraforge.train.selection import Selection, TaskTools, adopt_best
from loraforge.train.shapes import run_shapes

console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    model: object          # the PEFT model, trained, in eval mode
    tokenizer: object
    base_path: str
    summary: dict


def load_data(cfg: RunConfig, tokenizer, replay=None) -> tuple[list, list, dict, list[Example]]:
    """(training items, validation items, data report, validation examples); `replay(n_task)` returns the
    replay examples mixed into the training set (train.replay)."""
    d = cfg.data
    if not d.train:
        raise LoraforgeError("no training data: set data.train", hint="e.g. loraforge train run.yaml "
                             "data.train=train.jsonl")
    opts = dict(prompt_column=d.prompt_column, response_column=d.response_column, system_prompt=d.system_prompt)
    train_ex: list[Example] = read_examples(d.train, d.format, **opts)
    if d.validation:
        val_ex = read_examples(d.validation, d.format, **opts)
    else:
        train_ex, val_ex = split_validation(train_ex, d.validation_split, cfg.seed)
    n_task = len(train_ex)
    if replay is not None:
        train_ex = train_ex + replay(n_task)
    train_items, train_long = tokenize_all(tokenizer, train_ex, d.max_seq_length, d.train_on, "training data")
    val_items, val_long = tokenize_all(tokenizer, val_ex, d.max_seq_length, d.train_on, "validation data") \
        if val_ex else ([], [])
    report = {"train_examples": len(train_items), "validation_examples": len(val_items),
              "dropped_too_long": len(train_long) + len(val_long), "too_long_sources": (train_long + val_long)[:20],
              "max_seq_length": d.max_seq_length,
              "train_tokens": sum(len(t.input_ids) for t in train_items),
              "train_loss_tokens": sum(t.n_loss_tokens for t in train_items), "replay_examples": len(train_ex) - n_task}
    if report["dropped_too_long"]:
        console.print(f"[yellow]warning:[/] {report['dropped_too_long']} examples are longer than "
                      f"max_seq_length={d.max_seq_length} and were left out (first: {report['too_long_sources'][0]})")
    return train_items, val_items, report, val_ex


def make_optimizer(params: list, cfg: RunConfig, device: str):
    tc = cfg.train
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay,
                                 fused=device == "cuda" or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoraforgeError(f"train.optimizer={tc.optimizer} needs bitsandbytes",
                             hint="pip install bitsandbytes, or use train.optimizer=adamw") from None
    cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, base=None,
                 dir_ready: bool = False, with_changes: bool = False, profile: Path | None = None,
                 tools: TaskTools | None = None) -> RunResult:
    """Train as `cfg` says. `base` = (model, tokenizer, path) reuses an already loaded base model;
    `dir_ready` says the caller already created output_dir (train.folder.RunFolder) and put data in it;
    `with_changes` lets --resume continue with a config that changes training (recorded in the run folder);
    `profile`: a folder for torch.profiler's tables of a few of the run's steps (train.profiling);
    `tools` (loraforge.eval.validation.task_tools) generate and score for select_by=metric and replay."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    # under torchrun: join the process group, check every rank has the same config; rank 0 alone writes
    dist = D.init_distributed(cfg.train.distributed, pick_device(cfg.train.device), cfg.train.dist_timeout_s)
    console.quiet = not dist.is_main
    D.check_same(dist, "config", cfg.to_yaml())
    # 1. everything is checked before the run folder is touched: folder, resume, data, model, adapter
    run_dir = Path(cfg.output_dir) if dir_ready else check_output_dir(cfg, resume, overwrite)
    changes = check_resume(run_dir, cfg, with_changes) if resume else {}
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = pick_device(cfg.train.device)
    accelerator = Accelerator(cpu=device == "cpu")
    fsdp = dist.enabled and dist.mode == "fsdp"
    precision = Precision.for_run(cfg.train.precision, device, backward=accelerator.backward, sharded=fsdp)
    for path in (cfg.data.train, cfg.data.validation):  # named before the model loads
        if path:
            check_data_file(path, hint="check data.train / data.validation")

    # FSDP2 loads the base in CPU memory (an NF4 base quantised one linear at a time on the GPU): sharding
    # then moves each layer's shard to its GPU, no GPU holds it all
    load_on = "cpu" if fsdp and cfg.model.quantization == "none" else device
    # the dtype is the training device's (FSDP2 loads a bf16 GPU base on the CPU first, still in bf16)
    # a GPU without bf16 computes in fp16: its frozen base is stored in fp16 too (auto would store bf16)
    dtype = "float16" if precision.name == "fp16" and cfg.model.dtype == "auto" and device == "cuda" \
        else base_dtype(cfg.model.dtype, device)
    model, tokenizer, base_path = base or load_base(cfg.base_model, dtype=dtype,
                                                    device=load_on,
                                                    attn_implementation=cfg.model.attn_implementation,
                                                    quantization=cfg.model.quantization,
                                                    store_on="cpu" if fsdp else None)
    special = objective_parts(cfg.objective)  # dpo/orpo/simpo/kto/grpo: their data, module and loop
    replay = replay_cache = None
    if cfg.train.replay:  # the base model's own answers, generated before the adapter exists (rank 0; cached)
        if tools is None:
            raise LoraforgeError("train.replay needs a generator", hint="train through `loraforge train`, or pass "
                                 "tools=loraforge.eval.validation.task_tools(cfg)")
        from loraforge.train.replay import CACHE, base_answers

        # a run folder that does not exist yet is created only once everything is checked: the answers wait
        # in a temporary folder until then
        replay_cache = run_dir / CACHE if run_dir.is_dir() else Path(tempfile.mkdtemp(prefix="lf-replay-")) / CACHE

        def replay(n_task: int) -> list:
            answer = lambda ins: dist.on_main(base_answers, ins, model, tokenizer, tools.generate,  # noqa: E731
                                              replay_cache, cfg.base_model, cfg.data.max_seq_length,
                                              console.print)
            return replay_examples(n_task, cfg.train.replay, cfg.seed, answer)
    if special:
        train_items, val_items, data_report = special.load(cfg, tokenizer, console.print)
        val_ex = []
    else:
        train_items, val_items, data_report, val_ex = load_data(cfg, tokenizer, replay)
    rows = train_items
    if cfg.data.packing:  # best-fit rows of max_seq_length; each example attends only to itself
        rows = pack(train_items, cfg.data.max_seq_length)
        data_report["packed_rows"] = len(rows)
    if dist.enabled:
        D.check_same(dist, "training data", D.data_fingerprint(train_items + val_items))
    example_lengths = [len(t.input_ids) for t in train_items]
    train_items = rows
    torch.manual_seed(cfg.seed)
    compute_dtype = precision.dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    model, fast = prepare_for_training(model, cfg, device, compute_dtype, base_path=base_path,
                                       sharded=fsdp, log=console.print)
    if dist.is_main:   # `loraforge plan`'s estimate for this exact run, on the shapes the loop will run
        plan, plan_speed = _estimate(cfg, model, example_lengths, train_items, val_items, fast, device, dist, special)
        console.print(plan.text)
    # DDP / FSDP2 under torchrun; before the optimizer
    step_module = (special.prepare if special else prepare_model)(model, dist, device, fast)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg, device)
    _, total_steps = plan_steps(len(train_items), cfg)
    warmup = round(cfg.train.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)

    # 2. the run folder: created (or swapped for the old run) now; put back as it was if the start fails
    folder = RunFolder(run_dir, resume or dir_ready)
    dist.on_main(folder.open)
    try:
        state = TrainerState()
        if resume:
            warn = lambda m: console.print(f"[yellow]warning:[/] {m}")  # noqa: E731
            ckpt = dist.on_main(latest_good, run_dir / "checkpoints", warn=warn)
            if ckpt is None:
                raise LoraforgeError("no usable checkpoint to resume from", where=str(run_dir / "checkpoints"),
                                     hint="start again with --overwrite")
            state = load_checkpoint(ckpt, model, optimizer, scheduler, dist, step_module)
            if state.step >= total_steps:
                raise NothingToDo(f"the checkpoint {ckpt.name} is at the last step ({state.step}/{total_steps})",
                                  where=str(run_dir), hint="start a new run with another output_dir, or --overwrite")
            apply_changes(changes, cfg, optimizer, scheduler)
            if dist.is_main:
                _truncate_metrics(run_dir / "metrics.jsonl", state.step)
                record_changes(run_dir, changes, state.step)
            console.print(f"resuming from {ckpt} (step {state.step}/{total_steps})")
        if dist.is_main:
            write_json(run_dir / "data_report.json", data_report)
            if replay_cache is not None and replay_cache.is_file() and replay_cache.parent != run_dir:
                shutil.move(replay_cache, run_dir / replay_cache.name)
            atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        precision.track(state)
    except BaseException:
        dist.on_main(folder.abort)
        raise
    dist.on_main(folder.commit)

    ckpt_root = run_dir / "checkpoints"

    def save() -> Path:
        return save_checkpoint(ckpt_root, model, optimizer, scheduler, state, cfg.to_yaml(), cfg.train.keep_last,
                               dist=dist, step_module=step_module)

    selection = Selection(cfg, state, model, tokenizer, val_ex, save, tools, log=console.print)
    n_trainable = sum(p.numel() for p in params)
    console.print(f"training {cfg.lora.adapter} r={cfg.lora.r}"
                  f"{' over an NF4 base' if cfg.model.quantization == 'nf4' else ''} on {device} "
                  f"({'fast Llama path' if fast else 'PEFT forward'}"
                  f"{', embedding and head over their FSDP2 shards' if fast and fast.vocab_parallel else ''}) "
                  f"({precision.name} compute{', loss scaling' if precision.scaler else ''}): "
                  f"{n_trainable:,} trainable parameters, "
                  f"{_count(len(train_items), 'packed row' if cfg.data.packing else 'example')}, "
                  f"{_count(total_steps, 'step')}")
    reporters = Reporters()  # train.report_to's trackers, on rank 0 (see train.tracking)
    if dist.is_main and cfg.train.report_to:
        reporters = open_reporters(cfg, run_dir, state.step if resume else None, warn=console.print)
    try:
        if special:   # dpo/orpo/simpo/kto/grpo: their own loops (train.preference_loop, train.grpo_loop)
            result = special.loop(model, tokenizer, optimizer, scheduler, accelerator, precision.autocast,
                                  train_items, val_items, cfg, run_dir, state, log=console.print, fast=fast,
                                  dist=dist, step_module=step_module)
        else:
            result = train_loop(model, tokenizer, optimizer, scheduler, accelerator, precision.autocast,
                                train_items, val_items, cfg, run_dir, state, log=console.print, fast=fast,
                                dist=dist, step_module=step_module, precision=precision,
                                on_log=reporters.log if reporters else None,
                                profiler=StepProfiler(profile, total_steps) if profile and dist.is_main else None,
                                on_validate=selection if selection.active else None)
    except BaseException as e:
        reporters.finish("interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)) else "failed")
        raise
    model.eval()
    adapter_dir = run_dir / "adapter"
    best = None
    if selection.by != "last" and state.protect_step is not None:  # adapter/ = the best step's weights
        if not (ckpt_root / f"{PREFIX}{state.step:08d}").is_dir():
            save()  # the last step's checkpoint stays in checkpoints/
        best = ckpt_root / f"{PREFIX}{state.protect_step:08d}"
        if not dist.enabled:
            adopt_best(model, best)
    if dist.enabled:  # rank 0 writes (FSDP2: after gathering the shards)
        weights = gather_adapter(model, step_module, dist)
        if dist.is_main:
            tmp = run_dir / "adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if best is not None:  # the chosen checkpoint's adapter files as they are
                tmp.mkdir()
                for f in ("adapter_model.safetensors", "adapter_config.json"):
                    shutil.copy2(best / f, tmp / f)
                tokenizer.save_pretrained(tmp)
            else:
                write_adapter(model, tmp, weights, tokenizer)
            shutil.rmtree(adapter_dir, ignore_errors=True)
            tmp.rename(adapter_dir)
    else:
        adapter_dir = save_adapter(model, adapter_dir, tokenizer)
    summary = {"steps": result.state.step, "final_train_loss": result.final_train_loss,
               "final_val_loss": result.final_val_loss, "best_val_loss": result.state.best_val_loss,
               "best_step": result.state.best_step, "train_seconds": round(result.seconds, 2),
               "seconds_in": result.seconds_in,
               "tokens_seen": result.state.tokens_seen, "device": device, "precision": precision.name,
               "compute_dtype": str(compute_dtype).removeprefix("torch."), "trainable_parameters": n_trainable,
               "fast_path": fast is not None, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": dist.world,
               "tokens_per_s": round(result.state.tokens_seen / max(result.seconds, 1e-9), 1),
               "planned_tokens_per_s": round(plan.tokens_per_s, 1) if dist.is_main and plan.tokens_per_s else None,
               "plan_speed": plan_speed if dist.is_main else None,
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 3) if device == "cuda" else None}
    summary.update(objective=cfg.objective, **selection.describe(), replay_examples=data_report.get("replay_examples", 0),
                   **getattr(result, "report", {}))
    if dist.is_main:
        write_json(run_dir / "summary.json", summary)
    reporters.finish("finished", summary)
    dist.barrier()
    D.finish(dist)
    console.print(f"adapter saved in {adapter_dir}  (final train loss {result.final_train_loss:.4f}"
                  + (f", validation loss {result.final_val_loss:.4f})" if result.final_val_loss is not None else ")")
                  + (f"\nadapter/ holds step {summary['selected_step']}: {summary['selection']}" if best else ""))
    return RunResult(run_dir, adapter_dir, model, tokenizer, base_path, summary)


def _estimate(cfg: RunConfig, model, example_lengths: list[int], train_items, val_items, fast, device: str, dist,
              special):
    """(plan.for_run's RunEstimate, summary.json's `plan_speed`): on one GPU with the SFT loop, from the run's
    own batch shapes (train.shapes); else from the loop model alone."""
    from loraforge.plan.for_run import estimate_for_run, speed_inputs

    gpu = torch.cuda.get_device_properties(device) if device == "cuda" else None
    shapes = None
    if gpu is not None and not special and not dist.enabled:
        shapes = run_shapes(train_items, val_items, cfg, batch_buckets(train_items, cfg, fast))
    plan = estimate_for_run(cfg, model.config.to_dict(), example_lengths, gpu and gpu.name,
                            gpu and gpu.total_memory, dist.world, shapes=shapes)
    inputs = speed_inputs(cfg, model.config.to_dict(), shapes, gpu.name, gpu.total_memory) if shapes else None
    return plan, inputs


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from, so no step appears twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_lines(path, rows)
