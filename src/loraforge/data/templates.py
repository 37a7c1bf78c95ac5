"""Conversation -> token ids + loss mask, through the base model's own chat template.

The mask marks exactly the assistant turns' tokens (their content and the end-of-turn token that
follows, so the model learns to stop). Spans are found by rendering growing prefixes of the
conversation as text and mapping character offsets to tokens, which works for any template whose
renderings of a conversation's prefixes are prefixes of the whole (ChatML, Llama 3, Mistral, Gemma).
Raw-text examples (format "text", for continued pretraining) skip the chat template: BOS + text + EOS,
every token carrying loss. `mask_problems` checks that a mask covers exactly the assistant content;
`loss_segments` shows it to a human; `token_lengths` measures many examples fast, in batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.data.checks import CONTROL_TOKENS
from loraforge.data.formats import Example
from loraforge.errors import LoraforgeError

IGNORE_INDEX = -100
# Tokens that end a chat turn, most specific first: generation stops at any of them (model.decode); a GGUF's
# end-of-turn token is the first of them its vocabulary has (export.vocab), so <|endoftext|> comes before </s>.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    source: str

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise LoraforgeError(f"the chat template rejects this conversation: {e}", where=where,
                             hint="fix the turns (some templates allow no system turn, or need strict "
                                  "user/assistant alternation)") from None


def template_family(tokenizer) -> str | None:
    """The chat-template family a tokenizer's template belongs to ("ChatML/Qwen", "Llama 3", ...)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return next((fam for tok, fam in CONTROL_TOKENS.items() if tok in template), None)


def assistant_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn in it."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LoraforgeError("the tokenizer has no chat template", where=where,
                             hint="use an instruct model, or a tokenizer folder with chat_template.jinja")
    full = _render(tokenizer, messages, where=where)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, where=where) if i else ""
        upto = _render(tokenizer, messages[: i + 1], where=where)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise LoraforgeError("the chat template renders this conversation's prefixes inconsistently, so "
                                 "the assistant tokens cannot be located", where=where,
                                 hint="set data.train_on=all to train on every token")
        end = len(upto.rstrip())  # keep the end-of-turn token, drop the trailing newline
        spans.append((len(before), end))
    return full, spans


def full_text(tokenizer, example: Example) -> str:
    """The exact text the model sees for an example."""
    if example.meta.get("format") == "text":
        return (tokenizer.bos_token or "") + example.messages[0]["content"] + (tokenizer.eos_token or "")
    if getattr(tokenizer, "chat_template", None) is None:
        raise LoraforgeError("the tokenizer has no chat template", where=example.source)
    return _render(tokenizer, example.messages, where=example.source)


def render_text(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The exact text the model sees for an example, and the character spans that carry loss."""
    if example.meta.get("format") == "text":
        text = full_text(tokenizer, example)
        return text, [(0, len(text))]
    return assistant_spans(tokenizer, example.messages, example.source)


def _encode(tokenizer, example: Example, train_on: str):
    text, spans = render_text(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for k, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in spans):
                labels[k] = ids[k]
    return text, spans, list(ids), offsets, labels


def tokenize_example(tokenizer, example: Example, train_on: str = "assistant") -> Tokenized:
    _, _, ids, _, labels = _encode(tokenizer, example, train_on)
    return Tokenized(ids, labels, example.source)


def loss_segments(tokenizer, example: Example, train_on: str = "assistant") -> list[tuple[str, bool]]:
    """The rendered text cut into (piece, carries loss) runs, following token boundaries."""
    text, _, _, offsets, labels = _encode(tokenizer, example, train_on)
    runs: list[tuple[str, bool]] = []
    pos = 0
    for (_, b), label in zip(offsets, labels):
        if b <= pos:  # empty, or inside text already shown (tokens sharing one character)
            continue
        piece, flag = text[pos:b], label != IGNORE_INDEX  # text between tokens goes with the next one
        if runs and runs[-1][1] == flag:
            runs[-1] = (runs[-1][0] + piece, flag)
        else:
            runs.append((piece, flag))
        pos = max(pos, b)
    if pos < len(text):
        runs.append((text[pos:], False))
    return runs


def mask_problems(tokenizer, example: Example) -> list[str]:
    """Where the loss mask is not exactly the assistant turns' content plus their end-of-turn tokens:
    a masked token that reaches outside an assistant span, or a span holding more than the content."""
    if example.meta.get("format") == "text":
        return []
    text, spans, ids, offsets, labels = _encode(tokenizer, example, "assistant")
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    answers = [t["content"] for t in example.messages if t["role"] == "assistant"]
    out = []
    for n, ((s, e), content) in enumerate(zip(spans, answers), 1):
        segment = text[s:e]
        k = segment.find(content)
        rest = segment[:k] + segment[k + len(content):] if k >= 0 else segment
        for sp in specials:
            rest = rest.replace(sp, "")
        if k < 0:
            out.append(f"assistant turn {n}: its content is not inside its loss span {segment!r}")
        elif rest.strip():
            out.append(f"assistant turn {n}: the loss span also covers {rest.strip()!r}")
    for (a, b), label in zip(offsets, labels):
        if label != IGNORE_INDEX and not any(s <= a and b <= e for s, e in spans):
            out.append(f"token {text[a:b]!r} carries loss but reaches outside the assistant turn")
    return out


def token_lengths(tokenizer, examples: list[Example]) -> list[int | None]:
    """Token count of each example after the chat template (None where the template rejects it), with
    the fast tokenizer working on the whole batch at once."""
    texts: list[str] = []
    for ex in examples:
        try:
            texts.append(full_text(tokenizer, ex))
        except LoraforgeError:
            texts.append(None)
    todo = [t for t in texts if t is not None]
    ids = tokenizer(todo, add_special_tokens=False, return_attention_mask=False)["input_ids"] if todo else []
    lengths = iter(len(x) for x in ids)
    return [None if t is None else next(lengths) for t in texts]


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
