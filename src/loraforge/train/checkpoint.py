"""Crash-safe checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint folder `checkpoints/step-00000050/` holds the adapter (PEFT format), optimizer and
scheduler state, RNG states, the trainer state (step, epoch, position in the epoch, metrics so far)
and the run config. It is written into a temporary folder, closed with a MANIFEST.json of SHA-256
digests, and renamed into place, so a killed process leaves either a whole checkpoint or none.
On resume the newest checkpoint whose files match its manifest is used; a truncated or corrupt one
is reported and skipped. Only the last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError

PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch in progress
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # validation results so far


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: TrainerState, config_yaml: str,
                    keep_last: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{state.step:08d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def latest_good(ckpt_root: Path, warn=print) -> Path | None:
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"checkpoint {ckpt} is unusable: {problem}; trying the previous one")
    return None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG from `ckpt`; returns the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise LoraforgeError(f"checkpoint does not match this model (unexpected {result.unexpected_keys[:3]})",
                             where=str(ckpt))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    extra = torch.load(ckpt / "state.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return TrainerState(**json.loads((ckpt / "trainer_state.json").read_text()))
