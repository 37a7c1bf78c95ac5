"""LLM-as-judge through any OpenAI-compatible chat endpoint (standard library HTTP only).

    from loraforge.eval.llm_judge import JudgeClient, rubric_scores, pairwise, win_rates
    client = JudgeClient("http://localhost:8000", model="judge-model", api_key=None)
    scores = rubric_scores(client, prompts, answers)          # RubricScore: 1-10, or verdict "error"
    pairs = pairwise(client, prompts, answers_a, answers_b)   # PairwiseResult: win/tie/loss for A
    summary = win_rates(pairs)

Requests go to `POST {base_url}/v1/chat/completions` (a base_url already ending in /v1 is fine)
with temperature 0. The rubric prompt asks for `Rating: [[N]]`; the pairwise prompt asks for
`[[A]]`, `[[B]]` or `[[C]]` (tie), as in MT-Bench. Each pair is judged twice with the answers'
positions swapped: a verdict that survives the swap is a win or loss, anything else is a tie, which
cancels the judge's position bias. Timeouts, HTTP errors and unparseable replies become that
example's `verdict="error"` with a reason; one bad reply never stops the batch.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

from loraforge.errors import LoraforgeError

SYSTEM_PROMPT = "You are an impartial judge of AI assistant answers. Follow the output format exactly."

DEFAULT_RUBRIC = (
    "Rate the answer for helpfulness, correctness, relevance, depth and clarity. "
    "1 = useless or wrong, 5 = acceptable with flaws, 10 = excellent."
)

_RUBRIC_TEMPLATE = """[Criteria]
{rubric}

[Question]
{prompt}
{reference}
[The Start of the Answer]
{answer}
[The End of the Answer]

Explain your judgement briefly, then end with the rating, an integer from 1 to 10, exactly in this
format: "Rating: [[5]]"."""

_PAIRWISE_TEMPLATE = """Compare two AI assistants' answers to the user question below. Choose the
answer that follows the instructions and answers the question better. Do not let the order of the
answers, their length or the assistants' names influence you.

[User Question]
{prompt}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]

Explain briefly, then end with your verdict exactly in this format: "[[A]]" if A is better,
"[[B]]" if B is better, "[[C]]" for a tie."""

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_LOOSE = re.compile(r"(?:rating|score)\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")

Verdict = Literal["win", "tie", "loss", "error"]
_T = TypeVar("_T")
_R = TypeVar("_R")


class JudgeCallError(Exception):
    """One judge request failed (network, HTTP, timeout, malformed reply); reported per example."""


@dataclass(frozen=True)
class JudgeClient:
    """Where the judge model is served, and how long to wait for one reply."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise LoraforgeError(
                f"judge base_url must start with http:// or https:// (got {self.base_url!r})",
                hint="e.g. http://localhost:8000 or https://api.openai.com",
            )

    @property
    def endpoint(self) -> str:
        base = self.base_url.rstrip("/")
        return f"{base if base.endswith('/v1') else base + '/v1'}/chat/completions"

    def complete(self, user: str) -> str:
        """The judge's reply to one user message; raises JudgeCallError on any failure."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise JudgeCallError(f"HTTP {e.code} from {self.endpoint}: {e.read()[:200]!r}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise JudgeCallError(f"timed out after {self.timeout:g}s") from None
            raise JudgeCallError(f"cannot reach {self.endpoint}: {e.reason}") from None
        except TimeoutError:
            raise JudgeCallError(f"timed out after {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise JudgeCallError(f"connection failed: {e!r}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeCallError(f"reply is not an OpenAI chat completion: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise JudgeCallError(f"reply content is not text: {content!r}"[:200])
        return content


def _parallel(fn: Callable[[_T], _R], items: Sequence[_T], max_workers: int) -> list[_R]:
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(fn, items))


# --- rubric scoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RubricScore:
    """One answer's rubric score: `score` in 1..10 when verdict is "ok"; None with a reason on "error"."""

    verdict: Literal["ok", "error"]
    score: float | None
    reason: str
    raw: str


