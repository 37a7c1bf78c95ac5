"""Stream raw records out of JSONL, JSON (array), CSV/TSV and Parquet files, one at a time.

`read_raw(path)` yields a `Raw` per record: its line (or row) number, the parsed value, and a
`Problem` instead of a value when the record could not be read (bad JSON with line and column, bytes
that are not UTF-8, a table row that does not fit the header). Nothing is loaded whole: JSONL and
CSV go line by line, a JSON array is parsed element by element from 1 MiB chunks, Parquet in
batches, so a file larger than memory works. Files are opened read-only and never changed.
JSON goes through orjson when it is installed (3-5x faster), else the standard library.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.checks import Problem
from loraforge.errors import LoraforgeError

try:  # optional speed-up; results are identical
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

CHUNK = 1 << 20
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # huge fields are data, not errors


@dataclass(slots=True)
class Raw:
    """One record as read: `value` is None when `problem` says why it could not be read."""

    line: int
    where: str
    value: object = None
    problem: Problem | None = None
    text: str | None = None  # the raw line, for JSONL (so a rejects file can show it)


def loads(text: str | bytes) -> object:
    """json.loads, through orjson when available (falling back for what orjson refuses, e.g. NaN)."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text)


def dumps(value: object) -> str:
    """Compact JSON with non-ASCII kept as is; what JSON cannot hold (dates, bytes) becomes a string."""
    if _orjson is not None:
        try:
            return _orjson.dumps(value, default=str).decode()
        except TypeError:  # e.g. integers beyond 64 bits
            pass
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".csv": "csv", ".tsv": "tsv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "jsonl")


