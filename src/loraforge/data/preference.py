"""Preference data: read pairs (DPO/ORPO/SimPO), unpaired judgements (KTO) and GRPO prompts, and
tokenize them with the model's chat template.

Records (JSONL/JSON/CSV, one a line, every problem reported with file:line):
  pairs      {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
             ("messages" may replace "prompt"). Without a prompt, chosen and rejected are whole
             conversations (OpenAI messages, or Anthropic HH-RLHF transcripts "\\n\\nHuman: ...
             \\n\\nAssistant: ...") and the prompt is the turns they share before the first assistant
             turn where they differ.
  unpaired   {"prompt": ..., "completion": str | messages, "label": true | false}   (KTO)
  prompts    {"prompt": str | messages, ...any fields} (GRPO: the other fields go to the reward
             functions), or any SFT format whose last assistant turn becomes the field `answer`.

A completion is tokenized as prompt + completion through the chat template (the same assistant spans
as SFT, data.templates), with loss only on the completion's assistant tokens. A prompt longer than
`max_prompt_length` tokens keeps its last tokens (counted); an example still longer than
`max_seq_length` is left out and reported, never cut in its completion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.data.checks import Problem, check_turns, first_error
from loraforge.data.formats import MESSAGE_ROLES, _turns, read_examples
from loraforge.data.readers import check_data_file, read_raw
from loraforge.data.templates import IGNORE_INDEX, Tokenized, _render, assistant_spans
from loraforge.data.validate import ValidationReport
from loraforge.errors import LoraforgeError

_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
TRUE_LABELS = (True, 1, "true", "desirable", "good", "yes", "1")
FALSE_LABELS = (False, 0, "false", "undesirable", "bad", "no", "0")


@dataclass
class Pair:
    """A prompt (turns) and two completions (turns that follow it), `chosen` preferred."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source: str


@dataclass
class Unpaired:
    """KTO: a prompt, one completion, and whether it is desirable."""

    prompt: list[dict]
    completion: list[dict]
    desirable: bool
    source: str


@dataclass
class PromptRow:
    """GRPO: the prompt's turns and the record's other fields (given to the reward functions)."""

    prompt: list[dict]
    row: dict
    source: str


@dataclass
class PairItem:
    """A tokenized pair; `ref` holds the reference model's summed log-probs (chosen, rejected) once known."""

    chosen: Tokenized
    rejected: Tokenized
    source: str
    ref: tuple[float, float] | None = None

    @property
    def input_ids(self) -> list[int]:
        """Both sides' tokens: what the length-grouped batch order measures."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    def sides(self) -> list[Tokenized]:
        return [self.chosen, self.rejected]


@dataclass
class UnpairedItem:
    completion: Tokenized
    desirable: bool
    source: str
    ref: tuple[float] | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.completion.input_ids

    @property
    def labels(self) -> list[int]:
        return self.completion.labels

    def sides(self) -> list[Tokenized]:
        return [self.completion]


def parse_transcript(text: str) -> list[dict] | None:
    """Anthropic's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as turns (None if it is not one)."""
    parts = _SPEAKER.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    turns: list[dict] = []
    for who, said in zip(parts[1::2], parts[2::2]):
        if turns and turns[-1]["role"] == _HH_ROLES[who]:  # the same speaker twice (it happens): one turn
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{said.strip()}"
        else:
            turns.append({"role": _HH_ROLES[who], "content": said.strip()})
    return turns


def _side(value, name: str, where: str, problems: list[Problem]) -> list[dict]:
    """A record's field as turns: a transcript, a plain string (one assistant turn) or messages."""
    if isinstance(value, str):
        turns = parse_transcript(value) if "Human:" in value else None
        return turns if turns is not None else [{"role": "assistant", "content": value}]
    if isinstance(value, dict) and "role" in value:
        value = [value]
    return _turns(value, name, "role", "content", MESSAGE_ROLES, where, problems)


def _prompt(record: dict, where: str, problems: list[Problem]) -> list[dict] | None:
    for key in ("prompt", "messages"):
        if key in record:
            value = record[key]
            if isinstance(value, str):
                turns = parse_transcript(value) if "Human:" in value else None
                return turns or [{"role": "user", "content": value}]
            return _turns(value, key, "role", "content", MESSAGE_ROLES, where, problems)
    return None


def split_shared(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading turns two conversations share, ending where an assistant turn follows in both."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (k < len(chosen) and k < len(rejected) and chosen[k]["role"] == "assistant"
                         and rejected[k]["role"] == "assistant"):
        k -= 1
    return k


