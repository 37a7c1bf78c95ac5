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
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from rich.console import Console

from loraforge.config import RunConfig, optimizer_of
from loraforge.data.batching import split_validation
from loraforge.data.formats import Example, read_examples
from loraforge.data.packing import pack
from loraforge.data.readers import check_data_file
from loraforge.data.templates import tokenize_all
from loraforge.errors import LoraforgeError, NothingToDo
from loraforge.files import atomic_write_text, write_json, write_lines
from loraforge.model.adapters import save_adapter, trainable_parameters
from loraforge.model.fast.graphs import settled_heap
from loraforge.model.fast.kernel_cache import kernels_cold
from loraforge.model.prepare import prepare_for_training
from loraforge.model.load import base_dtype, load_base, pick_device
from loraforge.train import distributed as D
from loraforge.train.checkpoint import (PREFIX, CheckpointWriter, TrainerState, gather_adapter, latest_good,
                                        load_checkpoint, save_checkpoint, write_adapter)
from loraforge.train.flat import FlatAdamW, can_flatten
from loraforge.train.folder import RunFolder, apply_changes, check_output_dir, check_resume, record_changes
from loraforge.plan.for_run import estimate_for_run, speed_inputs  # `loraforge plan`'s estimate for this run
from loraforge.train.loop import (LoopResult, LoopSetup, TrainingInterrupted, batch_buckets, plan_steps, prepare_model,
                                  train_loop)
from loraforge.train.precision import Precision
from loraforge.train.profiling import StepProfiler
from loraforge.train.tracking import Reporters, open_reporters
from loraforge.train.grpo_loop import GRPO_PARTS
from loraforge.train.preference_loop import PREFERENCE_PARTS, ObjectiveParts
from loraforge.train.replay import CACHE, base_answers, replay_examples
from loraforge.train.selection import Selection, TaskTools, adopt_best
from loraforge.train.shapes import run_shapes
from loraforge.train.validation_forwards import validation_scale

console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class TrainSummary:
    """summary.json: what the run did (to_dict() is the file's content, in this order)."""

    steps: int
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    train_seconds: float
    seconds_in: dict          # of train_seconds: validation, checkpoints
    tokens_seen: int
    device: str
    precision: str
    compute_dtype: str
    trainable_parameters: int
    fast_path: bool
    finished: str             # local time, ISO 8601
    processes: int
    tokens_per_s: float
    planned_tokens_per_s: float | None
    plan_speed: dict | None   # what the plan's speed model was given (one GPU, SFT)
    peak_reserved_gib: float | None
    peak_allocated_gib: float | None   # what tensors held at the peak (reserved adds the allocator's cache)
    objective: str
    selection: dict           # train.selection's account of which step adapter/ holds
    replay_examples: int
    report: dict              # the objective's own entries (preference, grpo)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("selection", "report")}
        out.pop("replay_examples")
        out.update(**self.selection, replay_examples=self.replay_examples, **self.report)
        return out


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    model: object          # the PEFT model, trained, in eval mode
    tokenizer: object
    base_path: str
    training: TrainSummary

    @property
    def summary(self) -> dict:
        """summary.json's content."""
        return self.training.to_dict()


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


def make_optimizer(params: list, cfg: RunConfig, device: str, sharded: bool = False, flat: bool = False):
    """`flat`: one process owns the gradients, so AdamW may step the adapter as one flat tensor (train.flat)."""
    tc, name = cfg.train, optimizer_of(cfg, sharded, device)
    if name == "adamw":
        cls = FlatAdamW if flat and can_flatten(params) else torch.optim.AdamW
        return cls(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=device == "cuda" or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoraforgeError(f"train.optimizer={name} needs bitsandbytes",
                             hint="pip install bitsandbytes, or use train.optimizer=adamw") from None
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, base=None,
                 dir_ready: bool = False, with_changes: bool = False, profile: Path | None = None,
                 tools: TaskTools | None = None) -> RunResult:
    """Train as `cfg` says. `base` = (model, tokenizer, path) reuses an already loaded base model;
    `dir_ready` says the caller already created output_dir (train.folder.RunFolder) and put data in it;
    `with_changes` lets --resume continue with a config that changes training (recorded in the run folder);
    `profile`: a folder for torch.profiler's tables of a few of the run's steps (train.profiling);
    `tools` (loraforge.eval.validation.task_tools) generate and score for select_by=metric and replay."""
    run = TrainingRun(cfg, resume=resume, overwrite=overwrite, dir_ready=dir_ready, with_changes=with_changes,
                      profile=profile, tools=tools)
    # 1. everything is checked before the run folder is touched: folder, resume, data, model, adapter
    run.check()
    run.load_model(base)
    run.load_data()
    run.prepare()
    # 2. the run folder: created (or swapped for the old run) now; put back as it was if the start fails
    run.open_folder()
    # 3. the objective's loop, then adapter/ and summary.json
    result = run.train()
    return run.finish(result)


