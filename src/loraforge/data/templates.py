"""Conversation -> token ids + loss mask, through the base model's own chat template.

The mask marks exactly the assistant turns' tokens (their content and the end-of-turn token that
follows, so the model learns to stop). Spans are found by rendering growing prefixes of the
conversation as text and mapping character offsets to tokens, which works for any template whose
renderings of a conversation's prefixes are prefixes of the whole (ChatML, Llama 3, Mistral, Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.data.formats import Example
from loraforge.errors import LoraforgeError

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    source: str

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn in it."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LoraforgeError("the tokenizer has no chat template", where=where,
                             hint="use an instruct model, or a tokenizer folder with chat_template.jinja")
    full = _render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise LoraforgeError("the chat template renders this conversation's prefixes inconsistently, so "
                                 "the assistant tokens cannot be located", where=where,
                                 hint="set data.train_on=all to train on every token")
        end = len(upto.rstrip())  # keep the end-of-turn token, drop the trailing newline
        spans.append((len(before), end))
    return full, spans


def tokenize_example(tokenizer, example: Example, train_on: str = "assistant") -> Tokenized:
    text, spans = assistant_spans(tokenizer, example.messages, example.source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for k, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in spans):
                labels[k] = ids[k]
    return Tokenized(list(ids), labels, example.source)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The text a model sees before it answers: every turn but the last assistant one, plus the
    generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_all(tokenizer, examples: list[Example], max_seq_length: int, train_on: str = "assistant",
                 what: str = "data") -> tuple[list[Tokenized], list[str]]:
    """Tokenize every example; those longer than max_seq_length are dropped (never silently truncated:
    their sources are returned). All examples too long, or none with loss tokens, is an error."""
    kept, too_long = [], []
    for ex in examples:
        t = tokenize_example(tokenizer, ex, train_on)
        if len(t.input_ids) > max_seq_length:
            too_long.append(ex.source)
        elif t.n_loss_tokens:
            kept.append(t)
    if not kept:
        if too_long:
            raise LoraforgeError(f"all {len(too_long)} examples of the {what} are longer than "
                                 f"max_seq_length={max_seq_length} tokens", where=too_long[0],
                                 hint="raise data.max_seq_length or shorten the examples")
        raise LoraforgeError(f"no example of the {what} has assistant tokens to learn from",
                             where=examples[0].source if examples else what)
    return kept, too_long
