"""Overfitting verdict from a run's metrics.jsonl (one row per optimizer step, `val_loss` on some).

    from loraforge.eval.overfit import read_metrics, verdict
    v = verdict(read_metrics(run_dir / "metrics.jsonl"))   # v["overfitting"], v["signals"], v["best_step"]

Signals: the train loss fell below `low_train` (0.2: memorising); the validation loss rose for
`k` evaluations in a row; the gap validation - train widened over the last `k` evaluations.
Two or more signals: "overfitting"; one: "watch"; none: "ok". The best step is the one with the
lowest validation loss (the checkpoint to keep).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of metrics.jsonl; a missing file or a torn last line (a killed run) is tolerated."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def verdict(rows: list[dict], *, k: int = 3, low_train: float = 0.2) -> dict[str, Any]:
    """The verdict dict: status (ok | watch | overfitting | unknown), signals, best step and losses."""
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"], r.get("loss")) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    out: dict[str, Any] = {"status": "unknown", "signals": [], "best_step": None, "best_val_loss": None,
                           "final_train_loss": train[-1][1] if train else None,
                           "final_val_loss": val[-1][1] if val else None, "k": k, "low_train": low_train}
    if not train:
        out["signals"].append("no training metrics")
        return out
    signals = []
    if train[-1][1] < low_train:
        signals.append(f"train loss {train[-1][1]:.3f} < {low_train}")
    if val:
        best = min(val, key=lambda v: v[1])
        out["best_step"], out["best_val_loss"] = best[0], best[1]
        losses = [v[1] for v in val]
        if len(losses) > k and all(losses[-i] > losses[-i - 1] for i in range(1, k + 1)):
            signals.append(f"validation loss rose for {k} evaluations in a row")
        gaps = [v[1] - v[2] for v in val if isinstance(v[2], (int, float))]
        if len(gaps) > k and all(gaps[-i] > gaps[-i - 1] for i in range(1, k + 1)):
            signals.append(f"train/validation gap widened for {k} evaluations ({gaps[-k - 1]:.3f} -> {gaps[-1]:.3f})")
    else:
        signals_note = "no validation loss logged: only the train-loss signal is available"
        out["note"] = signals_note
    out["signals"] = signals
    out["status"] = "overfitting" if len(signals) >= 2 else "watch" if signals else "ok"
    return out
