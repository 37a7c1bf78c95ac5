"""Output files of the data commands: JSONL written atomically, rejects written with their reasons.

An output goes to `name.tmp` and is renamed into place only when the command succeeds, so a crash
never leaves half a file under the real name. A path that is one of the inputs is refused: the data
commands never modify their input files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from loraforge.data.readers import dumps
from loraforge.errors import LoraforgeError


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


class JsonlSink:
    """Lines of JSON to `path`; `lazy` sinks create no file until the first line. Use as a context
    manager: the file is committed on success and removed on an exception."""

    def __init__(self, path: str | Path, inputs: tuple = (), lazy: bool = False):
        self.path = Path(path)
        for src in inputs:
            if same_file(self.path, Path(src)):
                raise LoraforgeError("the output would overwrite an input file", where=str(self.path),
                                     hint="write the output to another path")
        if self.path.is_dir():
            raise LoraforgeError("the output path is a folder", where=str(self.path))
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self._f = None
        if not lazy:
            self._open()

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.tmp.open("w", encoding="utf-8")
        except OSError as e:
            raise LoraforgeError(f"cannot write the output: {e.strerror}", where=str(self.path)) from None

    def write(self, row: object) -> None:
        if self._f is None:
            self._open()
        self._f.write((row if isinstance(row, str) else dumps(row)) + "\n")
        self.count += 1

    @property
    def written(self) -> bool:
        return self._f is not None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.tmp.replace(self.path)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def reject_row(where: str, problems: list, raw) -> dict:
    """A rejects-file line: where the record is, why it was rejected, and the record itself."""
    row: dict = {"where": where, "problems": [p.to_dict() for p in problems]}
    if raw is not None and raw.text is not None:
        row["line"] = raw.text
    elif raw is not None:
        row["record"] = raw.value
    return row


def sibling(out: str | Path, tag: str) -> Path:
    """`train.jsonl` -> `train.<tag>.jsonl` beside it: where rejects and removed records go by default."""
    p = Path(out)
    return p.with_name(p.name.split(".")[0] + f".{tag}.jsonl")


class Spool:
    """Valid records parked in temporary files (in a folder beside `near`) between the pass that judges
    them and the pass that routes them, so neither pass holds the data in memory. Records are added
    here one by one, or come as whole part files that worker processes wrote (`part`, `adopt`)."""

    def __init__(self, near: str | Path):
        folder = Path(near).parent
        folder.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix=".spool-", dir=folder)
        self._files: list[Path] = []
        self._f = None

    def add(self, record: dict) -> None:
        if self._f is None:
            self._files.append(Path(self._dir.name) / f"own-{len(self._files):05d}")
            self._f = self._files[-1].open("wb")
        self._f.write(dumps(record).encode("utf-8", "surrogatepass") + b"\n")

    def part(self, k: int) -> Path:
        """A path in the spool folder for part file k."""
        return Path(self._dir.name) / f"part-{k:05d}"

    def adopt(self, path: Path) -> None:
        """Append a finished part file (its lines come after all added so far)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self._files.append(path)

    def lines(self) -> Iterator[str]:
        if self._f is not None:
            self._f.close()
            self._f = None
        for path in self._files:
            with path.open("rb") as f:
                for line in f:
                    yield line[:-1].decode("utf-8", "surrogatepass")

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()
        self._dir.cleanup()
