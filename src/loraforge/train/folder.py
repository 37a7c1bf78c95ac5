"""The run folder's life, so that nothing is lost and nothing half-made is left behind.

`check_output_dir` only looks (a file where the folder should be, an existing run without --resume or
--overwrite). `RunFolder.open` runs once the data, model and adapter are known good: it creates the folder,
or with --overwrite moves the old run aside (`.NAME.replaced`) and creates a fresh one. `commit` (the
training loop is about to start) deletes the old run; `abort` (anything failed before that) removes the new
folder and puts the old run back, so a failed run leaves neither an empty folder nor a lost one.

Resume checks: a run with `summary.json` has finished and has nothing to resume; a config that changes what
is trained (learning rate, data, LoRA, schedule, ...) against the run's `config.yaml` is refused unless
--resume-with-changes, which records the change in `resume_changes.jsonl`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

from loraforge.config import RunConfig
from loraforge.errors import LoraforgeError, NothingToDo

# keys whose change does not alter what is trained: bookkeeping, where it runs, how fast
NEUTRAL = {"output_dir", "train.eval_every", "train.save_every", "train.keep_last", "train.log_every",
           "train.num_threads", "train.device", "train.distributed", "train.dist_timeout_s",
           "model.attn_implementation", "model.gradient_checkpointing", "model.fast_path", "model.cuda_graphs"}
NEUTRAL_SECTIONS = ("eval.",)


def check_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """The run folder, checked; nothing is written."""
    run_dir = Path(cfg.output_dir)
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise LoraforgeError(f"output_dir must be a folder, but {p} is a file", where=str(run_dir),
                                 hint="set output_dir to a new folder (output_dir=runs/NAME)")
    if resume:
        if not run_dir.is_dir():
            raise LoraforgeError("nothing to resume: the run folder does not exist", where=str(run_dir),
                                 hint="start the run without --resume")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise LoraforgeError("the run folder already exists and is not empty", where=str(run_dir),
                             hint="pass --resume to continue it, --overwrite to replace it, "
                                  "or set output_dir to a new folder")
    return run_dir


class RunFolder:
    def __init__(self, path: Path, resume: bool):
        self.path, self.resume = path, resume
        self.aside: Path | None = None
        self.created = False

    def open(self) -> Path:
        if self.resume:
            return self.path
        if self.path.exists() and any(self.path.iterdir()):  # --overwrite (checked before)
            self.aside = self.path.with_name(f".{self.path.name}.replaced")
            shutil.rmtree(self.aside, ignore_errors=True)  # left by a run killed between open and commit
            self.path.rename(self.aside)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def commit(self) -> None:
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def abort(self) -> None:
        if self.resume:
            return
        if self.aside is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.aside.rename(self.path)
            self.aside = None
        elif self.created:
            shutil.rmtree(self.path, ignore_errors=True)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, dict]:
    """{key: {"was", "now"}} for each key whose change alters training."""
    a, b = _flatten(old), _flatten(new)
    return {k: {"was": a.get(k), "now": b.get(k)} for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in NEUTRAL and not k.startswith(NEUTRAL_SECTIONS)}


def check_resume(run_dir: Path, cfg: RunConfig, with_changes: bool) -> dict[str, dict]:
    """Before anything loads: finished runs and changed configs. Returns the (allowed) training changes."""
    saved = run_dir / "config.yaml"
    changes = {}
    if saved.is_file():
        changes = config_changes(yaml.safe_load(saved.read_text()) or {}, cfg.model_dump(mode="json"))
    if changes and not with_changes:
        lines = "\n  ".join(f"{k}: {v['was']!r} -> {v['now']!r}" for k, v in changes.items())
        raise LoraforgeError(f"the config differs from the run's config.yaml in what it trains:\n  {lines}",
                             where=str(saved), hint="resume with the run's own config, or pass "
                                                    "--resume-with-changes to continue with these (recorded "
                                                    "in resume_changes.jsonl)")
    summary = run_dir / "summary.json"
    if summary.is_file() and not changes:
        steps = json.loads(summary.read_text()).get("steps")
        raise NothingToDo(f"the run finished ({steps} steps); summary.json and the adapter are unchanged",
                          where=str(run_dir), hint="start a new run with another output_dir, or --overwrite")
    return changes


def record_changes(run_dir: Path, changes: dict, step: int) -> None:
    if not changes:
        return
    row = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step, "changes": changes}
    with (run_dir / "resume_changes.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def apply_changes(changes: dict, cfg: RunConfig, optimizer, scheduler) -> None:
    """After loading a checkpoint: the optimizer and scheduler take the new learning rate and weight decay
    (a checkpoint restores the old ones)."""
    if "train.learning_rate" in changes:
        scheduler.base_lrs = [cfg.train.learning_rate for _ in optimizer.param_groups]
        for g, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
            g["initial_lr"] = cfg.train.learning_rate
            g["lr"] = cfg.train.learning_rate * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if "train.weight_decay" in changes:
        for g in optimizer.param_groups:
            g["weight_decay"] = cfg.train.weight_decay
