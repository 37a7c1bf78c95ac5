"""What a W&B run already holds, read from its own run files (`RUN_DIR/wandb/*-<id>/run-<id>.wandb`).

W&B writes every record of a run (history rows, summary, config) to a transaction log before anything is
uploaded, in offline and online mode alike; wandb 0.31 has no Python reader for it any more. The file is a
LevelDB log: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte
header (CRC32C, length, type: full / first / middle / last fragment); each record is a wandb protobuf
`Record`, decoded with wandb's own classes. A file cut short by a kill ends at its last whole record.

`train --resume` asks `last_step` how far the run's history got, so the steps W&B really stored (and only
those: a killed process loses what W&B had not yet written) are not logged twice.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path) -> Iterator:
    """Every whole Record of one run file, in order."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:                           # too little room left in the block for a header: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + n > len(data):            # cut off by a kill
            return
        if n == 0 and kind == 0:                    # zero padding to the end of the block
            pos += left
            continue
        buf += data[pos + HEADER:pos + HEADER + n]
        pos += HEADER + n
        if kind in (1, 4):                          # a FULL record, or the LAST fragment of one
            rec = pb.Record()
            try:
                rec.ParseFromString(buf)
            except DecodeError:
                return
            buf = b""
            yield rec


def history(path: Path) -> Iterator[dict]:
    """The history rows of one run file: {key: value} with `_step`."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            yield {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    """The run's files, one per session (the first one and every resume), oldest first."""
    return sorted(Path(run_dir).glob(f"wandb/*-{run_id}/run-{run_id}.wandb"))


def last_step(run_dir: Path, run_id: str) -> int:
    """The highest step any session of the run wrote to its history (0 if none)."""
    return max((int(row.get("_step", 0)) for f in run_files(run_dir, run_id) for row in history(f)), default=0)
