"""Crash-safe checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint folder `checkpoints/step-00000050/` holds the adapter (PEFT format), optimizer and
scheduler state, RNG states, the trainer state (step, epoch, position in the epoch, metrics so far)
and the run config. It is written into a temporary folder, closed with a MANIFEST.json of SHA-256
digests, and renamed into place, so a killed process leaves either a whole checkpoint or none.
Every file is fsynced before the rename (and the folder after it), so a power cut cannot leave a renamed
checkpoint with empty files. On resume the newest checkpoint whose files match its manifest is used; a
truncated or corrupt one is reported and moved to `checkpoints/corrupt/` (kept for a look, never counted
among the last `keep_last` checkpoints that are kept), and a save that was killed (`.step-*.tmp`) is removed.
The best checkpoint (TrainerState.protect_step, see train.selection) is kept too when the run selects
by validation.

Under torchrun rank 0 alone writes (the others wait), and the data position is global, so a checkpoint
resumes on any number of processes. With FSDP2 the sharded adapter and optimizer state are gathered to
rank 0 first and stored in the same layout as a single-process checkpoint (optimizer state indexed by
parameter position), and scattered back on load: one checkpoint format for 1 process, DDP and FSDP2.
"""

from __future__ import annotations

import json
import random
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError
from loraforge.files import sha256
from loraforge.train.distributed import SINGLE, DistContext

PREFIX = "step-"
CORRUPT = "corrupt"


@dataclass
class TrainerState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch in progress
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # validation results so far
    elapsed_s: float = 0.0   # training seconds so far, over every process that worked on the run
    grad_scaler: dict | None = None  # fp16's loss scale (train.precision)
    select_score: float | None = None  # train.selection: best validation quantity so far (higher is better)
    select_step: int | None = None     # the step that reached it
    since_best: int = 0                # validations since then without improvement
    protect_step: int | None = None    # the best step's checkpoint, never pruned by keep_last
    stopped_early: bool = False

    def start_clock(self) -> float:
        """The time.time() at which this run started, were it never stopped; elapsed() counts from it."""
        self._t0 = time.time() - self.elapsed_s
        return self._t0

    def elapsed(self) -> float:
        t0 = getattr(self, "_t0", None)
        return self.elapsed_s if t0 is None else time.time() - t0


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sharded(dist: DistContext) -> bool:
    return dist.enabled and dist.mode == "fsdp"


def _trainable_names(step_module) -> dict:
    return {id(p): n for n, p in step_module.named_parameters() if p.requires_grad}


