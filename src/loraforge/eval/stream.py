"""results.jsonl: every generation and judge verdict appended and flushed as it comes, reusable on resume.

    log = ResultLog(out_dir / "results.jsonl", eval_fingerprint(cfg, run_dir, device), resume=True)
    key = log.key("finetuned", [batch, max_new_tokens])   # same model + config + batch of prompts -> same key
    row = log.lookup(f"{key}-0")                    # the row streamed by an earlier (interrupted) run, or None
    log.write({"model": "finetuned", "index": 0, "answer": "...", "key": f"{key}-0"})

Each row carries a key: a hash of the evaluation fingerprint (base model, adapter weights, dtype,
decoding, batch size, few-shot settings), the model's name and the exact prompts of its batch (so a
reused answer was made in the very same padded batch) plus its place in it; judge verdicts are keyed
by the judge, the prompt and the answers judged. With resume=True the
rows already in the file are read back (a line cut by a kill is skipped) and new rows are appended;
rows whose key no longer matches (another adapter, other decoding) are simply never looked up.
Without resume the file starts empty.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from loraforge.files import sha256


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str | None:
    return sha256(path) if path.is_file() else None


def eval_fingerprint(cfg, run_dir: Path, device: str) -> str:
    """What the generations depend on besides the prompt: weights, dtype, decoding, batching, few-shot set."""
    ec = cfg.eval
    return _sha({"base": cfg.base_model, "adapter": file_digest(run_dir / "adapter" / "adapter_model.safetensors"),
                 "dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation, "device": device,
                 "max_new_tokens": ec.max_new_tokens, "batch_size": ec.batch_size, "fewshot": ec.fewshot,
                 "fewshot_system": ec.fewshot_system, "system": cfg.data.system_prompt, "seed": cfg.seed,
                 "train": file_digest(Path(cfg.data.train)) if cfg.data.train and ec.fewshot else None,
                 "constrained": [getattr(ec, "constrained", "auto")] + [  # what structured decoding decodes to
                     file_digest(Path(f)) for f in (ec.labels, ec.schema_file) if f and Path(f).is_file()]})


class ResultLog:
    """results.jsonl, appended and flushed after every batch; with resume, earlier rows are kept and reusable."""

    def __init__(self, path: Path, fingerprint: str = "", resume: bool = False):
        self.path, self.fingerprint = path, fingerprint
        self.cache: dict[str, dict] = {}
        self.reused = 0
        if resume and path.is_file():
            raw = path.read_text(encoding="utf-8")
            for line in raw.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:        # the last line of a killed run may be cut short
                    continue
                if isinstance(row, dict) and row.get("key"):
                    self.cache[row["key"]] = row
            self.f = path.open("a", encoding="utf-8")
            if raw and not raw.endswith("\n"):
                self.f.write("\n")
        else:
            self.f = path.open("w", encoding="utf-8")

    def key(self, name: str, item: Any) -> str:
        return _sha([self.fingerprint, name, item])[:32]

    def lookup(self, key: str) -> dict | None:
        return self.cache.get(key)

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, default=str) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