def _with_system(turns: list[dict], system: str | None) -> list[dict]:
    if system and (not turns or turns[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *turns]
    return turns


def normalise_pair(record, where: str, system: str | None = None) -> tuple[Pair | None, list[Problem]]:
    """One preference record as a Pair, with every problem it has (None on errors)."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None, [Problem("missing_field", "a preference pair needs 'chosen' and 'rejected' (and a 'prompt' "
                              "unless both are whole conversations)", where)]
    problems: list[Problem] = []
    prompt = _prompt(record, where, problems)
    chosen = _side(record["chosen"], "chosen", where, problems)
    rejected = _side(record["rejected"], "rejected", where, problems)
    if problems:
        return None, problems
    if prompt is None:
        k = split_shared(chosen, rejected)
        if k == 0:
            return None, [Problem("missing_field", "no prompt: chosen and rejected share no turns before an "
                                  "assistant turn; give a 'prompt' field", where)]
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    prompt = _with_system(prompt, system)
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not any(t["role"] == "assistant" and t["content"].strip() for t in side):
            problems.append(Problem("empty_side", f"'{name}' has no assistant text", where))
    if not problems:
        problems += check_turns(prompt + chosen, where) + check_turns(prompt + rejected, where)
    if not problems and chosen == rejected:
        problems.append(Problem("identical_sides", "'chosen' and 'rejected' are the same text: the pair "
                                "teaches nothing", where))
    return (None if first_error(problems) else Pair(prompt, chosen, rejected, where)), problems


def normalise_unpaired(record, where: str, system: str | None = None) -> tuple[Unpaired | None, list[Problem]]:
    """One KTO record {prompt, completion, label} as Unpaired, with its problems."""
    if not isinstance(record, dict) or "completion" not in record or "label" not in record:
        return None, [Problem("missing_field", "a KTO record needs 'prompt', 'completion' and 'label'", where)]
    problems: list[Problem] = []
    prompt = _prompt(record, where, problems)
    completion = _side(record["completion"], "completion", where, problems)
    label = record["label"].lower() if isinstance(record["label"], str) else record["label"]
    if label not in TRUE_LABELS and label not in FALSE_LABELS:
        problems.append(Problem("wrong_type", f"'label' must be true or false, not {record['label']!r}", where))
    if prompt is None:
        problems.append(Problem("missing_field", "missing field 'prompt'", where))
    if problems:
        return None, problems
    prompt = _with_system(prompt, system)
    if not any(t["role"] == "assistant" and t["content"].strip() for t in completion):
        problems.append(Problem("empty_side", "'completion' has no assistant text", where))
    problems += check_turns(prompt + completion, where)
    item = Unpaired(prompt, completion, label in TRUE_LABELS, where)
    return (None if first_error(problems) else item), problems


def is_preference_record(record) -> bool:
    return isinstance(record, dict) and ({"chosen", "rejected"} <= record.keys() or
                                         {"completion", "label"} <= record.keys() and "prompt" in record)


def _records(path: str | Path):
    for raw in _records_checked(path):
        if raw.problem is not None:
            raise raw.problem.to_error()
        yield raw


SKIPPABLE = ("empty_side", "identical_sides")  # a pair that teaches nothing: left out and reported


def read_pairs(path: str | Path, system: str | None = None, unpaired: bool = False,
               skipped: list[str] | None = None) -> list:
    """Every record of a preference file as Pair (or Unpaired for KTO). A pair with an empty side or
    identical sides is left out (its "file:line: why" appended to `skipped`); any other error raises."""
    norm = normalise_unpaired if unpaired else normalise_pair
    out = []
    for raw in _records(path):
        item, problems = norm(raw.value, raw.where, system)
        if item is None:
            err = first_error(problems)
            if err.kind not in SKIPPABLE or skipped is None:
                raise err.to_error()
            skipped.append(f"{err.where}: {err.message}")
            continue
        out.append(item)
    if not out:
        raise LoraforgeError("the data file has no usable records", where=str(path))
    return out


def read_prompts(path: str | Path, fmt: str = "auto", system: str | None = None, **columns) -> list[PromptRow]:
    """GRPO prompts: {"prompt": ..., fields...} records, or any SFT format (its answer becomes `answer`;
    `columns`: prompt_column / response_column for tables)."""
    first = next(iter(_records(path)), None)
    if first is None or not (isinstance(first.value, dict) and "prompt" in first.value and fmt == "auto"):
        rows = []
        for ex in read_examples(path, fmt, system_prompt=system, **columns):
            turns = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
            rows.append(PromptRow(turns, {"answer": ex.messages[-1]["content"], "label": ex.label}, ex.source))
        return rows
    rows = []
    for raw in _records(path):
        problems: list[Problem] = []
        turns = _prompt(raw.value, raw.where, problems) if isinstance(raw.value, dict) else None
        if turns is None or problems or not turns:
            raise (problems[0] if problems else Problem("missing_field", "missing field 'prompt'", raw.where)
                   ).to_error()
        rows.append(PromptRow(_with_system(turns, system), {k: v for k, v in raw.value.items() if k != "prompt"},
                              raw.where))
    return rows


def tokenize_completion(tokenizer, prompt: list[dict], completion: list[dict], source: str,
                        max_prompt_length: int) -> tuple[Tokenized, int]:
    """prompt + completion as token ids with loss on the completion's assistant tokens, and how many prompt
    tokens were cut from the left to keep `max_prompt_length`."""
    full, spans = assistant_spans(tokenizer, prompt + completion, source)
    head = _render(tokenizer, prompt, add_generation_prompt=True, where=source)
    if not full.startswith(head):
        raise LoraforgeError("the chat template renders the prompt differently inside the whole conversation",
                             where=source)
    spans = [(s, e) for s, e in spans if s >= len(head)]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [t if b > a and any(a < e and b > s for s, e in spans) else IGNORE_INDEX
              for t, (a, b) in zip(ids, offsets)]
    n_prompt = next((k for k, (a, _) in enumerate(offsets) if a >= len(head)), len(ids))
    cut = max(0, n_prompt - max_prompt_length)
    return Tokenized(ids[cut:], labels[cut:], source), cut


@dataclass
class TokenizeReport:
    kept: int = 0
    too_long: list[str] = field(default_factory=list)
    prompts_cut: int = 0

    def to_dict(self, what: str) -> dict:
        return {f"{what}_examples": self.kept, f"{what}_dropped_too_long": len(self.too_long),
                f"{what}_too_long_sources": self.too_long[:20], f"{what}_prompts_cut": self.prompts_cut}


def tokenize_preferences(tokenizer, items: list, max_seq_length: int, max_prompt_length: int,
                         what: str = "data") -> tuple[list, TokenizeReport]:
    """Pairs -> PairItems (Unpaired -> UnpairedItems); an item with any side over max_seq_length is left out."""
    out, report = [], TokenizeReport()
    for it in items:
        sides = [it.chosen, it.rejected] if isinstance(it, Pair) else [it.completion]
        toks, cuts = zip(*(tokenize_completion(tokenizer, it.prompt, s, it.source, max_prompt_length)
                           for s in sides))
        if any(len(t.input_ids) > max_seq_length for t in toks):
            report.too_long.append(it.source)
            continue
        if any(t.n_loss_tokens == 0 for t in toks):
            report.too_long.append(it.source)  # the prompt cut left nothing to score
            continue
        report.prompts_cut += any(cuts)
        out.append(PairItem(toks[0], toks[1], it.source) if isinstance(it, Pair)
                   else UnpairedItem(toks[0], it.desirable, it.source))
    report.kept = len(out)
    if not out:
        raise LoraforgeError(f"no example of the {what} fits max_seq_length={max_seq_length}",
                             where=report.too_long[0] if report.too_long else what,
                             hint="raise data.max_seq_length or lower preference.max_prompt_length")
    return out, report


def validate_preferences(path: str | Path, tokenizer=None, max_seq_length: int = 2048,
                         max_prompt_length: int = 1024, system: str | None = None):
    """`loraforge data validate` for preference files: every pair (or KTO record) checked for missing or
    empty sides, identical chosen/rejected, turn order and, with a tokenizer, sides over max_seq_length;
    each problem with file:line (a validate.ValidationReport)."""
    report = ValidationReport(str(path), max_seq_length=max_seq_length if tokenizer is not None else None,
                              lengths_checked=tokenizer is not None)
    report.format = "preference"
    for raw in _records_checked(path):
        if raw.problem is not None:
            report.add([raw.problem])
            continue
        unpaired = isinstance(raw.value, dict) and "chosen" not in raw.value and "completion" in raw.value
        item, problems = (normalise_unpaired if unpaired else normalise_pair)(raw.value, raw.where, system)
        report.formats["kto" if unpaired else "pairs"] = report.formats.get("kto" if unpaired else "pairs", 0) + 1
        if item is not None and tokenizer is not None:
            sides = [("chosen", item.chosen), ("rejected", item.rejected)] if isinstance(item, Pair) \
                else [("completion", item.completion)]
            for name, side in sides:
                tok, _ = tokenize_completion(tokenizer, item.prompt, side, raw.where, max_prompt_length)
                if len(tok.input_ids) > max_seq_length:
                    problems.append(Problem("too_long", f"prompt + {name}: {len(tok.input_ids)} tokens after the "
                                            f"chat template, over max_seq_length={max_seq_length}", raw.where))
        report.add(problems)
    report.finish(None, None)
    return report


def _records_checked(path: str | Path):
    return read_raw(check_data_file(path))   # a folder, a missing or unreadable file: one clear message


def looks_like_preferences(path: str | Path) -> bool:
    """Whether a data file's first readable record is a preference pair or a KTO record."""
    for raw in _records_checked(path):
        if raw.problem is None:
            return is_preference_record(raw.value)
    return False
