"""Read training records and normalise them to one chat form: a list of {"role", "content"} turns.

Formats (detected per file from its first record of a known format unless the config names one):
  messages  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}   (OpenAI)
  sharegpt  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
  alpaca    {"instruction": ..., "input": ..., "output": ..., "system"?: ...}
  text      {"text": ...}: raw text for continued pretraining (one turn; every token carries loss)
  columns   any table with a prompt column and a response column, e.g. BANKING77's `text,category`
            (guessed from common names, or mapped with prompt_column/response_column and an optional
            prompt_template such as "Classify: {text}")
Files: JSONL, JSON (array), CSV/TSV, Parquet, all streamed (readers.py). Every example keeps
`source` ("file:line") so that errors and reports point at the record a user must fix.

`RecordStream` yields every record with its problems (checks.py); `read_examples`, the training
path, raises the first error instead, so both judge a record by the same checks.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import files
from loraforge.data.checks import ROLES, Problem, check_turns, first_error
from loraforge.data.readers import Raw, check_data_file, dumps, read_raw
from loraforge.errors import LoraforgeError

FORMATS = ("messages", "sharegpt", "alpaca", "text", "columns")
MESSAGE_ROLES = {r: r for r in ROLES}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant"}
PROMPT_COLUMNS = ("text", "prompt", "question", "query", "input", "sentence")
RESPONSE_COLUMNS = ("category", "label", "intent", "class", "completion", "response", "answer", "output")


@dataclass
class Example:
    """One conversation, normalised. `label` is the expected answer when the data has one."""

    messages: list[dict[str, str]]
    source: str
    label: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReadOptions:
    """How to read a file: its format ("auto" detects it) and, for tables, the column mapping."""

    format: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    prompt_template: str | None = None  # e.g. "Classify this banking query: {text}"
    system_prompt: str | None = None    # added to every conversation that has none

    def __post_init__(self):
        if self.format not in ("auto", *FORMATS):
            raise LoraforgeError(f"unknown format {self.format!r}; use auto or one of {', '.join(FORMATS)}")
        if self.prompt_template is not None:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None]
            except ValueError as e:
                raise LoraforgeError(f"bad prompt template: {e}", hint="write columns as {name}; "
                                     "double a literal brace: {{ }}") from None
            if not all(names):
                raise LoraforgeError("bad prompt template: name each column inside braces, e.g. {text}")


@dataclass(slots=True)
class Checked:
    """One record after reading and checking: `example` is None when any problem is an error."""

    where: str
    fmt: str
    example: Example | None
    problems: list[Problem]
    raw: Raw


def _tname(v: object) -> str:
    return "null" if v is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__)


def guess_columns(record: dict) -> tuple[str, str] | None:
    """(prompt column, response column) from common names, e.g. ("text", "category")."""
    prompt = next((c for c in PROMPT_COLUMNS if c in record), None)
    response = next((c for c in RESPONSE_COLUMNS if c in record and c != prompt), None)
    return (prompt, response) if prompt and response else None


def detect_format(record: object) -> str:
    """The format one record is in, or "unknown"."""
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if guess_columns(record):
            return "columns"
        if "text" in record:
            return "text"
    return "unknown"


def _turns(value: object, name: str, role_key: str, text_key: str, roles: dict, where: str,
           problems: list[Problem]) -> list[dict[str, str]]:
    if type(value) is list:  # the fast path: well-formed turns
        turns = []
        for t in value:
            if type(t) is not dict:
                break
            role, content = t.get(role_key), t.get(text_key)
            if type(content) is not str or type(role) is not str or role not in roles:
                break
            turns.append({"role": roles[role], "content": content})
        else:
            return turns
    if value is None:
        problems.append(Problem("missing_field", f"missing field '{name}'", where))
        return []
    if not isinstance(value, list):
        problems.append(Problem("wrong_type", f"'{name}' must be a list of {{{role_key}, {text_key}}}, "
                                f"not {_tname(value)}", where))
        return []
    turns = []
    for i, t in enumerate(value, 1):
        if not isinstance(t, dict):
            problems.append(Problem("wrong_type", f"{name} item {i} must be an object, not {_tname(t)}", where))
            continue
        role, content = t.get(role_key), t.get(text_key)
        if not isinstance(content, str):
            problems.append(Problem("wrong_type", f"{name} item {i}: '{text_key}' must be a string, not "
                                    f"{_tname(content)}", where))
        if not isinstance(role, str) or role not in roles:
            problems.append(Problem("unknown_role", f"unknown role {role!r}; allowed: {', '.join(roles)}", where))
            continue
        turns.append({"role": roles[role], "content": content if isinstance(content, str) else ""})
    return turns


def _text(record: dict, key: str, where: str, problems: list[Problem], optional: bool = False) -> str:
    v = record.get(key)
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not optional:
        return str(v)
    if v is None and optional:
        return ""
    kind = "missing_field" if key not in record else "wrong_type"
    problems.append(Problem(kind, f"missing field '{key}'" if kind == "missing_field" else
                            f"'{key}' must be a string, not {_tname(v)}", where))
    return ""


def normalise(record: object, fmt: str, where: str, opts: ReadOptions = ReadOptions(),
              columns: tuple[str | None, str | None] | None = None) -> tuple[Example | None, list[Problem]]:
    """One record in format `fmt` as an Example, with every problem it has (example None on errors)."""
    if not isinstance(record, dict):
        return None, [Problem("not_an_object", f"expected a JSON object, got {_tname(record)}", where)]
    problems: list[Problem] = []
    label = None
    meta: dict = {"format": fmt}
    if fmt == "messages":
        turns = _turns(record.get("messages"), "messages", "role", "content", MESSAGE_ROLES, where, problems)
    elif fmt == "sharegpt":
        turns = _turns(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES, where, problems)
    elif fmt == "alpaca":
        instruction, output = _text(record, "instruction", where, problems), _text(record, "output", where, problems)
        extra, system = _text(record, "input", where, problems, True), _text(record, "system", where, problems, True)
        turns = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                 {"role": "assistant", "content": output}]
        if system.strip():
            turns.insert(0, {"role": "system", "content": system})
        label = output
    elif fmt == "text":
        turns = [{"role": "assistant", "content": _text(record, "text", where, problems)}]
    elif fmt == "columns":
        prompt_col, response_col = columns or (opts.prompt_column, opts.response_column)
        if not response_col or not (prompt_col or opts.prompt_template):
            return None, [Problem("missing_field", "columns format needs a prompt column and a response column "
                                  f"(the record has {sorted(record)})", where)]
        if opts.prompt_template is not None:
            try:
                prompt = opts.prompt_template.format_map(record)
            except (KeyError, IndexError, AttributeError, ValueError) as e:
                problems.append(Problem("missing_field", f"the prompt template needs field {e}", where))
                prompt = ""
        else:
            prompt = _text(record, prompt_col, where, problems)
        answer = _text(record, response_col, where, problems)
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        label = meta["label"] = answer
    else:
        return None, [Problem("unknown_format", f"cannot tell the format of this record (keys: {sorted(record)})",
                              where)]
    if fmt not in ("columns", "text") and isinstance(record.get("label"), (str, int)):
        meta["label"] = str(record["label"])
    if opts.system_prompt and fmt != "text" and turns and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": opts.system_prompt})
    if not problems:
        problems = check_turns(turns, where, chat=fmt != "text")
    if problems and first_error(problems):
        return None, problems
    if label is None:
        label = turns[-1]["content"]
    return Example(turns, where, label, meta), problems


class RecordStream:
    """Every record of a file, read, normalised and checked. After iteration, `format` is the file's
    format, `detected_at` the record it was detected from (None when given), `columns` the mapping."""

    def __init__(self, path: str | Path, opts: ReadOptions = ReadOptions(),
                 byte_range: tuple[int, int, int] | None = None):
        self.path, self.opts, self.byte_range = Path(path), opts, byte_range
        self.format: str | None = None if opts.format == "auto" else opts.format
        self.detected_at: str | None = None
        self.columns = (opts.prompt_column, opts.response_column) if opts.response_column else None
        if opts.format == "auto" and opts.response_column and (opts.prompt_column or opts.prompt_template):
            self.format = "columns"
        self.formats: Counter = Counter()  # each record's own format

    def __iter__(self) -> Iterator[Checked]:
        opts, formats = self.opts, self.formats
        for raw in read_raw(self.path, self.byte_range):
            if raw.problem is not None:
                yield Checked(raw.where, "unknown", None, [raw.problem], raw)
                continue
            fmt = self.format
            if fmt is not None and fmt != "columns" and detect_format(raw.value) == fmt:  # the common case
                formats[fmt] += 1
                ex, problems = normalise(raw.value, fmt, raw.where, opts)
                yield Checked(raw.where, fmt, ex, problems, raw)
            else:
                yield self._check(raw)

    def _check(self, raw: Raw) -> Checked:
        own = detect_format(raw.value)
        self.formats[own] += 1
        if self.format is None and own != "unknown":
            self.format, self.detected_at = own, raw.where
        if self.format == "columns" and self.columns is None and isinstance(raw.value, dict):
            self.columns = guess_columns(raw.value)
        fmt = self.format
        if self.opts.format == "auto" and fmt != "columns" and own != fmt:
            if own == "unknown" or fmt is None:
                ex, problems = normalise(raw.value, "unknown", raw.where, self.opts)
            else:
                ex, problems = None, [Problem("mixed_format", f"this record is {own} but the file is {fmt} "
                                              f"(detected at {self.detected_at})", raw.where)]
            return Checked(raw.where, own, ex, problems, raw)
        ex, problems = normalise(raw.value, fmt or "unknown", raw.where, self.opts, self.columns)
        return Checked(raw.where, fmt or own, ex, problems, raw)


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line or row number, raw record) from a data file; raises on the first unreadable record."""
    for raw in read_raw(path):
        if raw.problem is not None:
            raise raw.problem.to_error()
        yield raw.line, raw.value


