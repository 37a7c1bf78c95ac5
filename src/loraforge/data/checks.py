"""Per-record problems, and the checks on a conversation's turns shared by every reader.

The training path (`formats.read_examples`) raises the first error a record has; the validator
(`validate.py`) collects every problem of every record. Both get them from here, so a record is
judged the same way everywhere. Each problem has a kind from `KINDS`, which says whether it makes
the record invalid ("error") or is only worth a look ("warning"), and how to fix it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraforge.errors import LoraforgeError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Kind:
    title: str
    hint: str | None = None
    severity: str = "error"


KINDS: dict[str, Kind] = {
    "invalid_json": Kind("JSON that does not parse", "each line of a .jsonl file must be one JSON object"),
    "bad_encoding": Kind("bytes that are not UTF-8", "re-save the file as UTF-8"),
    "bad_row": Kind("table rows that do not fit the header", "quote fields that contain the delimiter"),
    "not_an_object": Kind("records that are not objects", "each record must be a JSON object"),
    "unknown_format": Kind("records of no known format",
                           "use messages, sharegpt, alpaca or text records, or map table columns: "
                           "`--columns PROMPT,RESPONSE` (loraforge data), data.format=columns "
                           "data.prompt_column=... data.response_column=... (train)"),
    "mixed_format": Kind("records of another format than the file's", "keep one format per file"),
    "missing_field": Kind("missing fields"),
    "wrong_type": Kind("fields of the wrong type"),
    "unknown_role": Kind("unknown roles", "use system, user or assistant"),
    "empty_turn": Kind("empty turns", "drop the record or fill the turn"),
    "no_assistant": Kind("no assistant turn", "every conversation needs an answer to learn from"),
    "assistant_not_last": Kind("assistant not last", "end each conversation with the assistant's turn"),
    "system_not_first": Kind("system not first", "put the system prompt first, once"),
    "not_alternating": Kind("turns not alternating", "after the system prompt, user and assistant take turns"),
    "template_error": Kind("conversations the chat template rejects", "fix the turns the template names"),
    "too_long": Kind("records over max_seq_length", "raise data.max_seq_length or shorten the record"),
    "mask_mismatch": Kind("loss masks that miss assistant content", "set data.train_on=all"),
    "empty_side": Kind("preference sides with no answer", "fill 'chosen'/'rejected'/'completion' or drop the record"),
    "identical_sides": Kind("pairs whose chosen and rejected are the same", "drop the pair: it teaches nothing"),
    "control_tokens": Kind("text that embeds chat-template control tokens",
                           "strip the control tokens: the model's own chat template adds its own", "warning"),
}

# Control tokens of the common chat-template families. Text that already contains them was rendered
# with some template before; rendering it again through the model's template nests two templates.
CONTROL_TOKENS = {
    "<|im_start|>": "ChatML/Qwen", "<|im_end|>": "ChatML/Qwen",
    "<|start_header_id|>": "Llama 3", "<|end_header_id|>": "Llama 3", "<|eot_id|>": "Llama 3",
    "<|begin_of_text|>": "Llama 3",
    "[INST]": "Mistral/Llama 2", "[/INST]": "Mistral/Llama 2",
    "<start_of_turn>": "Gemma", "<end_of_turn>": "Gemma",
}
_CONTROL_RE = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record; `where` is "file:line"."""

    kind: str
    message: str
    where: str

    @property
    def severity(self) -> str:
        return KINDS[self.kind].severity

    def to_error(self) -> LoraforgeError:
        return LoraforgeError(self.message, where=self.where, hint=KINDS[self.kind].hint)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "where": self.where}


def first_error(problems: list[Problem]) -> Problem | None:
    for p in problems:
        if KINDS[p.kind].severity == "error":
            return p
    return None


def control_tokens(text: str) -> list[str]:
    """The chat-template control tokens found in `text`, in order of first appearance."""
    found = _CONTROL_RE.findall(text)
    return list(dict.fromkeys(found))


def check_turns(turns: list[dict[str, str]], where: str, *, chat: bool = True) -> list[Problem]:
    """Problems of a normalised conversation: empty turns, the system turn's place, alternation, and
    an assistant turn at the end. `chat=False` (raw text for pretraining) checks emptiness only."""
    if not turns:
        return [Problem("empty_turn", "the conversation has no turns", where)]
    if chat and tuple([t["role"] for t in turns]) in _WELL_FORMED:  # the common case, checked fast
        for t in turns:
            c = t["content"]
            if not c or c.isspace() or "<" in c or "[" in c:
                break
        else:
            return []
    problems: list[Problem] = []
    for i, t in enumerate(turns, 1):
        content = t["content"]
        if not content or content.isspace():
            problems.append(Problem("empty_turn", f"turn {i} ({t['role']}) is empty", where))
        elif ("<" in content or "[" in content) and (found := control_tokens(content)):
            fams = sorted({CONTROL_TOKENS[f] for f in found})
            problems.append(Problem("control_tokens", f"turn {i} ({t['role']}) contains {', '.join(found)} "
                                    f"({' and '.join(fams)} control tokens)", where))
    if not chat:
        return problems
    roles = [t["role"] for t in turns]
    if "system" in roles[1:]:
        problems.append(Problem("system_not_first", f"turn {roles.index('system', 1) + 1} is a system turn; "
                                "the system prompt must be the first turn", where))
    if "assistant" not in roles:
        problems.append(Problem("no_assistant", "the last turn must be the assistant's (it is what the model "
                                "learns), and this conversation has no assistant turn", where))
    elif roles[-1] != "assistant":
        problems.append(Problem("assistant_not_last", f"the last turn must be the assistant's (it is what the "
                                f"model learns), not the {roles[-1]}'s", where))
    body = [(k, t["role"]) for k, t in enumerate(turns, 1) if t["role"] != "system"]
    for i, (k, role) in enumerate(body):
        if role != ("user" if i % 2 == 0 else "assistant"):
            what = f"the first turn after the system prompt must be the user's, not the {role}'s" if i == 0 \
                else f"turn {k} ({role}) follows another {role} turn; user and assistant must take turns"
            problems.append(Problem("not_alternating", what, where))
            break
    return problems


# Role sequences that need no further look: [system], then user/assistant pairs (up to 64 pairs).
_WELL_FORMED = {(*first, *("user", "assistant") * k) for first in ((), ("system",)) for k in range(1, 65)}
