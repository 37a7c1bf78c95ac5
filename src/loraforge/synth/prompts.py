"""What each request asks, and what comes back out of a reply.

Requests, each keyed `{spec hash}:{kind}:{index}` (the journal's key):
  plan:topics / plan:personas   a list written by the endpoint first (diversity `{generate: N}`)
  q:i    generate mode: one new user message for slot i (its topic, persona, difficulty, a few seeds)
  r:i    rewrite mode: example i's user message in other words
  a:i    the answer to item i's user message: the task as the system prompt, seed examples as
         earlier turns, then the message (distill mode has only these)
Slot i's topic cycles through the topics (every topic gets its share); persona and difficulty are
drawn with a generator seeded by (seed, i), so a slot is the same on every run. `TEMPLATE_HASH`
names this file's wording in every record's provenance.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

QUESTION = """{task}

Write ONE new, realistic user message for this task.{slot}
Examples of such messages (write a different one, do not copy them):
{examples}
Reply with the user message only: no preamble, no quotation marks, no answer."""

REWRITE = """{task}

Rewrite the user message below so that it asks for the same thing in different words.{slot}
Keep its meaning and intent.

Message: {prompt}

Reply with the rewritten message only: no preamble, no quotation marks, no answer."""

PLAN = """{task}

List {n} distinct {what} for examples of this task, one per line: no numbering, no commentary."""

ANSWER_JSON = """Answer with one JSON object only (no prose, no code fence) that satisfies this JSON Schema:
{schema}"""

TEMPLATE_HASH = hashlib.sha256("\x00".join((QUESTION, REWRITE, PLAN, ANSWER_JSON)).encode()).hexdigest()[:12]
PLAN_WHAT = {"topics": "topics (a few words each)", "personas": "kinds of users who would write them (a few words each)"}


@dataclass(frozen=True)
class Slot:
    """The diversity plan's draw for one item."""

    topic: str | None = None
    persona: str | None = None
    difficulty: str | None = None

    def describe(self) -> str:
        parts = []
        if self.topic:
            parts.append(f"\nTopic: {self.topic}")
        if self.persona:
            parts.append(f"\nThe user is: {self.persona}")
        if self.difficulty:
            parts.append(f"\nDifficulty: {self.difficulty}")
        return "".join(parts)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def slot_for(i: int, seed: int, topics: list[str], personas: list[str], difficulty: list[str]) -> Slot:
    rng = random.Random(f"{seed}:{i}")
    return Slot(topics[i % len(topics)] if topics else None, rng.choice(personas) if personas else None,
                rng.choice(difficulty) if difficulty else None)


def request_seed(seed: int, i: int, kind: str) -> int:
    """The `seed` sent with request (kind, i): distinct per request, the same on every run."""
    digest = hashlib.blake2b(f"{seed}:{kind}:{i}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def answer_text(answer: object) -> str:
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def question_messages(task: str, slot: Slot, seed_prompts: list[str], i: int, seed: int) -> list[dict]:
    shown = random.Random(f"{seed}:shown:{i}").sample(seed_prompts, min(3, len(seed_prompts)))
    examples = "\n".join(f"- {p}" for p in shown) or "- (none given)"
    return [{"role": "user", "content": QUESTION.format(task=task, slot=slot.describe(), examples=examples)}]


def rewrite_messages(task: str, slot: Slot, prompt: str) -> list[dict]:
    slot = Slot(None, slot.persona, None)  # the meaning stays the message's own; only the voice changes
    return [{"role": "user", "content": REWRITE.format(task=task, slot=slot.describe(), prompt=prompt)}]


def plan_messages(task: str, what: str, n: int) -> list[dict]:
    return [{"role": "user", "content": PLAN.format(task=task, n=n, what=PLAN_WHAT[what])}]


def answer_messages(task: str, seeds: list[tuple[str, str]], prompt: str, schema: dict | None) -> list[dict]:
    system = task if schema is None else task + "\n\n" + ANSWER_JSON.format(schema=json.dumps(schema))
    msgs = [{"role": "system", "content": system}]
    for user, assistant in seeds:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs + [{"role": "user", "content": prompt}]


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[a-z][.)])\s*", re.IGNORECASE)
_PREFIX = re.compile(r"^\s*(?:user(?: message)?|message|rewritten(?: message)?|query|question)\s*:\s*", re.IGNORECASE)
_QUOTES = ("\"\"", "''", "\u201c\u201d", "``")


def parse_list(reply: str, n: int) -> list[str]:
    """The items of a one-per-line list reply (bullets and numbering removed, duplicates dropped)."""
    items: dict[str, str] = {}
    for line in reply.splitlines():
        item = _BULLET.sub("", line).strip().strip("\"'").rstrip(".").strip()
        if item and len(item) <= 200 and item.casefold() not in items:
            items[item.casefold()] = item
    return list(items.values())[:n]


def clean_message(reply: str) -> str:
    """A generated user message without a `User:` prefix or wrapping quotation marks."""
    text = _PREFIX.sub("", reply.strip()).strip()
    for pair in _QUOTES:
        if len(text) >= 2 and text[0] == pair[0] and text[-1] == pair[-1]:
            text = text[1:-1].strip()
    return text


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_answer(reply: str) -> tuple[object | None, str | None]:
    """(value, None) for a reply that is JSON (a code fence around it allowed), else (None, why)."""
    text = reply.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    try:
        return json.loads(text), None
    except ValueError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start:end + 1]), None
        except ValueError as e:
            return None, f"not JSON: {e}"
    return None, "not JSON: no object in the reply"