class TrainingRun:
    """The stages of one run, in the order run_training calls them; each stage sets the attributes the
    next ones use (torchtune's recipe layout: setup stages, then train)."""

    def __init__(self, cfg: RunConfig, *, resume: bool, overwrite: bool, dir_ready: bool, with_changes: bool,
                 profile: Path | None, tools: TaskTools | None):
        self.cfg, self.resume, self.overwrite, self.dir_ready = cfg, resume, overwrite, dir_ready
        self.with_changes, self.profile, self.tools = with_changes, profile, tools
        self.plan = self.plan_speed = None
        self.writer: CheckpointWriter | None = None   # set by train(): one process's background checkpoint saves

    def check(self) -> None:
        """Join the process group under torchrun (every rank must have the same config; rank 0 alone
        writes); check the run folder, the resume and the data files; pick device and precision."""
        cfg = self.cfg
        self.dist = dist = D.init_distributed(cfg.train.distributed, pick_device(cfg.train.device),
                                              cfg.train.dist_timeout_s)
        console.quiet = not dist.is_main
        D.check_same(dist, "config", cfg.to_yaml())
        self.run_dir = Path(cfg.output_dir) if self.dir_ready else check_output_dir(cfg, self.resume, self.overwrite)
        self.changes = check_resume(self.run_dir, cfg, self.with_changes) if self.resume else {}
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = device = pick_device(cfg.train.device)
        self.fsdp = dist.enabled and dist.mode == "fsdp"
        self.precision = Precision.for_run(cfg.train.precision, device, sharded=self.fsdp)
        for path in (cfg.data.train, cfg.data.validation):  # named before the model loads
            if path:
                check_data_file(path, hint="check data.train / data.validation")

    def load_model(self, base=None) -> None:
        """The base model (or `base`, already loaded) and tokenizer."""
        cfg, device = self.cfg, self.device
        # FSDP2 loads the base in CPU memory (an NF4 base quantised one linear at a time on the GPU): sharding
        # then moves each layer's shard to its GPU, no GPU holds it all
        load_on = "cpu" if self.fsdp and cfg.model.quantization == "none" else device
        # the dtype is the training device's (FSDP2 loads a bf16 GPU base on the CPU first, still in bf16)
        # a GPU without bf16 computes in fp16: its frozen base is stored in fp16 too (auto would store bf16)
        dtype = "float16" if self.precision.name == "fp16" and cfg.model.dtype == "auto" and device == "cuda" \
            else base_dtype(cfg.model.dtype, device)
        self.model, self.tokenizer, self.base_path = base or load_base(
            cfg.base_model, dtype=dtype, device=load_on, attn_implementation=cfg.model.attn_implementation,
            quantization=cfg.model.quantization, store_on="cpu" if self.fsdp else None)
        self.special = objective_parts(cfg.objective)  # dpo/orpo/simpo/kto/grpo: their data, module and loop

    def load_data(self) -> None:
        """Training and validation items (replay answers mixed in, rows packed) and the data report."""
        cfg, dist, model, tokenizer = self.cfg, self.dist, self.model, self.tokenizer
        replay = self.replay_cache = None
        if cfg.train.replay:  # the base model's own answers, generated before the adapter exists (rank 0; cached)
            tools = self.tools
            if tools is None:
                raise LoraforgeError("train.replay needs a generator", hint="train through `loraforge train`, or "
                                     "pass tools=loraforge.eval.validation.task_tools(cfg)")
            # a run folder that does not exist yet is created only once everything is checked: the answers wait
            # in a temporary folder until then
            replay_cache = self.replay_cache = self.run_dir / CACHE if self.run_dir.is_dir() else \
                Path(tempfile.mkdtemp(prefix="lf-replay-")) / CACHE

            def replay(n_task: int) -> list:
                answer = lambda ins: dist.on_main(base_answers, ins, model, tokenizer, tools.generate,  # noqa: E731
                                                  replay_cache, cfg.base_model, cfg.data.max_seq_length,
                                                  console.print)
                return replay_examples(n_task, cfg.train.replay, cfg.seed, answer)
        if self.special:
            train_items, self.val_items, self.data_report = self.special.load(cfg, tokenizer, console.print)
            self.val_ex = []
        else:
            train_items, self.val_items, self.data_report, self.val_ex = load_data(cfg, tokenizer, replay)
        rows = train_items
        if cfg.data.packing:  # best-fit rows of max_seq_length; each example attends only to itself
            rows = pack(train_items, cfg.data.max_seq_length)
            self.data_report["packed_rows"] = len(rows)
        if dist.enabled:
            D.check_same(dist, "training data", D.data_fingerprint(train_items + self.val_items))
        self.example_lengths = [len(t.input_ids) for t in train_items]
        self.train_items = rows

    def prepare(self) -> None:
        """LoRA on the model (the fast path where it applies), the plan's estimate for this run (rank 0), DDP/FSDP2
        under torchrun, optimizer, schedule."""
        # transformers.optimization is imported here: 6 s at import time on this machine's CPU (measured)
        from transformers import get_scheduler

        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.compute_dtype = self.precision.dtype or next(
            p for p in self.model.parameters() if p.is_floating_point()).dtype
        self.model, self.fast = prepare_for_training(self.model, cfg, device, self.compute_dtype,
                                                     base_path=self.base_path, sharded=self.fsdp, log=console.print)
        # the SFT loop's padded batch lengths (CUDA graphs replay each), worked out once for the loop and the estimate
        self.buckets = batch_buckets(self.train_items, cfg, self.fast) if not self.special else None
        # SFT validation forwards: how many times the largest training batch's tokens each may take, from what
        # the fast path holds per token in training and without grad (model.fast.memory)
        self.val_scale = validation_scale(self.fast, cfg, self.train_items, self.val_items) \
            if not self.special else 1.0
        if self.dist.is_main:   # `loraforge plan`'s estimate for this exact run, on the shapes the loop will run
            self.plan, self.plan_speed = _estimate(cfg, self.model, self.example_lengths, self.train_items,
                                                   self.val_items, self.buckets, device, self.dist, self.special,
                                                   cold=self.fast is not None and kernels_cold(),
                                                   val_scale=self.val_scale)
            console.print(self.plan.text)
        # DDP / FSDP2 under torchrun; before the optimizer
        self.step_module = (self.special.prepare if self.special else prepare_model)(self.model, self.dist, device,
                                                                                     self.fast)
        self.params = trainable_parameters(self.model)
        self.optimizer = make_optimizer(self.params, cfg, device, self.fsdp, flat=not self.dist.enabled)
        if isinstance(self.optimizer, FlatAdamW) and self.fast is not None:
            self.fast.keep_grads()   # the CUDA graphs add into the flat gradient's views
        _, self.total_steps = plan_steps(len(self.train_items), cfg)
        warmup = round(cfg.train.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(cfg.train.lr_scheduler, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)

    def open_folder(self) -> None:
        """Create (or swap in) the run folder, load the checkpoint to resume from, write data_report.json and
        config.yaml; the old folder comes back if any of it fails."""
        cfg, dist, run_dir = self.cfg, self.dist, self.run_dir
        folder = RunFolder(run_dir, self.resume or self.dir_ready)
        dist.on_main(folder.open)
        try:
            self.state = TrainerState()
            if self.resume:
                self._resume()
            if dist.is_main:
                write_json(run_dir / "data_report.json", self.data_report)
                cache = self.replay_cache
                if cache is not None and cache.is_file() and cache.parent != run_dir:
                    shutil.move(cache, run_dir / cache.name)
                atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
            self.precision.track(self.state)
        except BaseException:
            dist.on_main(folder.abort)
            raise
        dist.on_main(folder.commit)

    def _resume(self) -> None:
        run_dir, dist, total_steps = self.run_dir, self.dist, self.total_steps
        warn = lambda m: console.print(f"[yellow]warning:[/] {m}")  # noqa: E731
        ckpt = dist.on_main(latest_good, run_dir / "checkpoints", warn=warn)
        if ckpt is None:
            raise LoraforgeError("no usable checkpoint to resume from", where=str(run_dir / "checkpoints"),
                                 hint="start again with --overwrite")
        self.state = state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, dist, self.step_module)
        if state.step >= total_steps:
            raise NothingToDo(f"the checkpoint {ckpt.name} is at the last step ({state.step}/{total_steps})",
                              where=str(run_dir), hint="start a new run with another output_dir, or --overwrite")
        apply_changes(self.changes, self.cfg, self.optimizer, self.scheduler)
        if dist.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", state.step)
            record_changes(run_dir, self.changes, state.step)
        console.print(f"resuming from {ckpt} (step {state.step}/{self.total_steps})")

    def save(self) -> Path:
        """A checkpoint of the current step in checkpoints/."""
        return save_checkpoint(self.run_dir / "checkpoints", self.model, self.optimizer, self.scheduler, self.state,
                               self.cfg.to_yaml(), self.cfg.train.keep_last, dist=self.dist,
                               step_module=self.step_module, writer=self.writer)

    def train(self) -> LoopResult:
        """The objective's loop (train.loop, train.preference_loop, train.grpo_loop), with the trackers."""
        cfg, dist, state = self.cfg, self.dist, self.state
        self.selection = selection = Selection(cfg, state, self.model, self.tokenizer, self.val_ex, self.save,
                                               self.tools, log=console.print)
        self.n_trainable = sum(p.numel() for p in self.params)
        fast = self.fast
        console.print(f"training {cfg.lora.adapter} r={cfg.lora.r}"
                      f"{' over an NF4 base' if cfg.model.quantization == 'nf4' else ''} on {self.device} "
                      f"({'fast Llama path' if fast else 'PEFT forward'}"
                      f"{', embedding and head over their FSDP2 shards' if fast and fast.vocab_parallel else ''}) "
                      f"({self.precision.name} compute{', loss scaling' if self.precision.scaler else ''}): "
                      f"{self.n_trainable:,} trainable parameters, "
                      f"{_count(len(self.train_items), 'packed row' if cfg.data.packing else 'example')}, "
                      f"{_count(self.total_steps, 'step')}")
        every, save = cfg.train.intervals(self.total_steps)   # train.eval_every / save_every, auto resolved
        auto = lambda key: " (auto)" if getattr(cfg.train, key) == "auto" else ""  # noqa: E731
        console.print((f"validation every {_count(every, 'step')}{auto('eval_every')}, " if self.val_items else "")
                      + f"checkpoints every {_count(save, 'step')}{auto('save_every')} and on SIGTERM/SIGINT")
        self.reporters = reporters = Reporters()  # train.report_to's trackers, on rank 0 (see train.tracking)
        if dist.is_main and cfg.train.report_to:
            reporters = self.reporters = open_reporters(cfg, self.run_dir, state.step if self.resume else None,
                                                        warn=console.print)
        device = torch.device("cuda", dist.local_rank) if self.device == "cuda" else torch.device(self.device)
        # periodic checkpoints written in the background on one process (CheckpointWriter); a save this run
        # makes itself (self.save: the selection's, the last step's) waits for it first
        self.writer = None if dist.enabled else CheckpointWriter()
        setup = LoopSetup(self.model, self.tokenizer, self.optimizer, self.scheduler, device, self.precision,
                          self.train_items, self.val_items, cfg, self.run_dir, state, log=console.print, fast=fast,
                          dist=dist, step_module=self.step_module, buckets=self.buckets, writer=self.writer,
                          val_scale=self.val_scale)
        with settled_heap():   # the cyclic collector skips what the loop starts with (see there)
            try:
                if self.special:   # dpo/orpo/simpo/kto/grpo: own loops (train.preference_loop, train.grpo_loop)
                    result = self.special.loop(setup)
                else:
                    result = train_loop(setup, on_log=reporters.log if reporters else None,
                                        profiler=StepProfiler(self.profile, self.total_steps)
                                        if self.profile and dist.is_main else None,
                                        on_validate=selection if selection.active else None)
                if self.writer is not None:
                    self.writer.wait()   # every checkpoint on disk before adapter/ is chosen from them
                return result
            except BaseException as e:
                if self.writer is not None:
                    try:   # the background save finishes (or fails) before the run reports how it ended
                        self.writer.wait()
                    except LoraforgeError as werr:
                        console.print(f"[yellow]warning:[/] {werr}")
                reporters.finish("interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)) else "failed")
                raise

    def finish(self, result: LoopResult) -> RunResult:
        """adapter/ (the last step's weights, or the selected step's), summary.json, the trackers closed."""
        dist = self.dist
        self.model.eval()
        adapter_dir, best = self._write_adapter()
        summary = self._summary(result)
        if dist.is_main:
            write_json(self.run_dir / "summary.json", summary.to_dict())
        self.reporters.finish("finished", summary.to_dict())
        dist.barrier()
        D.finish(dist)
        console.print(f"adapter saved in {adapter_dir}  (final train loss {result.final_train_loss:.4f}"
                      + (f", validation loss {result.final_val_loss:.4f})" if result.final_val_loss is not None
                         else ")")
                      + (f"\nadapter/ holds step {summary.selection['selected_step']}: "
                         f"{summary.selection['selection']}" if best else ""))
        return RunResult(self.run_dir, adapter_dir, self.model, self.tokenizer, self.base_path, summary)

    def _write_adapter(self) -> tuple[Path, Path | None]:
        """(adapter folder, the checkpoint it was taken from when train.select_by chose a step)."""
        dist, model, tokenizer, run_dir, state = self.dist, self.model, self.tokenizer, self.run_dir, self.state
        ckpt_root, adapter_dir = run_dir / "checkpoints", run_dir / "adapter"
        best = None
        if self.selection.by != "last" and state.protect_step is not None:  # adapter/ = the best step's weights
            if not (ckpt_root / f"{PREFIX}{state.step:08d}").is_dir():
                self.save()  # the last step's checkpoint stays in checkpoints/
            best = ckpt_root / f"{PREFIX}{state.protect_step:08d}"
            if not dist.enabled:
                adopt_best(model, best)
        if not dist.enabled:
            return save_adapter(model, adapter_dir, tokenizer), best
        weights = gather_adapter(model, self.step_module, dist)  # rank 0 writes (FSDP2: after gathering the shards)
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
        return adapter_dir, best

    def _summary(self, result: LoopResult) -> TrainSummary:
        dist, plan, device = self.dist, self.plan, self.device
        return TrainSummary(
            steps=result.state.step, final_train_loss=result.final_train_loss, final_val_loss=result.final_val_loss,
            best_val_loss=result.state.best_val_loss, best_step=result.state.best_step,
            train_seconds=round(result.seconds, 2), seconds_in=result.seconds_in,
            tokens_seen=result.state.tokens_seen, device=device, precision=self.precision.name,
            compute_dtype=str(self.compute_dtype).removeprefix("torch."), trainable_parameters=self.n_trainable,
            fast_path=self.fast is not None, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), processes=dist.world,
            tokens_per_s=round(result.state.tokens_seen / max(result.seconds, 1e-9), 1),
            planned_tokens_per_s=round(plan.tokens_per_s, 1) if dist.is_main and plan.tokens_per_s else None,
            plan_speed=self.plan_speed if dist.is_main else None,
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2 ** 30, 3) if device == "cuda" else None,
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if device == "cuda" else None,
            objective=self.cfg.objective, selection=self.selection.describe(),
            replay_examples=self.data_report.get("replay_examples", 0), report=getattr(result, "report", {}))