def check_data_file(path: str | Path, hint: str = "check the path") -> Path:
    """The path, if it is a readable file; else a LoraforgeError saying what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise LoraforgeError("this is a folder, not a data file", where=str(p), hint="give the file inside it")
    if not p.is_file():
        raise LoraforgeError("data file not found", where=str(p), hint=hint)
    if not os.access(p, os.R_OK):
        raise LoraforgeError("the data file is not readable (permission denied)", where=str(p),
                             hint="check its permissions")
    return p


def read_raw(path: str | Path, byte_range: tuple[int, int, int] | None = None) -> Iterator[Raw]:
    """Every record of a data file, in order; see the module docstring. For JSONL, `byte_range`
    (start, end, number of the line at start) reads only the lines that start in [start, end)."""
    p = check_data_file(path)
    kind = file_kind(p)
    if kind in ("csv", "tsv"):
        return _table(p, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return _parquet(p)
    if kind == "json":
        return _json(p)
    return _jsonl(p, *(byte_range or (0, None, 1)))


def _json_problem(e: json.JSONDecodeError, where: str) -> Problem:
    return Problem("invalid_json", f"not valid JSON: {e.msg} (column {e.colno})", where)


def _jsonl(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[Raw]:
    name = str(path)
    pos = start
    with path.open("rb") as f:
        f.seek(start)
        for lineno, raw in enumerate(f, first_line):
            if end is not None:
                if pos >= end:
                    break
                pos += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[3:]
            if raw.isspace() or not raw:
                continue
            where = f"{name}:{lineno}"
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Raw(lineno, where, problem=Problem("bad_encoding", f"bytes that are not UTF-8 at column "
                                                         f"{e.start + 1}", where),
                          text=raw.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            try:
                yield Raw(lineno, where, loads(text), text=text)
            except json.JSONDecodeError as e:
                yield Raw(lineno, where, problem=_json_problem(e, where), text=text)
            except RecursionError:
                yield Raw(lineno, where, problem=Problem("invalid_json", "JSON nested too deeply", where), text=text)


class _Chars:
    """A growing window of decoded text over a binary file, with line counting."""

    def __init__(self, f):
        self.f, self.buf, self.pos, self.line, self.eof = f, "", 0, 1, False
        self.dec = codecs.getincrementaldecoder("utf-8")()
        self.byte_offset = 0

    def more(self, size: int | None = None) -> bool:
        if self.eof:
            return False
        if self.pos > CHUNK:  # drop what was consumed
            self.buf, self.pos = self.buf[self.pos:], 0
        data = self.f.read(size or CHUNK)
        self.eof = not data
        try:
            self.buf += self.dec.decode(data, final=self.eof)
        except UnicodeDecodeError as e:
            raise _BadBytes(self.byte_offset + e.start) from None
        self.byte_offset += len(data)
        return True

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def skip_space(self) -> str:
        """The next non-space character ('' at the end), consumed up to it but not past it."""
        while True:
            n = len(self.buf)
            i = self.pos
            while i < n and self.buf[i] in " \t\r\n\ufeff":
                i += 1
            self.advance(i)
            if i < n or not self.more():
                return self.buf[i] if i < len(self.buf) else ""


class _BadBytes(Exception):
    def __init__(self, offset: int):
        self.offset = offset


def _json(path: Path) -> Iterator[Raw]:
    """A JSON array streamed element by element; `{...}` files are one record, `{"data": [...]}`, or JSONL."""
    with path.open("rb") as f:
        head = f.read(CHUNK).removeprefix(codecs.BOM_UTF8).lstrip()
    first, newline, rest = head.partition(b"\n")
    if head.startswith(b"{") and newline and rest.strip():  # maybe JSON Lines in a .json file
        try:
            json.loads(first)
            yield from _jsonl(path)
            return
        except ValueError:
            pass
    with path.open("rb") as f:
        chars = _Chars(f)
        decoder = json.JSONDecoder()
        try:
            yield from _json_values(path, chars, decoder)
        except _BadBytes as e:
            where = f"{path}:{chars.line}"
            yield Raw(chars.line, where, problem=Problem("bad_encoding", f"bytes that are not UTF-8 at byte "
                                                         f"{e.offset + 1} of the file", where))


def _decode_next(chars: _Chars, decoder: json.JSONDecoder) -> tuple[object, int]:
    """The JSON value starting at chars.pos, reading more of the file while it is cut off."""
    size = CHUNK
    while True:
        try:
            value, end = decoder.raw_decode(chars.buf, chars.pos)
            if end < len(chars.buf) or chars.eof:
                return value, end
        except json.JSONDecodeError as e:
            cut = e.pos >= len(chars.buf) - 8 or e.msg.startswith("Unterminated string")
            if chars.eof or not cut:
                raise
        except RecursionError:
            raise json.JSONDecodeError("JSON nested too deeply", chars.buf, chars.pos) from None
        chars.more(size)
        size *= 2


def _json_values(path: Path, chars: _Chars, decoder: json.JSONDecoder) -> Iterator[Raw]:
    c = chars.skip_space()
    if c == "":
        return
    if c != "[":  # one object (or {"data": [...]}) read whole, as before
        where = f"{path}:{chars.line}"
        try:
            value, end = _decode_next(chars, decoder)
            chars.advance(end)
            if chars.skip_space() != "":
                raise json.JSONDecodeError("Extra data", chars.buf, chars.pos)
        except json.JSONDecodeError as e:
            yield _array_error(path, chars, e)
            return
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None) or value
        if not isinstance(value, list):
            yield Raw(chars.line, where, value)
            return
        for i, rec in enumerate(value, 1):  # positions, as the whole file was one value
            yield Raw(i, f"{path}:{i}", rec)
        return
    chars.advance(chars.pos + 1)
    expect_value, after_comma, n, prev_line = True, False, 0, 0
    while True:
        c = chars.skip_space()
        if c == "]" and not after_comma:
            return
        if c == "":
            yield _array_error(path, chars, json.JSONDecodeError("the array is not closed", chars.buf, chars.pos))
            return
        if not expect_value:
            if c != ",":
                yield _array_error(path, chars, json.JSONDecodeError("Expecting ',' delimiter", chars.buf, chars.pos))
                return
            chars.advance(chars.pos + 1)
            expect_value, after_comma = True, True
            continue
        line = chars.line
        try:
            value, end = _decode_next(chars, decoder)
        except json.JSONDecodeError as e:
            yield _array_error(path, chars, e)
            return
        chars.advance(end)
        n += 1
        yield Raw(line, f"{path}:{line}" if line != prev_line else f"{path}:{line} (record {n})", value)
        expect_value, after_comma, prev_line = False, False, line


def _array_error(path: Path, chars: _Chars, e: json.JSONDecodeError) -> Raw:
    line = chars.line + chars.buf.count("\n", chars.pos, e.pos) if e.pos >= chars.pos else chars.line
    col = e.pos - (chars.buf.rfind("\n", 0, e.pos) + 1) + 1
    where = f"{path}:{line}"
    return Raw(line, where, problem=Problem("invalid_json", f"not valid JSON: {e.msg} (column {col}); the rest of "
                                            "the file cannot be read", where))


def _table(path: Path, delimiter: str) -> Iterator[Raw]:
    """CSV/TSV rows as {header: value}; a row's number is the line it starts on."""
    bad_lines: set[int] = set()

    def lines() -> Iterator[str]:
        with path.open("rb") as f:
            for i, raw in enumerate(f, 1):
                if i == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad_lines.add(i)
                    yield raw.decode("utf-8", "replace")

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise LoraforgeError(f"cannot read the header row: {e}", where=f"{path}:1") from None
    if header is None:
        return
    prev = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            where = f"{path}:{prev + 1}"
            yield Raw(prev + 1, where, problem=Problem("bad_row", f"cannot read this row: {e}", where))
            return
        start, prev = prev + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{start}"
        if bad_lines.intersection(range(start, prev + 1)):
            yield Raw(start, where, problem=Problem("bad_encoding", "bytes that are not UTF-8 in this row", where))
        elif len(row) != len(header):
            yield Raw(start, where, problem=Problem("bad_row", f"{len(row)} fields, but the header has "
                                                    f"{len(header)}", where), value=dict(zip(header, row)))
        else:
            yield Raw(start, where, dict(zip(header, row)))


def _parquet(path: Path) -> Iterator[Raw]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoraforgeError("reading Parquet needs pyarrow", hint="pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise LoraforgeError(f"not a readable Parquet file: {e}", where=str(path)) from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield Raw(row, f"{path}:{row}", rec)
