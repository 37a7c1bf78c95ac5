"""The first pass of `data split` over a file: the valid records' exact keys, labels and sources in
file order, their normalised form parked in a spool; sequential, or by worker processes for big JSONL.

    for part in scan(path, opts, tally, rejects, spool, workers=2):
        part.keys, part.labels, part.sources, part.examples   # examples: sequential pass only

The sequential pass is the reference (validate.iter_valid). For a JSONL file of PARALLEL_MIN_BYTES or
more, up to `workers` processes (`python -m loraforge.data.scan`, fresh interpreters: no fork, no
re-import of the caller's main module) each read, check and normalise a byte range of whole lines
(the file's format is detected first, from its first records, as the sequential pass would) and
write a spool part, a rejects part and their keys/labels/sources; the parts are taken in order, so
outputs, counts and problem examples are the same as sequentially (a test compares them byte for byte).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.dedup import exact_key
from loraforge.data.formats import Example, ReadOptions, RecordStream, label_of, to_record
from loraforge.data.readers import dumps, file_kind
from loraforge.data.sinks import JsonlSink, Spool
from loraforge.data.validate import Tally, iter_valid, valid_items
from loraforge.errors import LoraforgeError

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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    running: dict[int, subprocess.Popen] = {}
    started = 0

    def launch() -> None:  # keep `workers` processes busy, parts in file order
        nonlocal started
        while started < len(ranges) and len(running) < workers:
            k, part = started, spool.part(started)
            with part.with_suffix(".task").open("wb") as f:
                pickle.dump((str(path), ranges[k], opts, preset, part), f)
            with part.with_suffix(".err").open("wb") as err:
                running[k] = subprocess.Popen([sys.executable, "-m", "loraforge.data.scan", str(part)], env=env,
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            started += 1

    try:
        launch()
        for k in range(len(ranges)):
            code = running.pop(k).wait()
            launch()
            part = spool.part(k)
            if code != 0:
                raise RuntimeError(f"data worker {k} failed:\n{part.with_suffix('.err').read_text()[-2000:]}")
            with part.with_suffix(".out").open("rb") as f:
                result = pickle.load(f)
            if isinstance(result, LoraforgeError):
                raise result
            shard, records, rejected = result
            tally.merge(shard)
            spool.adopt(part)
            if rejected and rejects is not None:
                with part.with_suffix(".rej").open(encoding="utf-8") as f:
                    for line in f:
                        rejects.write(line[:-1])
            yield records
    finally:
        for proc in running.values():
            proc.kill()
            proc.wait()
    tally.format, tally.detected_at = preset[0], preset[1]
    tally.finish(None, rejects)


def _worker(part: Path) -> None:
    """Entry point of a worker process: read the task beside `part`, write the part and the result."""
    with part.with_suffix(".task").open("rb") as f:
        path, byte_range, opts, preset = pickle.load(f)[:4]
    try:
        result = _scan_range(path, byte_range, opts, preset, part)
    except LoraforgeError as e:
        result = e
    with part.with_suffix(".out").open("wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":  # run under the module's real name, so what it pickles unpickles in the caller
    from loraforge.data.scan import _worker as worker

    worker(Path(sys.argv[1]))
