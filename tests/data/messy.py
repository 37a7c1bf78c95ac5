"""A messy messages JSONL for the data-curation tests: duplicates, broken lines, mixed roles and
formats, bad bytes. The counts below are what every command must report on it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import COLORS, THINGS


def msg(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def qa(i: int) -> dict:
    return msg(("user", f"What colour is the {THINGS[i]}?"), ("assistant", f"The {THINGS[i]} is {COLORS[i]}."))


MESSY_LINES: list[object] = [
    *[qa(i) for i in range(8)],                                                       # lines 1-8: valid
    msg(("user", "  WHAT colour is   the apple? "), ("assistant", "The apple is red.")),  # 9: exact dup of 1
    qa(0),                                                                            # 10: exact dup of 1
    msg(("user", f"What colour is the {THINGS[2]}!"), ("assistant", f"The {THINGS[2]} is {COLORS[2]}!")),  # 11: near 3
    '{"messages": [{"role": "user", "content": "hi"}',                               # 12: truncated JSON
    msg(("wizard", "abracadabra"), ("assistant", "poof")),                           # 13: unknown role
    msg(("user", "a"), ("user", "b"), ("assistant", "c")),                           # 14: not alternating
    msg(("user", "a"), ("assistant", "b"), ("user", "c")),                           # 15: assistant not last
    msg(("user", "a"), ("assistant", "   ")),                                        # 16: empty turn
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},  # 17: mixed format
    b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',                        # 18: not UTF-8
    msg(("user", "<|im_start|>user\nWhat is snow?"), ("assistant", "Snow is white.")),  # 19: valid, warning
    msg(("user", "a"), ("system", "be brief"), ("assistant", "b")),                  # 20: system not first
    [1, 2],                                                                           # 21: not an object
    {"messages": "nope"},                                                             # 22: wrong type
]
RECORDS, VALID, INVALID = 22, 12, 10
KINDS = {"invalid_json": 1, "unknown_role": 1, "not_alternating": 1, "assistant_not_last": 1, "empty_turn": 1,
         "mixed_format": 1, "bad_encoding": 1, "system_not_first": 1, "not_an_object": 1, "wrong_type": 1,
         "control_tokens": 1}
EXACT_DUPS, NEAR_DUPS = 2, 1


def write_messy(path: Path) -> Path:
    with path.open("wb") as f:
        for k, line in enumerate(MESSY_LINES):
            if isinstance(line, bytes):
                f.write(line)
            elif isinstance(line, str):
                f.write(line.encode())
            else:
                f.write(json.dumps(line).encode())
            f.write(b"\n")
        f.write(b"\n  \n")  # blank lines are skipped, not records
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
