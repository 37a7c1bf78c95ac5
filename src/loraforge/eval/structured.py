"""Structured decoding: only answers of the task's shape can come out (a label of the label set, JSON that
satisfies a JSON Schema, or any JSON object), whatever the model's weights.

    from loraforge.eval.structured import Structure, compile_structure
    grammar = compile_structure(tokenizer, Structure(labels=["yes", "no"]), stop_ids)
    state = grammar.start()                # one per answer being decoded
    allowed = state.allowed()             # (vocab,) bool: the tokens the grammar permits next
    state.advance(token)                  # after the token is chosen

The grammar engine is llguidance (pip install 'loraforge[structured]'), picked by measured mask time per
token on the embedded model's tokenizer against xgrammar and outlines-core (bench/constrained_overhead.py,
bench/results/constrained_overhead.json). The answer's end is one of the model's end-of-turn tokens,
permitted only where the answer is complete. JSON is compact in the shape `json.dumps` writes by default
(", " and ": ", no other whitespace), so a model trained on such answers meets its own format; object
keys come in the schema's `properties` order. `mask_logits` applies a batch of states to a batch of logits
(rows without a state are left alone): the step that both eval's batched greedy decoding (through
`GrammarLogitsProcessor`) and the server's continuous batching call per step.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import parse_json
from loraforge.eval.task import read_labels

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict[int, tuple] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer, stop ids)


@dataclass(frozen=True)
class Structure:
    """What an answer must be: one of `labels`, or JSON matching `schema` ({"type": "object"}: any object)."""

    labels: tuple[str, ...] | None = None
    schema: dict | None = None

    def __post_init__(self):
        if (self.labels is None) == (self.schema is None):
            raise ValueError("a Structure has exactly one of labels and schema")

    def describe(self) -> str:
        return f"one of {len(self.labels)} labels" if self.labels is not None else "JSON Schema"


LLGUIDANCE_MIN = (1, 7)   # the first release whose tokenizer takes several end tokens (1.6.1 failed on an H100)
_MIN_TEXT = ".".join(map(str, LLGUIDANCE_MIN))


def _llguidance():
    try:
        import llguidance  # the optional extra loraforge[structured]
        import llguidance.hf  # noqa: F401
    except ImportError:
        raise LoraforgeError("structured decoding needs the `llguidance` package, which is not installed",
                             hint="pip install 'loraforge[structured]' (or eval.constrained=off)") from None
    found = _too_old()
    if found is not None:
        raise LoraforgeError(f"structured decoding needs llguidance >= {_MIN_TEXT}, found {found}",
                             hint="pip install -U 'loraforge[structured]' (or eval.constrained=off)")
    return llguidance


def _too_old() -> str | None:
    """The installed llguidance's version when it is older than LLGUIDANCE_MIN, else None (also when there is
    no package metadata, e.g. a source checkout)."""
    try:
        found = importlib.metadata.version("llguidance")
    except importlib.metadata.PackageNotFoundError:
        return None
    return found if _version(found) < LLGUIDANCE_MIN else None


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '1.9.1' or '1.10.0rc1' (packaging's PEP 440 parser)."""
    return Version(text).release[:2]


def ll_tokenizer(tokenizer, stop_ids: list[int]):
    """llguidance's view of a Hugging Face fast tokenizer (about a second to build; cached per tokenizer)."""
    llg = _llguidance()
    key = id(tokenizer)
    hit = _TOKENIZERS.get(key)
    if hit is not None and hit[0] is tokenizer and hit[2] == tuple(stop_ids):
        return hit[1]
    if not getattr(tokenizer, "is_fast", False):
        raise LoraforgeError("structured decoding needs a fast (Rust) tokenizer; this model's is a slow one",
                             hint="turn structured decoding off (eval.constrained=off)")
    lt = llg.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(stop_ids))
    _TOKENIZERS[key] = (tokenizer, lt, tuple(stop_ids))
    return lt


def grammar_text(structure: Structure) -> str:
    """The llguidance grammar of a structure (a Lark alternation of labels, or the compiled JSON Schema)."""
    llg = _llguidance()
    if structure.labels is not None:
        labels = [str(x) for x in dict.fromkeys(structure.labels) if str(x)]
        if not labels:
            raise LoraforgeError("the label set is empty", hint="give at least one non-empty label")
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in labels))
    try:
        return llg.LLMatcher.grammar_from_json_schema(structure.schema, overrides=JSON_LAYOUT)
    except ValueError as e:
        raise LoraforgeError(f"the JSON Schema cannot be used: {e}", hint="pass a JSON Schema object") from None


class Grammar:
    """A compiled structure for one tokenizer; `start()` gives a fresh state per answer."""

    def __init__(self, lltok, text: str, vocab: int, structure: Structure, stops: list[int]):
        llg = _llguidance()
        self.prototype = llg.LLMatcher(lltok, text, log_level=0)   # states copy it: its caches are shared
        if self.prototype.is_error():
            err = self.prototype.get_error().splitlines()[0]
            raise LoraforgeError(f"the {structure.describe()} cannot be decoded to: {err}",
                                 hint="simplify the schema (llguidance supports most of JSON Schema)")
        self.vocab, self.structure, self.stops = vocab, structure, frozenset(stops)


    def start(self) -> State:
        return State(self.prototype.deep_copy(), self.vocab, self.stops)


