"""The first pass of `data split` over a file: the valid records' exact keys, labels and sources in
file order, their normalised form parked in a spool; sequential, or by worker processes for big JSONL.

    for part in scan(path, opts, tally, rejects, spool, workers=2):
        part.keys, part.labels, part.sources, part.examples   # examples: sequential pass only

The sequential pass is the reference (validate.iter_valid). For a JSONL file of PARALLEL_MIN_BYTES or
more, up to `workers` processes (a ProcessPoolExecutor of spawned interpreters: no fork) each read,
check and normalise a byte range of whole lines (the file's format is detected first, from its first
records, as the sequential pass would) and write a spool part, a rejects part and their keys/labels/sources; the parts are taken in order, so
outputs, counts and problem examples are the same as sequentially (a test compares them byte for byte).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.dedup import exact_key
from loraforge.data.formats import Example, ReadOptions, RecordStream, label_of, to_record
from loraforge.data.readers import dumps, file_kind
from loraforge.data.sinks import JsonlSink, Spool
from loraforge.data.validate import Tally, iter_valid, valid_items

PARALLEL_MIN_BYTES = 64 << 20
PARTS_PER_WORKER = 4  # more parts than workers, so the main process overlaps with them
KEY = 16              # bytes of an exact key


@dataclass(slots=True)
class Part:
    """Consecutive valid records: their exact keys (KEY bytes each), labels, sources, and the examples
    themselves when asked for (sequential pass only)."""

    keys: bytearray
    labels: list[str]
    sources: list[str]
    examples: list[Example] | None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def scan(path: str | Path, opts: ReadOptions, tally: Tally, rejects: JsonlSink | None, spool: Spool, *,
         workers: int = 1, keep_examples: bool = False) -> Iterator[Part]:
    """Valid records of `path` in order, in parts (see the module docstring); finishes `tally`."""
    p = Path(path)
    if workers > 1 and not keep_examples and file_kind(p) == "jsonl" and p.is_file() \
            and p.stat().st_size >= PARALLEL_MIN_BYTES:
        yield from _parallel(p, opts, tally, rejects, spool, workers)
    else:
        yield from _parts(iter_valid(p, opts, tally, rejects), spool.add, keep_examples)


def _parts(examples: Iterator[Example], park, keep_examples: bool, size: int = 1 << 16) -> Iterator[Part]:
    """Examples -> Parts of `size` records; each normalised record goes to `park` (a spool) first."""
    part, names = Part(bytearray(), [], [], [] if keep_examples else None), {}
    for ex in examples:
        park(to_record(ex))
        part.keys += exact_key(ex)
        label = label_of(ex)
        part.labels.append(names.setdefault(label, label))  # one object per label: small to pickle
        part.sources.append(ex.source)
        if part.examples is not None:
            part.examples.append(ex)
        if len(part.sources) >= size:
            yield part
            part = Part(bytearray(), [], [], [] if keep_examples else None)
    if part.sources:
        yield part


def _ranges(path: Path, parts: int) -> list[tuple[int, int, int]]:
    """(start, end, number of the line at start) of about `parts` byte ranges of whole lines."""
    size = path.stat().st_size
    out: list[tuple[int, int, int]] = []
    start = pos = 0
    line = at_pos = 1  # line numbers at `start` and at `pos`
    with path.open("rb") as f:
        for k in range(1, parts + 1):
            cut = size * k // parts
            if cut <= start:
                continue
            while pos < cut:
                chunk = f.read(min(1 << 22, cut - pos))
                at_pos, pos = at_pos + chunk.count(b"\n"), pos + len(chunk)
            rest = f.readline()  # finish the line the cut fell in
            at_pos, pos = at_pos + rest.count(b"\n"), pos + len(rest)
            out.append((start, pos, line))
            start, line = pos, at_pos
    return out


def _detect(path: Path, opts: ReadOptions) -> tuple:
    """The file's format as the sequential pass decides it: from its first record of a known format."""
    stream = RecordStream(path, opts)
    for _ in stream:
        if stream.format is not None:
            break
    return stream.format, stream.detected_at, stream.columns


def _scan_range(path: str, byte_range: tuple[int, int, int], opts: ReadOptions, preset: tuple,
                spool_part: Path) -> tuple[Tally, Part, bool]:
    """Worker: one byte range -> (tally, its records as one Part, whether it wrote rejects)."""
    stream = RecordStream(path, opts, byte_range)
    stream.format, stream.detected_at, stream.columns = preset
    tally = Tally(path)
    with spool_part.open("wb") as out, JsonlSink(spool_part.with_suffix(".rej"), lazy=True) as rej:
        def park(record: dict) -> None:
            out.write(dumps(record).encode("utf-8", "surrogatepass") + b"\n")

        parts = list(_parts(valid_items(stream, tally, rej), park, False, size=1 << 62))
    tally.formats = dict(stream.formats)
    return tally, parts[0] if parts else Part(bytearray(), [], [], None), rej.written


def _parallel(path: Path, opts: ReadOptions, tally: Tally, rejects: JsonlSink | None, spool: Spool,
              workers: int) -> Iterator[Part]:
    preset = _detect(path, opts)
    ranges = _ranges(path, workers * PARTS_PER_WORKER)
    # spawn: fresh interpreters (no fork of a process that may hold threads); at most `workers` parts in flight
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: dict[int, Future] = {}

        def submit(k: int) -> None:
            if k < len(ranges):
                running[k] = pool.submit(_scan_range, str(path), ranges[k], opts, preset, spool.part(k))

        try:
            for k in range(workers):
                submit(k)
            for k in range(len(ranges)):
                shard, records, rejected = running.pop(k).result()  # a worker's LoraforgeError is raised here
                submit(k + workers)
                part = spool.part(k)
                tally.merge(shard)
                spool.adopt(part)
                if rejected and rejects is not None:
                    with part.with_suffix(".rej").open(encoding="utf-8") as f:
                        for line in f:
                            rejects.write(line[:-1])
                yield records
        finally:
            for fut in running.values():
                fut.cancel()
    tally.format, tally.detected_at = preset[0], preset[1]
    tally.finish(None, rejects)
