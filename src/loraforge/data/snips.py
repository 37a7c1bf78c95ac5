"""SNIPS 2017 slot filling as chats: each query is a user turn, its answer the JSON object of its slots.

    python -m loraforge.data.snips /path/to/snips2017 src/loraforge/datasets/snips2017

reads the benchmark's `train_<Intent>_full.json` (training) and `validate_<Intent>.json` (the test set)
and writes `train.jsonl`, `test.jsonl` and `schema.json` (the JSON Schema every answer satisfies).
A query's answer maps slot name -> the slot's text (whitespace collapsed as in the query), keys in a stable order:
sorted by name, the order of the schema's `properties`, which is the order structured decoding (llguidance)
lets keys come in, e.g. {"restaurant_type": "restaurant", "state": "MA"}; a slot name that occurs more than
once in a query (61 training queries, no test query) gets the list of its texts, in query order. A query
without slots answers {}.

Encoding: a file that is not valid UTF-8 is not a crash. `train_PlayMusic_full.json` as published holds
an emoji written as two UTF-16 surrogates each encoded in UTF-8 (CESU-8: bytes ED A0 BC ED BD 95 = U+1F355).
Those are joined back into the character; any other invalid byte is replaced by U+FFFD. Every repair is
reported (file, byte offset, what was done). A file that is not JSON or not in the benchmark's shape is
one LoraforgeError naming the file.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from loraforge.data.formats import write_jsonl
from loraforge.errors import LoraforgeError
from loraforge.files import atomic_write_text

INTENTS = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
           "SearchScreeningEvent")
SYSTEM_PROMPT = ("Extract the slots of the user's voice-assistant query. Reply with a JSON object only: "
                 "slot name -> the slot's exact text.")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def decode(raw: bytes, where: str) -> tuple[str, list[str]]:
    """UTF-8 text and the list of repairs made (empty for a valid file)."""
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as e:
        first = e.start
    notes = [f"{where}: not valid UTF-8 (first bad byte at offset {first})"]
    try:
        text = raw.decode("utf-8", errors="surrogatepass")  # CESU-8 surrogates -> lone surrogates
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        notes.append(f"{where}: undecodable bytes replaced by U+FFFD")
        return text, notes
    n = len(_SURROGATE.findall(text))
    text = text.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")
    notes.append(f"{where}: {n} UTF-16 surrogate(s) encoded as UTF-8 (CESU-8) joined back into characters")
    return text, notes


def read_intent_file(path: Path) -> tuple[str, list[list[dict]], list[str]]:
    """(intent, queries as lists of {"text", "entity"?} pieces, repair notes)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LoraforgeError(f"cannot read the file: {e.strerror}", where=str(path)) from None
    text, notes = decode(raw, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraforgeError(f"not JSON: {e.msg} (line {e.lineno}, column {e.colno})", where=str(path)) from None
    if not isinstance(data, dict) or len(data) != 1:
        raise LoraforgeError("expected one object {\"<Intent>\": [queries]}", where=str(path),
                             hint="pass the folder 2017-06-custom-intent-engines of sonos/nlu-benchmark")
    (intent, queries), = data.items()
    out = []
    for i, q in enumerate(queries if isinstance(queries, list) else []):
        pieces = q.get("data") if isinstance(q, dict) else None
        if not isinstance(pieces, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                   for p in pieces):
            raise LoraforgeError(f"query {i} has no list of {{text, entity?}} pieces", where=str(path))
        out.append(pieces)
    if not out:
        raise LoraforgeError("no queries found", where=str(path))
    return intent, out, notes


def slots_of(pieces: list[dict]) -> dict:
    """The answer object: slot -> text (a list of texts for a slot that occurs more than once)."""
    slots: dict = {}
    for p in pieces:
        if "entity" in p:
            value = " ".join(p["text"].split())    # as in the query: whitespace collapsed
            if p["entity"] in slots:
                old = slots[p["entity"]]
                slots[p["entity"]] = [*old, value] if isinstance(old, list) else [old, value]
            else:
                slots[p["entity"]] = value
    return dict(sorted(slots.items()))


def to_chat(intent: str, pieces: list[dict]) -> dict:
    query = " ".join("".join(p["text"] for p in pieces).split())
    answer = json.dumps(slots_of(pieces), ensure_ascii=False)
    return {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
            "intent": intent}


def answer_schema(slot_names: list[str]) -> dict:
    """JSON Schema of an answer: an object whose keys are known slot names, values a text or texts."""
    value = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 2}]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "SNIPS 2017 slots",
            "type": "object", "properties": {s: {"$ref": "#/$defs/slot"} for s in slot_names},
            "additionalProperties": False, "$defs": {"slot": value}}


def convert(src: str | Path) -> tuple[dict[str, list[dict]], dict, list[str]]:
    """({"train": chats, "test": chats}, the answers' schema, repair notes) from the benchmark folder."""
    src = Path(src)
    if not src.is_dir():
        raise LoraforgeError("SNIPS folder not found", where=str(src),
                             hint="pass the folder holding train_<Intent>_full.json and validate_<Intent>.json")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    notes: list[str] = []
    names: dict[str, None] = {}
    for split, pattern in (("train", "train_{}_full.json"), ("test", "validate_{}.json")):
        for intent in INTENTS:
            path = src / pattern.format(intent)
            if not path.is_file():
                raise LoraforgeError("a benchmark file is missing", where=str(path))
            name, queries, repairs = read_intent_file(path)
            notes += repairs
            for pieces in queries:
                splits[split].append(to_chat(name, pieces))
                names.update((p["entity"], None) for p in pieces if "entity" in p)
    return splits, answer_schema(sorted(names)), notes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        splits, schema, notes = convert(argv[0])
    except LoraforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", rows)
        print(f"{split}: {len(rows)} chats -> {out / (split + '.jsonl')}")
    atomic_write_text(out / "schema.json", json.dumps(schema, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
