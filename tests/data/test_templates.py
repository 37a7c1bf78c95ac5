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