def parse_rating(reply: str) -> float | None:
    """The last `[[N]]` (else the last `Rating: N` / `Score: N`) in 1..10, or None."""
    found = _RATING.findall(reply) or _RATING_LOOSE.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def rubric_scores(
    client: JudgeClient,
    prompts: Sequence[str],
    answers: Sequence[str],
    rubric: str = DEFAULT_RUBRIC,
    references: Sequence[str] | None = None,
    max_workers: int = 4,
) -> list[RubricScore]:
    """Score each answer 1-10 against the rubric (and a reference answer, when given)."""
    refs = list(references) if references is not None else [None] * len(prompts)
    if not len(prompts) == len(answers) == len(refs):
        raise LoraforgeError("rubric_scores: prompts, answers and references differ in length")

    def one(item: tuple[str, str, str | None]) -> RubricScore:
        prompt, answer, ref = item
        reference = f"\n[Reference Answer]\n{ref}\n" if ref is not None else ""
        text = _RUBRIC_TEMPLATE.format(rubric=rubric, prompt=prompt, reference=reference, answer=answer)
        try:
            reply = client.complete(text)
        except JudgeCallError as e:
            return RubricScore("error", None, str(e), "")
        rating = parse_rating(reply)
        if rating is None:
            return RubricScore("error", None, "no rating [[1-10]] in the judge's reply", reply)
        return RubricScore("ok", rating, "", reply)

    return _parallel(one, list(zip(prompts, answers, refs, strict=True)), max_workers)


# --- pairwise comparison --------------------------------------------------------------------------


@dataclass(frozen=True)
class PairwiseResult:
    """A vs B on one prompt. `first`/`second`: the judge's raw choice with A first, then swapped."""

    verdict: Verdict
    first: str
    second: str
    reason: str


def parse_choice(reply: str) -> str | None:
    """The last `[[A]]`, `[[B]]` or `[[C]]` in the reply, as "A", "B" or "C"; None if absent."""
    found = _CHOICE.findall(reply)
    return found[-1] if found else None


def combine_swapped(first: str, second: str) -> Verdict:
    """Verdict for model A from the choice with A shown first and the choice with positions swapped."""
    prefer_first = {"A": "a", "B": "b", "C": "tie"}[first]
    prefer_second = {"A": "b", "B": "a", "C": "tie"}[second]
    if prefer_first == prefer_second == "a":
        return "win"
    if prefer_first == prefer_second == "b":
        return "loss"
    return "tie"


def pairwise(
    client: JudgeClient,
    prompts: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    max_workers: int = 4,
) -> list[PairwiseResult]:
    """Judge A against B on each prompt, twice with positions swapped."""
    if not len(prompts) == len(answers_a) == len(answers_b):
        raise LoraforgeError("pairwise: prompts, answers_a and answers_b differ in length")

    def ask(prompt: str, shown_a: str, shown_b: str) -> str:
        reply = client.complete(_PAIRWISE_TEMPLATE.format(prompt=prompt, answer_a=shown_a, answer_b=shown_b))
        choice = parse_choice(reply)
        if choice is None:
            raise JudgeCallError(f"no verdict [[A]]/[[B]]/[[C]] in the judge's reply: {reply[:200]!r}")
        return choice

    def one(item: tuple[str, str, str]) -> PairwiseResult:
        prompt, a, b = item
        try:
            first = ask(prompt, a, b)
            second = ask(prompt, b, a)
        except JudgeCallError as e:
            return PairwiseResult("error", "", "", str(e))
        return PairwiseResult(combine_swapped(first, second), first, second, "")

    return _parallel(one, list(zip(prompts, answers_a, answers_b, strict=True)), max_workers)


@dataclass(frozen=True)
class WinRates:
    """Shares of win/tie/loss for A among the judged pairs (errors excluded and counted apart)."""

    win: float
    tie: float
    loss: float
    judged: int
    errors: int


def win_rates(results: Sequence[PairwiseResult]) -> WinRates:
    """Aggregate pairwise verdicts; rates are 0 when nothing could be judged."""
    judged: list[str] = [r.verdict for r in results if r.verdict != "error"]
    n = len(judged)

    def rate(verdict: str) -> float:
        return judged.count(verdict) / n if n else 0.0

    return WinRates(rate("win"), rate("tie"), rate("loss"), n, len(results) - n)
