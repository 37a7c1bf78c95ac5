"""One training run, from config to artefacts: the function behind `loraforge train`.

    run_dir/
      config.yaml          the validated config (every artefact says how it was made)
      data_report.json     how many examples were read, dropped as too long, used
      metrics.jsonl        one row per optimizer step (loss, lr, grad norm, tokens/s, val_loss)
      checkpoints/         crash-safe checkpoints (see train.checkpoint)
      adapter/             the PEFT adapter + tokenizer (PeftModel.from_pretrained loads it): the last step's, or
                           the best validation step's with train.select_by=loss|metric (train.selection)
      replay.jsonl         with train.replay: the base model's answers mixed into training (train.replay)
      summary.json         final losses, steps, time, which step's weights adapter/ holds and why
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from loraforge.config import RunConfig
from loraforge.data.batching import split_validation
from loraforge.data.formats import Example, read_examples
from loraforge.data.packing import pack
from loraforge.data.templates import tokenize_all
from loraforge.errors import LoraforgeError
from loraforge.model.adapters import save_adapter, trainable_parameters
from loraforge.model.prepare import prepare_for_training
from loraforge.model.load import base_dtype, load_base, pick_device
from loraforge.train import distributed as D
from loraforge.train.checkpoint import (PREFIX, TrainerState, gather_adapter, latest_good, load_checkpoint,
                                        save_checkpoint, write_adapter)
from loraforge.train.loop import plan_steps, prepare_model, train_loop
from loraforge.train.replay import replay_examples
from loraforge.train.selection import Selection, TaskTools, adopt_best

console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    model: object          # the PEFT model, trained, in eval mode
    tokenizer: object
    base_path: str
    summary: dict


def resolve_precision(requested: str, device: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if requested == "fp32":
        return None
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if requested == "bf16" and not ok:
        raise LoraforgeError(f"train.precision=bf16 but this {device} has no bf16 support",
                             hint="use train.precision=fp32 (or auto)")
    return torch.bfloat16 if ok else None


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    if resume:
        if not run_dir.is_dir():
            raise LoraforgeError("nothing to resume: the run folder does not exist", where=str(run_dir),
                                 hint="start the run without --resume")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise LoraforgeError("the run folder already exists and is not empty", where=str(run_dir),
                                 hint="pass --resume to continue it, --overwrite to replace it, "
                                      "or set output_dir to a new folder")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, base=None,
                 dir_ready: bool = False, tools: TaskTools | None = None) -> RunResult:
    """Train as `cfg` says. `base` = (model, tokenizer, path) reuses an already loaded base model;
    `dir_ready` says the caller already created output_dir (with prepare_run_dir) and put data in it;
    `tools` (loraforge.eval.validation.task_tools) generate and score for select_by=metric and replay."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    # under torchrun: join the process group, check every rank has the same config; rank 0 alone writes
    dist = D.init_distributed(cfg.train.distributed, pick_device(cfg.train.device), cfg.train.dist_timeout_s)
    console.quiet = not dist.is_main
    D.check_same(dist, "config", cfg.to_yaml())
    run_dir = Path(cfg.output_dir) if dir_ready else dist.on_main(prepare_run_dir, cfg, resume, overwrite)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = pick_device(cfg.train.device)
    accelerator = Accelerator(cpu=device == "cpu")
    amp_dtype = resolve_precision(cfg.train.precision, device)
    autocast = (lambda: torch.autocast(device, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    # FSDP2 loads the base in CPU memory (an NF4 base quantised one linear at a time on the GPU): sharding
    # then moves each layer's shard to its GPU, no GPU holds it all
    fsdp = dist.enabled and dist.mode == "fsdp"
    load_on = "cpu" if fsdp and cfg.model.quantization == "none" else device
    # the dtype is the training device's (FSDP2 loads a bf16 GPU base on the CPU first, still in bf16)
    model, tokenizer, base_path = base or load_base(cfg.base_model, dtype=base_dtype(cfg.model.dtype, device),
                                                    device=load_on,
                                                    attn_implementation=cfg.model.attn_implementation,
                                                    quantization=cfg.model.quantization,
                                                    store_on="cpu" if fsdp else None)
    replay = None
    if cfg.train.replay:  # the base model's own answers, generated before the adapter exists (rank 0; cached)
        if tools is None:
            raise LoraforgeError("train.replay needs a generator", hint="train through `loraforge train`, or pass "
                                 "tools=loraforge.eval.validation.task_tools(cfg)")
        from loraforge.train.replay import CACHE, base_answers

        def replay(n_task: int) -> list:
            answer = lambda ins: dist.on_main(base_answers, ins, model, tokenizer, tools.generate,  # noqa: E731
                                              run_dir / CACHE, cfg.base_model, cfg.data.max_seq_length,
                                              console.print)
            return replay_examples(n_task, cfg.train.replay, cfg.seed, answer)
    train_items, val_items, data_report, val_ex = load_data(cfg, tokenizer, replay)
    rows = train_items
    if cfg.data.packing:  # best-fit rows of max_seq_length; each example attends only to itself
        rows = pack(train_items, cfg.data.max_seq_length)
        data_report["packed_rows"] = len(rows)
    if dist.enabled:
        D.check_same(dist, "training data", D.data_fingerprint(train_items + val_items))
    if dist.is_main:
        write_json(run_dir / "data_report.json", data_report)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        from loraforge.plan.for_run import estimate_for_run  # `loraforge plan`'s estimate for this exact run

        gpu = torch.cuda.get_device_properties(device) if device == "cuda" else None
        console.print(estimate_for_run(cfg, model.config.to_dict(), [len(t.input_ids) for t in train_items],
                                       gpu and gpu.name, gpu and gpu.total_memory, dist.world)[0])

    train_items = rows
    torch.manual_seed(cfg.seed)
    compute_dtype = amp_dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    model, fast = prepare_for_training(model, cfg, device, compute_dtype, base_path=base_path,
                                       sharded=fsdp, log=console.print)
    step_module = prepare_model(model, dist, device, fast)  # DDP / FSDP2 under torchrun; before the optimizer
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg, device)
    _, total_steps = plan_steps(len(train_items), cfg)
    warmup = round(cfg.train.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    state = TrainerState()
    if resume:
        ckpt = latest_good(run_dir / "checkpoints", warn=lambda m: console.print(f"[yellow]warning:[/] {m}"))
        if ckpt is None:
            raise LoraforgeError("no usable checkpoint to resume from", where=str(run_dir / "checkpoints"),
                                 hint="start again with --overwrite")
        state = load_checkpoint(ckpt, model, optimizer, scheduler, dist, step_module)
        if dist.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", state.step)
        console.print(f"resuming from {ckpt} (step {state.step}/{total_steps})")

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
                  f"({'bf16' if amp_dtype else 'fp32'} compute): {n_trainable:,} trainable parameters, "
                  f"{len(train_items)} {'packed rows' if cfg.data.packing else 'examples'}, {total_steps} steps")
    result = train_loop(model, tokenizer, optimizer, scheduler, accelerator, autocast, train_items, val_items, cfg,
                        run_dir, state, log=console.print, fast=fast, dist=dist, step_module=step_module,
                        on_validate=selection if selection.active else None)
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
               "tokens_seen": result.state.tokens_seen, "device": device,
               "precision": "bf16" if amp_dtype else "fp32",
               "compute_dtype": str(compute_dtype).removeprefix("torch."), "trainable_parameters": n_trainable,
               "fast_path": fast is not None, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": dist.world,
               **selection.describe(), "replay_examples": data_report["replay_examples"]}
    if dist.is_main:
        write_json(run_dir / "summary.json", summary)
    dist.barrier()
    D.finish(dist)
    console.print(f"adapter saved in {adapter_dir}  (final train loss {result.final_train_loss:.4f}"
                  + (f", validation loss {result.final_val_loss:.4f})" if result.final_val_loss is not None else ")")
                  + (f"\nadapter/ holds step {summary['selected_step']}: {summary['selection']}" if best else ""))
    return RunResult(run_dir, adapter_dir, model, tokenizer, base_path, summary)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from, so no step appears twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)
