"""Read back what each tracker stored, with the tracker's own reader: {metric name: [(step, value), ...]}.

TensorBoard: its EventAccumulator. MLflow: MlflowClient.get_metric_history. Trackio: its SQLite store.
W&B (offline): wandb 0.31 ships no reader for its run files any more, so `wandb_history` walks the file's
LevelDB-log framing (7-byte record headers in 32 KiB blocks, after the ":W&B" file header) and decodes each
record with wandb's own protobuf classes (wandb.proto.wandb_internal_pb2.Record).
"""

from __future__ import annotations

import json
import struct
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


def wandb_records(path: Path):
    """Every Record of one offline run file (`run-<id>.wandb`), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                                  # the rest of a block too short for a header: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):                            # FULL, or the LAST fragment of a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(run_dir: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The history rows of every offline session of the run (a resumed run writes a second file)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") != "history":
                continue
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                if "/" in k and isinstance(v, (int, float)):
                    out.setdefault(k, []).append((row["_step"], v))
    return {k: sorted(v) for k, v in out.items()}


def wandb_summary(session: Path) -> dict:
    """The run summary one offline session ended with (its summary records, later updates winning)."""
    out: dict = {}
    for f in session.glob("run-*.wandb"):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") == "summary":
                out.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
    return out
