"""Read back what each tracker stored, with the tracker's own reader: {metric name: [(step, value), ...]}.

TensorBoard: its EventAccumulator. MLflow: MlflowClient.get_metric_history. Trackio: its SQLite store.
W&B (offline): wandb 0.31 ships no reader for its run files any more, so loraforge.train.wandb_files walks
their LevelDB-log framing and decodes each record with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
from pathlib import Path


def tensorboard_history(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_history(uri: str, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def trackio_history(project: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, list[tuple[int, float]]] = {}
    for row in SQLiteStorage.get_logs(project, run_id=run_id):
        for k, v in row.items():
            if isinstance(v, (int, float)) and "/" in k:
                out.setdefault(k, []).append((row["step"], v))
    return {k: sorted(v) for k, v in out.items()}


def wandb_history(run_dir: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The history rows of every session of the run (a resumed run writes a second file)."""
    from loraforge.train.wandb_files import history, run_files

    out: dict[str, list[tuple[int, float]]] = {}
    for f in run_files(run_dir, run_id):
        for row in history(f):
            for k, v in row.items():
                if "/" in k and isinstance(v, (int, float)):
                    out.setdefault(k, []).append((row["_step"], v))
    return {k: sorted(v) for k, v in out.items()}


def wandb_summary(session: Path) -> dict:
    """The run summary one offline session ended with (its summary records, later updates winning)."""
    from loraforge.train.wandb_files import records

    out: dict = {}
    for f in session.glob("run-*.wandb"):
        for rec in records(f):
            if rec.WhichOneof("record_type") == "summary":
                out.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
    return out
