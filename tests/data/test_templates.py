"""The loss mask covers exactly the assistant turns (content + end-of-turn token), via the chat template."""

import pytest
from conftest import make_tokenizer

from loraforge.data.formats import Example
from loraforge.data.templates import IGNORE_INDEX, tokenize_all, tokenize_example
from loraforge.errors import LoraforgeError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _loss_text(tok, t):
    return tok.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE_INDEX])


def test_mask_is_assistant_content_and_end_of_turn(tok):
    ex = Example([{"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "The sky is blue."}], "x:1")
    t = tokenize_example(tok, ex)
    assert _loss_text(tok, t) == "The sky is blue.<|im_end|>"
    text = tok.apply_chat_template(ex.messages, tokenize=False)
    assert tok.decode(t.input_ids) == text  # the ids are exactly the template's rendering


def test_multi_turn_masks_every_assistant_turn(tok):
    ex = Example([{"role": "system", "content": "Answer with one word only please."},
                  {"role": "user", "content": "apple?"}, {"role": "assistant", "content": "red"},
                  {"role": "user", "content": "grass?"}, {"role": "assistant", "content": "green"}], "x:1")
    t = tokenize_example(tok, ex)
    assert _loss_text(tok, t) == "red<|im_end|>green<|im_end|>"
    assert tokenize_example(tok, ex, train_on="all").labels == t.input_ids


def test_too_long_examples_are_dropped_and_reported(tok):
    short = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "f:1")
    long = Example([{"role": "user", "content": "apple " * 200}, {"role": "assistant", "content": "ok"}], "f:2")
    kept, dropped = tokenize_all(tok, [short, long], max_seq_length=64)
    assert len(kept) == 1 and dropped == ["f:2"]
    with pytest.raises(LoraforgeError, match=r"f:2: all 1 examples of the data are longer than max_seq_length=64"):
        tokenize_all(tok, [long], max_seq_length=64)


def test_tokenizer_without_template_is_a_clear_error(tok):
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(LoraforgeError, match="no chat template"):
        tokenize_example(bare, Example([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "f:1"))


# --- the four families: the mask is exactly the assistant content plus its end-of-turn token ----------------

from families import FAMILIES, family_tokenizer  # noqa: E402

from loraforge.data.templates import loss_segments, mask_problems, template_family  # noqa: E402

TURNS = [{"role": "user", "content": "What colour is the apple?"}, {"role": "assistant", "content": "red"},
         {"role": "user", "content": "And the grass?"}, {"role": "assistant", "content": "The grass is green."}]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mask_covers_exactly_the_assistant_content(family):
    tok = family_tokenizer(family)
    _, _, _, _, end, system = FAMILIES[family]
    messages = ([{"role": "system", "content": "Answer with one word only please."}] if system else []) + TURNS
    ex = Example(messages, "f:1")
    t = tokenize_example(tok, ex)
    assert _loss_text(tok, t) == f"red{end}The grass is green.{end}"
    assert tok.decode(t.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert mask_problems(tok, ex) == []
    segments = loss_segments(tok, ex)
    assert "".join(p for p, _ in segments) == tok.decode(t.input_ids)
    assert [p for p, loss in segments if loss] == [f"red{end}", f"The grass is green.{end}"]


def test_template_family_names_the_control_tokens():
    names = {f: template_family(family_tokenizer(f)) for f in FAMILIES}
    assert names == {"llama3": "Llama 3", "chatml": "ChatML/Qwen", "mistral": "Mistral/Llama 2", "gemma": "Gemma"}


def test_a_template_that_rejects_a_conversation_is_a_clear_error():
    ex = Example([{"role": "system", "content": "s"}, *TURNS[:2]], "f:3")
    with pytest.raises(LoraforgeError, match="f:3: the chat template rejects this conversation: System role"):
        tokenize_example(family_tokenizer("gemma"), ex)


def test_mask_problems_catch_a_span_wider_than_the_content(tok):
    ex = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "f:1")
    bad = make_tokenizer(template=CHATML_EXTRA)
    assert mask_problems(tok, ex) == []
    assert mask_problems(bad, ex) == ["assistant turn 1: the loss span also covers 'Answer:'"]


CHATML_EXTRA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                "{{ 'Answer: ' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_raw_text_trains_on_every_token(tok):
    ex = Example([{"role": "assistant", "content": "The sky is blue."}], "f:1", meta={"format": "text"})
    t = tokenize_example(tok, ex)
    assert t.labels == t.input_ids and tok.decode(t.input_ids) == "The sky is blue.<|im_end|>"