def gather_adapter(model, step_module, dist: DistContext) -> dict | None:
    """FSDP2: the full trainable weights, keyed as the PEFT model names them, on rank 0 (a collective:
    every rank calls it). None when the model is not sharded (it saves itself)."""
    if not _sharded(dist):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(step_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
    return {k.removeprefix("model."): v for k, v in full.items()}


def _gather_optimizer(optimizer, step_module, dist: DistContext) -> dict:
    """The optimizer state as optimizer.state_dict() lays it out (states by parameter position)."""
    if not _sharded(dist):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(step_module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = _trainable_names(step_module)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    groups, start = [], 0
    for g, live in zip(full.get("param_groups", []), optimizer.param_groups):
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": list(range(start, start + len(live["params"])))})
        start += len(live["params"])
    return {"state": {index[n]: v for n, v in full.get("state", {}).items()}, "param_groups": groups}


def write_adapter(model, out_dir: Path, weights: dict | None, tokenizer=None) -> None:
    """PEFT adapter files (from `weights` when FSDP2 gathered them), written into out_dir."""
    kwargs = {"state_dict": weights} if weights is not None else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time and in order, from host copies taken when
    save_checkpoint returns: training goes on while the files are serialised, hashed and flushed. On an
    H100 the periodic saves of the 135M BANKING77 run (3 epochs, every 50 steps) took 8.84 of its 56.9 s
    of training (bench/results/train_e2e/s16), each mostly PEFT's state-dict walk, pickling and fsync; with
    the writer the same `loraforge train` run spent 1.41 of 41.9 s on its 37 saves (session 17, another H100
    machine: s17/h100_call2_135m_banking77_3epochs.json). Isolated, for SmolLM2-135M's r16 adapter and AdamW
    state on this project's CPU, the training thread waits 0.22 s a save written in place and 0.022 s handed to
    the writer (bench/checkpoint_save.py, median of 5). A save that
    is cut off leaves only its `.tmp` folder, which latest_good removes: the previous checkpoint stands."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="loraforge-checkpoint")
        self._thread.start()

    def _run(self, write) -> None:
        try:
            write()
        except BaseException as e:   # handed to the training thread by the next wait()
            self._error = e

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is on disk; raise what stopped it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise LoraforgeError(f"a checkpoint could not be written: {error}",
                                 hint="check the disk (space, permissions) of the run folder") from error


def _to_host(obj):
    """A copy of a (nested) state dict whose tensors live in host memory and no longer change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: TrainerState, config_yaml: str,
                    keep_last: int, dist: DistContext = SINGLE, step_module=None,
                    writer: CheckpointWriter | None = None, background: bool = False) -> Path:
    """checkpoints/step-N: written here, or with `writer` and `background` (one process) on its thread from
    host copies of the adapter, optimizer, scheduler, RNG and trainer state taken now. With a writer, a
    save first waits for the one before it."""
    final = ckpt_root / f"{PREFIX}{state.step:08d}"
    if writer is not None:
        writer.wait()
    weights = gather_adapter(model, step_module, dist)  # collectives first, on every rank
    optim_state = _gather_optimizer(optimizer, step_module, dist)
    state.elapsed_s = round(state.elapsed(), 3)
    extra = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
    state_json = json.dumps(asdict(state), indent=1)
    if background and writer is not None and not dist.enabled:
        # the trainable tensors under every name the model's state dict gives them (tied copies included), as
        # PEFT's save_pretrained would read them from the live model
        weights = {n: p.detach().to("cpu", copy=True) for n, p in model.state_dict(keep_vars=True).items()
                   if p.requires_grad}
        own = getattr(optimizer, "state_dict_is_snapshot", False)   # train.flat.FlatAdamW: copied once already
        snap = (optim_state if own else _to_host(optim_state), _to_host(extra), state_json, state.protect_step)
        writer.submit(lambda: _write_checkpoint(ckpt_root, final, model, weights, *snap, config_yaml, keep_last))
        return final
    if dist.is_main:
        _write_checkpoint(ckpt_root, final, model, weights, optim_state, extra, state_json, state.protect_step,
                          config_yaml, keep_last)
    dist.barrier()  # nobody leaves (or is stopped) before the checkpoint is whole
    return final


def _write_checkpoint(ckpt_root, final, model, weights, optim_state, extra, state_json, protect_step, config_yaml,
                      keep_last):
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(model, tmp, weights)
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(extra, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(state_json)
    (tmp / "config.yaml").write_text(config_yaml)
    manifest = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        if p.is_file():
            _fsync(p)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(ckpt_root)
    kept = None if protect_step is None else f"{PREFIX}{protect_step:08d}"  # the best one stays
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        if old.name != kept:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    manifest_path = ckpt / "MANIFEST.json"
    if not manifest_path.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "MANIFEST.json is corrupt"
    for name, digest in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def latest_good(ckpt_root: Path, warn=print) -> Path | None:
    """The newest whole checkpoint. Removes what killed saves left (`.step-*.tmp`) and moves each unusable
    checkpoint it meets to `corrupt/`, so it is neither tried nor counted again (rank 0 alone calls it)."""
    if ckpt_root.is_dir():
        for partial in ckpt_root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        aside = _quarantine(ckpt)
        warn(f"checkpoint {ckpt} is unusable: {problem}; moved to {aside}; trying the previous one")
    return None


def _quarantine(ckpt: Path) -> Path:
    dest_dir = ckpt.parent / CORRUPT
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / ckpt.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{ckpt.name}.{n}", n + 1
    ckpt.rename(dest)
    return dest


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, dist: DistContext = SINGLE,
                    step_module=None) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG from `ckpt`; returns the trainer state.
    Every rank reads the same files (shared storage); FSDP2 ranks keep their shards of them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    if _sharded(dist):
        _load_sharded(ckpt, model, optimizer, step_module, optim_state)
    else:
        weights = load_file(ckpt / "adapter_model.safetensors", device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise LoraforgeError(f"checkpoint does not match this model (unexpected {result.unexpected_keys[:3]})",
                                 where=str(ckpt))
        optimizer.load_state_dict(optim_state)
    extra = torch.load(ckpt / "state.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return TrainerState(**json.loads((ckpt / "trainer_state.json").read_text()))


def _load_sharded(ckpt: Path, model, optimizer, step_module, optim_state: dict) -> None:
    """FSDP2: full tensors from the files, scattered into this rank's shards."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = _trainable_names(step_module)
    fqns = list(names.values())
    # which file key is which parameter: let PEFT rename tagged stand-ins exactly as it does when saving
    tags = {n.removeprefix("model."): torch.tensor([float(i)]) for i, n in enumerate(fqns)}
    file_key = {k: fqns[int(v.item())] for k, v in get_peft_model_state_dict(model, state_dict=tags).items()}
    saved = load_file(ckpt / "adapter_model.safetensors")
    missing = sorted(set(file_key) - set(saved))
    if missing or set(saved) - set(file_key):
        raise LoraforgeError(f"checkpoint does not match this model (e.g. {(missing or sorted(saved))[:3]})",
                             where=str(ckpt))
    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(step_module, {file_key[k]: v for k, v in saved.items()}, options=full)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim_state["param_groups"]]
    set_optimizer_state_dict(step_module, optimizer, {"state": {order[i]: v for i, v in optim_state["state"].items()},
                                                      "param_groups": groups}, options=full)
