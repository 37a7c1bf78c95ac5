"""Read training records and normalise them to one chat form: a list of {"role", "content"} turns.

Formats (detected per file from the first record unless the config names one):
  messages  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}   (OpenAI)
  alpaca    {"instruction": ..., "input": ..., "output": ..., "system"?: ...}
  sharegpt  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
  columns   any table (CSV/TSV/JSONL) with a prompt column and a response column
Files: JSONL, JSON (an array of records), CSV/TSV. Every example keeps `source` ("file:line") so that
errors and reports point at the record a user must fix.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class Example:
    """One conversation, normalised. `label` is the expected answer when the data has one."""

    messages: list[dict[str, str]]
    source: str
    label: str | None = None
    meta: dict = field(default_factory=dict)


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line or row number, raw record) from a JSONL, JSON-array or CSV/TSV file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, row
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"not valid JSON: {e.msg} (column {e.colno})", where=f"{path}:{e.lineno}") from None
        if isinstance(data, dict):  # a single record or {"data": [...]}
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        for i, rec in enumerate(data, 1):
            yield i, rec
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise LoraforgeError(
                    f"not valid JSON: {e.msg} (column {e.colno})", where=f"{path}:{lineno}",
                    hint="each line of a .jsonl file must be one JSON object",
                ) from None


def detect_format(record: object) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
    return "unknown"


def _turns_from_messages(turns: object, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise LoraforgeError("'messages' must be a non-empty list of {role, content}", where=where)
    out = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise LoraforgeError("each message needs a string 'content'", where=where)
        role = t.get("role")
        if role not in ROLES:
            raise LoraforgeError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}", where=where)
        out.append({"role": role, "content": t["content"]})
    return out


def _normalise(record: object, fmt: str, where: str, prompt_col: str | None, response_col: str | None) -> Example:
    if not isinstance(record, dict):
        raise LoraforgeError(f"expected a JSON object, got {type(record).__name__}", where=where)
    if fmt == "messages":
        return Example(_turns_from_messages(record["messages"], where), where)
    if fmt == "sharegpt":
        convs = record.get("conversations")
        if not isinstance(convs, list):
            raise LoraforgeError("'conversations' must be a list of {from, value}", where=where)
        turns = []
        for t in convs:
            role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None:
                raise LoraforgeError(f"unknown ShareGPT speaker {t!r}; use one of {sorted(SHAREGPT_ROLES)}", where=where)
            turns.append({"role": role, "content": t.get("value", "")})
        return Example(_turns_from_messages(turns, where), where)
    if fmt == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
            raise LoraforgeError("Alpaca records need string 'instruction' and 'output' (and optional 'input')",
                                 where=where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            turns.insert(0, {"role": "system", "content": record["system"]})
        return Example(turns, where, label=output)
    if fmt == "columns":
        if prompt_col not in record or response_col not in record:
            raise LoraforgeError(f"missing column {prompt_col!r} or {response_col!r}; "
                                 f"the file has {sorted(record)}", where=where)
        prompt, answer = str(record[prompt_col]), str(record[response_col])
        return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                       where, label=answer)
    raise LoraforgeError(f"cannot tell the format of this record (keys: {sorted(record)})", where=where,
                         hint="use messages, alpaca or sharegpt records, or set data.format=columns "
                              "with data.prompt_column and data.response_column")


def read_examples(path: str | Path, fmt: str = "auto", *, prompt_column: str | None = None,
                  response_column: str | None = None, system_prompt: str | None = None) -> list[Example]:
    """Read one file into normalised examples; raises LoraforgeError naming file:line on bad records."""
    p = Path(path)
    if not p.is_file():
        raise LoraforgeError("data file not found", where=str(p), hint="check data.train / data.validation")
    examples: list[Example] = []
    chosen = fmt
    for lineno, record in iter_records(p):
        where = f"{p}:{lineno}"
        if chosen == "auto":
            chosen = "columns" if prompt_column and response_column else detect_format(record)
        examples.append(_normalise(record, chosen, where, prompt_column, response_column))
    if not examples:
        raise LoraforgeError("the data file has no records", where=str(p))
    if system_prompt:
        for ex in examples:
            if ex.messages[0]["role"] != "system":
                ex.messages.insert(0, {"role": "system", "content": system_prompt})
    for ex in examples:
        if ex.messages[-1]["role"] != "assistant":
            raise LoraforgeError("the last turn must be the assistant's (it is what the model learns)",
                                 where=ex.source)
        if ex.label is None:
            ex.label = ex.messages[-1]["content"]
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