class State:
    """One answer's place in its grammar."""

    def __init__(self, matcher, vocab: int, stops: frozenset[int]):
        import torch  # lazy in this module: eval's request checks (eval_structure, valid) run before torch loads

        self.matcher, self.vocab, self.stops = matcher, vocab, stops
        self.words = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
        self.ended = False             # an end-of-turn token was taken (or the grammar failed)

    @property
    def finished(self) -> bool:
        return self.ended or self.matcher.is_error()

    def fill(self, words) -> None:
        """Write the permitted-token bitmask (int32 words, 32 tokens each) into a contiguous CPU row."""
        if self.finished:               # a finished answer only ever pads: let anything through
            words.fill_(-1)
            return
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def allowed(self):
        self.fill(self.words[0])
        return unpack(self.words, self.vocab)[0]

    def advance(self, token: int) -> bool:
        """Take the chosen token; False if the grammar did not permit it (the state is then finished)."""
        if self.finished:
            return True
        if int(token) in self.stops:
            self.ended = True
            return self.matcher.is_accepting()
        return bool(self.matcher.consume_token(int(token)))


def unpack(words, vocab: int):
    """(rows, vocab/32) int32 bitmask (token t is bit t % 32 of word t // 32) -> (rows, vocab) bool."""
    import numpy as np
    import torch  # lazy, as in State

    bits = np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")  # little-endian int32 words
    return torch.from_numpy(bits[:, :vocab].view(np.bool_))


def mask_logits(logits, states: list[State | None]) -> None:
    """Set to -inf, in place, every logit a row's grammar forbids; rows whose state is None are left alone.
    Logits beyond the tokenizer's vocabulary (padding rows of the embedding) are forbidden too."""
    import torch  # lazy, as in State

    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    vocab = states[rows[0]].vocab
    words = torch.empty(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for k, i in enumerate(rows):
        states[i].fill(words[k])
    forbid = ~unpack(words, min(vocab, logits.shape[-1]))
    if logits.shape[-1] > forbid.shape[1]:
        forbid = torch.cat([forbid, forbid.new_ones(len(rows), logits.shape[-1] - forbid.shape[1])], dim=1)
    forbid = forbid.to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(forbid, float("-inf"))
    else:
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] = logits[idx].masked_fill(forbid, float("-inf"))


def compile_structure(tokenizer, structure: Structure, stop_ids: list[int]) -> Grammar:
    """Compile once per (tokenizer, structure); the end-of-turn tokens `stop_ids` end an answer."""
    lltok = ll_tokenizer(tokenizer, stop_ids)
    return Grammar(lltok, grammar_text(structure), len(tokenizer), structure, stop_ids)


class GrammarLogitsProcessor:
    """For transformers' `generate(logits_processor=...)`: one State per row, advanced by the token each
    row chose at the previous step (read from the end of `input_ids`)."""

    def __init__(self, states: list[State]):
        self.states, self.first = states, True

    def __call__(self, input_ids, scores):
        if not self.first:
            for state, token in zip(self.states, input_ids[:, -1].tolist()):
                state.advance(token)
        self.first = False
        mask_logits(scores, list(self.states))
        return scores


def installed() -> bool:
    """llguidance is importable and recent enough (eval.constrained=auto falls back to plain decoding else)."""
    return importlib.util.find_spec("llguidance") is not None and _too_old() is None


def eval_structure(ec, opts: dict) -> tuple[Structure | None, str]:
    """The structure `loraforge eval` constrains the fine-tuned model to (None: none) and why, from the eval
    section (`constrained`, `labels`, `schema_file`, `metric`) and the metric's options already read."""
    mode = getattr(ec, "constrained", "auto")
    if mode == "off":
        return None, "off"
    structure = None
    if opts.get("labels") or ec.labels:
        structure = Structure(labels=tuple(opts.get("labels") or read_labels(ec.labels)))
    elif ec.schema_file:
        structure = Structure(schema=opts.get("schema") or _read_schema(ec.schema_file))
    elif ec.metric in ("json_valid", "field_f1", "slot_f1"):
        structure = Structure(schema={} if ec.metric == "json_valid" else {"type": "object"})
    if structure is None:
        if mode == "on":
            raise LoraforgeError("eval.constrained=on but the task has no structure to decode to",
                                 hint="set eval.labels (a label set) or eval.schema_file (a JSON Schema)")
        return None, "off (the task has no label set or JSON Schema)"
    if not installed():
        if mode == "on":
            _llguidance()
        return None, (f"off (llguidance is not installed, or older than {_MIN_TEXT}: "
                      "pip install -U 'loraforge[structured]')")
    return structure, structure.describe()


def _read_schema(path: str) -> dict:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraforgeError("schema file not found", where=path) from None
    except json.JSONDecodeError as e:
        raise LoraforgeError(f"the schema file is not JSON: {e.msg} (line {e.lineno})", where=path) from None
    if not isinstance(schema, (dict, bool)):
        raise LoraforgeError("the schema file must hold a JSON Schema object", where=path)
    return schema


def valid(answers: list[str], structure: Structure) -> list[float]:
    """Per answer: 1.0 where it has the structure (a label of the set; JSON that satisfies the schema, checked
    with jsonschema when installed, else only parsed), else 0.0."""
    if structure.labels is not None:
        labels = set(structure.labels)
        return [float(a.strip() in labels) for a in answers]
    try:
        import jsonschema  # the optional extra loraforge[eval]

        check = jsonschema.validators.validator_for(structure.schema)(structure.schema).is_valid
    except ImportError:
        def check(value):
            return True
    out = []
    for a in answers:
        value, reason = parse_json(a)
        out.append(float(reason is None and check(value)))
    return out


def cli_structure(labels, schema) -> Structure | None:
    """`loraforge generate --labels FILE | --schema FILE`: the structure, checked before a model loads."""
    if labels and schema:
        raise LoraforgeError("give --labels or --schema, not both")
    if not labels and not schema:
        return None
    _llguidance()
    if labels:
        return Structure(labels=tuple(read_labels(labels)))
    return Structure(schema=_read_schema(str(schema)))