def _estimate(cfg: RunConfig, model, example_lengths: list[int], train_items, val_items, buckets, device: str, dist,
              special, cold: bool = False, val_scale: float = 1.0):
    """(plan.for_run's RunEstimate, summary.json's `plan_speed`): on one GPU with the SFT loop, from the run's
    own batch shapes (train.shapes); else from the loop model alone. `cold`: the fast path's Triton kernels were
    never compiled on this machine (model.fast.kernel_cache), so its first steps will compile them; `val_scale`:
    the validation forwards' budget multiplier."""
    gpu = torch.cuda.get_device_properties(device) if device == "cuda" else None
    shapes = None
    if gpu is not None and not special and not dist.enabled:
        shapes = run_shapes(train_items, val_items, cfg, buckets, cold, val_scale)
    plan = estimate_for_run(cfg, model.config.to_dict(), example_lengths, gpu and gpu.name,
                            gpu and gpu.total_memory, dist.world, shapes=shapes)
    inputs = speed_inputs(cfg, model.config.to_dict(), shapes, gpu.name, gpu.total_memory) if shapes else None
    return plan, inputs


def objective_parts(objective: str) -> ObjectiveParts | None:
    """None for sft (train.loop), else the preference loop's (dpo/orpo/simpo/kto) or GRPO's data, module and loop."""
    if objective == "sft":
        return None
    return GRPO_PARTS if objective == "grpo" else PREFERENCE_PARTS


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from, so no step appears twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_lines(path, rows)
