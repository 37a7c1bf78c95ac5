"""Per-request decoding for the server: the request's sampling settings, the choice of its next token
(greedy, or sampled with its own seeded generator), and the turning of its tokens into text deltas.

Each request owns a `torch.Generator`, so a seeded request samples the same tokens whatever else shares
its batch. Stop strings are matched on the decoded text; a delta is only sent once it can no longer turn
out to be the start of a stop string (nor half a multi-byte character), and the final text is cut just
before the first stop string found, so a client never sees any part of one. A request with a
`response_format` carries a grammar state (loraforge.eval.structured): the worker masks its row's logits
with it before the token is chosen and advances it after, so it only ever decodes valid answers.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable

# torch, transformers and peft are imported inside the functions that use them: see server.py


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0           # 0: greedy
    top_p: float = 1.0                 # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None            # None: a fresh random seed per request
    stop: tuple[str, ...] = ()         # stop strings (not part of the answer)
    ignore_eos: bool = False           # decode to max_tokens through end-of-turn tokens (load tests)

    def generator(self):
        import torch

        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed if self.seed is not None else random.SystemRandom().getrandbits(63))
        return g


def pick_token(logits, sampling: Sampling, generator) -> int:
    """The next token from one row of logits (1-D, float32, CPU)."""
    import torch

    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, dim=0) - sorted_p) < sampling.top_p  # the first token is always kept
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def pending_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Job:
    """One request: what to decode, and where its text goes (`emit(delta, finish_reason)`, thread-safe)."""

    prompt_ids: list[int]
    adapter: str                       # adapter name or registry.BASE
    max_tokens: int
    emit: Callable[[str | None, str | None], None]
    sampling: Sampling = field(default_factory=Sampling)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""                     # the text sent so far
    done: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    rng: object = None                 # the request's torch.Generator, made on its first sampled token
    grammar: object = None             # structured decoding: its eval.structured.State (response_format), or None

    def push(self, token: int, tokenizer, stop_ids: set[int]) -> None:
        """Take one generated token: send what text is safe to send, finish on a stop or at max_tokens."""
        if self.done:
            return
        if token in stop_ids and not self.sampling.ignore_eos:
            self.finish("stop", tokenizer)
            return
        self.tokens.append(token)
        self.completion_tokens += 1
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        stops = self.sampling.stop
        if stops and first_stop(text, stops) is not None:
            self.finish("stop", tokenizer)
            return
        safe = len(text.rstrip("\ufffd")) - (pending_prefix(text, stops) if stops else 0)
        if safe > len(self.text) and text.startswith(self.text):
            self.emit(text[len(self.text):safe], None)
            self.text = text[:safe]
        if self.completion_tokens >= self.max_tokens:
            self.finish("length", tokenizer)

    def finish(self, reason: str, tokenizer=None) -> None:
        """Send the rest of the text (cut before a stop string) and the finish reason, once."""
        if self.done:
            return
        self.done = True
        if tokenizer is not None and reason not in ("cancelled", "error", "adapter_unloaded"):
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = first_stop(text, self.sampling.stop) if self.sampling.stop else None
            if cut is not None:
                text, reason = text[:cut], "stop"
            if len(text) > len(self.text) and text.startswith(self.text):
                self.emit(text[len(self.text):], None)
            self.text = text
        self.finish_reason = reason
        self.emit(None, reason)

    def fail(self, reason: str, message: str | None = None) -> None:
        if not self.done:
            self.done = True
            self.finish_reason = reason
            self.emit(message, reason)