def read_examples(path: str | Path, fmt: str = "auto", *, prompt_column: str | None = None,
                  response_column: str | None = None, system_prompt: str | None = None,
                  prompt_template: str | None = None) -> list[Example]:
    """Read one file into normalised examples; raises LoraforgeError naming file:line on bad records."""
    p = check_data_file(path, hint="check data.train / data.validation")
    opts = ReadOptions(fmt, prompt_column, response_column, prompt_template, system_prompt)
    examples = []
    for item in RecordStream(p, opts):
        err = first_error(item.problems)
        if err is not None:
            raise err.to_error()
        examples.append(item.example)
    if not examples:
        raise LoraforgeError("the data file has no records", where=str(p))
    return examples


def label_of(example: Example) -> str:
    """The example's label: a `label` field or mapped label column, else its final answer."""
    return example.meta.get("label", example.label) or ""


def categorical(n_labels: int, n_examples: int, explicit: bool) -> bool:
    """Whether labels are classes worth stratifying and counting: given explicitly, or final answers
    from a small set (as in intent classification), and at least two of them."""
    return n_labels >= 2 and (explicit or n_labels <= n_examples // 4)


def to_record(example: Example) -> dict:
    """The `messages` record an example is written as (`text` records stay text)."""
    if example.meta.get("format") == "text":
        return {"text": example.messages[0]["content"]}
    rec: dict = {"messages": example.messages}
    if "label" in example.meta:
        rec["label"] = example.meta["label"]
    return rec


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL (data's dumps: compact, non-ASCII kept) atomically."""
    files.write_jsonl(path, rows, dumps)
