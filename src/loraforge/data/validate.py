"""Validate a data file: check every record, group the problems by kind, keep the invalid ones.

    report = validate_file("train.jsonl", out="clean.jsonl", rejects="rejects.jsonl",
                           tokenizer=tok, max_seq_length=2048)

Every record goes through the same checks as the training path (checks.py via formats.py), but
nothing stops at the first problem: each kind gets a count and its first examples (file:line).
Invalid records go to the rejects file with their reasons, never silently dropped; valid ones to
`out` as `messages` JSONL (that is also `data convert`). With a tokenizer, records are also measured
after the chat template against max_seq_length, and the loss mask of the first ones is checked.
The other commands (dedup, split, inspect, sample) read through `iter_valid`, so they report and
reject exactly as validate does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.data.checks import KINDS, Problem, first_error
from loraforge.data.formats import (
    Checked,
    Example,
    ReadOptions,
    RecordStream,
    to_record,
)
from loraforge.data.sinks import JsonlSink, reject_row
from loraforge.data.templates import (
    full_text,
    mask_problems,
    template_family,
    token_lengths,
)
from loraforge.errors import LoraforgeError

FIRST_EXAMPLES = 5
MASK_CHECKS = 1000  # loss masks checked per file (the template treats similar records alike)
BATCH = 512


@dataclass
class ProblemGroup:
    kind: str
    count: int = 0
    examples: list[str] = field(default_factory=list)  # "file:line: message"

    @property
    def title(self) -> str:
        return KINDS[self.kind].title

    @property
    def severity(self) -> str:
        return KINDS[self.kind].severity


@dataclass
class Tally:
    """Counts of one pass over a file: records, valid/invalid, problems grouped by kind."""

    path: str
    format: str | None = None
    detected_at: str | None = None
    formats: dict = field(default_factory=dict)
    records: int = 0
    valid: int = 0
    invalid: int = 0
    with_warnings: int = 0
    labelled: int = 0  # valid records with an explicit label (a `label` field or a mapped column)
    groups: dict[str, ProblemGroup] = field(default_factory=dict)
    rejects_path: str | None = None
    rejected: int = 0

    def add(self, problems: list[Problem]) -> bool:
        """Count one record; True when it is valid (warnings allowed)."""
        self.records += 1
        if not problems:
            self.valid += 1
            return True
        for p in problems:
            g = self.groups.setdefault(p.kind, ProblemGroup(p.kind))
            g.count += 1
            if len(g.examples) < FIRST_EXAMPLES:
                g.examples.append(f"{p.where}: {p.message}")
        bad = first_error(problems) is not None
        self.invalid += bad
        self.valid += not bad
        self.with_warnings += (not bad) and bool(problems)
        return not bad

    def merge(self, other: Tally) -> None:
        """Add the counts of a later part of the same file (see scan.py)."""
        for name in ("records", "valid", "invalid", "with_warnings", "labelled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, g in other.groups.items():
            mine = self.groups.setdefault(kind, ProblemGroup(kind))
            mine.count += g.count
            mine.examples += g.examples[:FIRST_EXAMPLES - len(mine.examples)]
        for fmt, n in other.formats.items():
            self.formats[fmt] = self.formats.get(fmt, 0) + n

    def finish(self, stream: RecordStream | None, rejects: JsonlSink | None) -> None:
        if stream is not None:
            self.format, self.detected_at = stream.format, stream.detected_at
            self.formats = dict(stream.formats)
        self.formats = dict(sorted(self.formats.items(), key=lambda kv: -kv[1]))
        if rejects is not None and rejects.written:
            self.rejects_path, self.rejected = str(rejects.path), rejects.count
        if self.records == 0:
            raise LoraforgeError("the data file has no records", where=self.path)

    def require_valid(self) -> None:
        """A command that needs valid records stops here (exit 2, no output written) when there are none."""
        if self.valid or not self.groups:
            return
        g = max(self.groups.values(), key=lambda g: g.count)
        hint = KINDS[g.kind].hint
        raise LoraforgeError(f"none of the {self.records:,} records is valid: {g.count:,} with {g.title} "
                             f"(first: {g.examples[0]})", where=self.path,
                             hint=f"{hint + '; ' if hint else ''}`loraforge data validate {self.path}` lists "
                                  f"every problem")

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "groups"}
        d["problems"] = {k: {"title": g.title, "severity": g.severity, "count": g.count, "examples": g.examples}
                         for k, g in sorted(self.groups.items(), key=lambda kv: -kv[1].count)}
        return d


def valid_items(stream: RecordStream, tally: Tally, rejects: JsonlSink | None) -> Iterator[Example]:
    """The valid examples of a stream, in order; invalid records are counted in `tally` and written to
    `rejects` with their reasons."""
    for item in stream:
        if tally.add(item.problems):
            if "label" in item.example.meta:
                tally.labelled += 1
            yield item.example
        elif rejects is not None:
            rejects.write(reject_row(item.where, item.problems, item.raw))


def iter_valid(path: str | Path, opts: ReadOptions, tally: Tally, rejects: JsonlSink | None) -> Iterator[Example]:
    """The valid examples of a whole file (see valid_items); the tally is finished at the end."""
    stream = RecordStream(path, opts)
    yield from valid_items(stream, tally, rejects)
    tally.finish(stream, rejects)


@dataclass
class ValidationReport(Tally):
    out_path: str | None = None
    written: int = 0
    max_seq_length: int | None = None
    lengths_checked: bool = False
    masks_checked: int = 0
    model_family: str | None = None

    @property
    def clean(self) -> bool:
        return not self.groups


def validate_file(path: str | Path, opts: ReadOptions = ReadOptions(), *, out: str | Path | None = None,
                  rejects: str | Path | None = None, tokenizer=None, max_seq_length: int = 2048,
                  train_on: str = "assistant") -> ValidationReport:
    """Check every record of `path`; see the module docstring. Input files are only read."""
    report = ValidationReport(str(path), max_seq_length=max_seq_length if tokenizer is not None else None,
                              lengths_checked=tokenizer is not None)
    if tokenizer is not None:
        report.model_family = template_family(tokenizer)
    stream = RecordStream(path, opts)
    out_sink = JsonlSink(out, inputs=(path,)) if out else None
    rej_sink = JsonlSink(rejects, inputs=(path,), lazy=True) if rejects else None
    pending: list[Checked] = []

    def settle(item: Checked) -> None:
        if report.add(item.problems):
            if out_sink is not None:
                out_sink.write(to_record(item.example))
        elif rej_sink is not None:
            rej_sink.write(reject_row(item.where, item.problems, item.raw))

    def flush() -> None:
        todo = [c for c in pending if c.example is not None]
        for item, n in zip(todo, token_lengths(tokenizer, [c.example for c in todo])):
            if n is None:
                item.problems.append(Problem("template_error", _template_error(tokenizer, item.example), item.where))
            elif n > max_seq_length:
                item.problems.append(Problem("too_long", f"{n} tokens after the chat template, over "
                                             f"max_seq_length={max_seq_length}", item.where))
            elif train_on == "assistant" and report.masks_checked < MASK_CHECKS:
                report.masks_checked += 1
                item.problems += [Problem("mask_mismatch", m, item.where)
                                  for m in mask_problems(tokenizer, item.example)]
            if first_error(item.problems):
                item.example = None
        for item in pending:
            settle(item)
        pending.clear()

    try:
        for item in stream:
            if tokenizer is not None and item.example is not None:
                pending.append(item)
                if len(pending) >= BATCH:
                    flush()
            elif pending:
                pending.append(item)  # keep file order in the outputs
            else:
                settle(item)
        if pending:
            flush()
        report.finish(stream, rej_sink)
    except BaseException:
        for sink in (out_sink, rej_sink):
            if sink is not None:
                sink.abort()
        raise
    if out_sink is not None and not report.valid:
        out_sink.abort()  # no empty output: the command reports the problems and fails
        out_sink = None
    for sink in (out_sink, rej_sink):
        if sink is not None:
            sink.close()
    if out_sink is not None:
        report.out_path, report.written = str(out_sink.path), out_sink.count
    if rej_sink is not None and rej_sink.written:
        report.rejects_path, report.rejected = str(rej_sink.path), rej_sink.count
    return report


def _template_error(tokenizer, example: Example) -> str:
    try:
        full_text(tokenizer, example)
    except LoraforgeError as e:
        return str(e).split(": ", 1)[-1].split("\n")[0]
    return "the chat template rejects this conversation"


def summary_counts(tally: Tally) -> Counter:
    """Problem counts by kind (for tests and JSON output)."""
    return Counter({k: g.count for k, g in tally.groups.items()})
