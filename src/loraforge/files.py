"""One home for writing files atomically: every file loraforge writes goes to `name.tmp` beside it and is
renamed into place, so a crash leaves the old file or the new one, never half of one (DESIGN.md). Imports
nothing of loraforge, so every stage may use it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def tmp_path(path: Path) -> Path:
    """The temp file a write of `path` goes to first: `name.tmp` in the same folder (same file system)."""
    return path.with_name(path.name + ".tmp")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    path = Path(path)
    tmp = tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    path = Path(path)
    tmp = tmp_path(path)
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1, default: Callable | None = None,
               ensure_ascii: bool = True) -> Path:
    """`obj` as JSON (json.dumps with these arguments, no trailing newline), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default, ensure_ascii=ensure_ascii))


def write_jsonl(path: str | Path, rows: Iterable, dumps: Callable[[Any], str] = json.dumps) -> Path:
    """One `dumps(row)` a line, atomically; rows may be a generator (written as they come)."""
    path = Path(path)
    tmp = tmp_path(path)
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(dumps(row) + "\n")
    tmp.replace(path)
    return path


def write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """Each line plus a newline, atomically."""
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A folder written whole or not at all: yields an empty `name.tmp` folder to fill; when the block ends
    without an error it takes the place of `path` (an old one is renamed to `name.old` first and removed
    after, so `path` is missing only between two renames); on an error the temp folder is removed."""
    path = Path(path)
    tmp = tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
