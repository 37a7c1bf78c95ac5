"""model.decode's shared prompt prefix: a batch's common opening tokens are prefilled once and their KV cache
repeated for every row; the completions are those of the plain left-padded batch, greedy and seeded sampling."""

import pytest
import torch

from loraforge.data.prefix import shared_length
from loraforge.model.decode import SHARE_MIN, _layout, decode_ids, stop_token_ids

SYSTEM = "You sort things by colour. Name the colour of the thing asked about, in one short sentence."


def test_shared_length_leaves_every_prompt_a_token():
    assert shared_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_length([[9, 2], [1, 2]]) == 0


def test_layout_puts_the_padding_between_prefix_and_rest():
    ids, mask = _layout([[5, 6, 7, 1], [5, 6, 7, 2, 3, 4]], pad_id=0, share=3)
    assert ids.tolist() == [[5, 6, 7, 0, 0, 1], [5, 6, 7, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    ids, mask = _layout([[5, 6, 7, 1], [5, 6, 7, 2, 3, 4]], pad_id=0, share=0)
    assert ids.tolist() == [[0, 0, 5, 6, 7, 1], [5, 6, 7, 2, 3, 4]]


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.templates import prompt_text

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    things = ["sky", "grass", "sun", "snow", "coal", "blood", "orange", "violet"]
    convs = [[{"role": "system", "content": SYSTEM},
              {"role": "user", "content": f"What colour is the {t}?" + " Tell me." * (i % 3)}]
             for i, t in enumerate(things)]
    prompts = [tok(prompt_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    return model, tok, prompts


def test_a_shared_prefix_decodes_the_same_tokens(model_and_prompts):
    model, tok, prompts = model_and_prompts
    assert shared_length(prompts) >= SHARE_MIN
    seen = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    kw = dict(stops=stop_token_ids(tok, model), pad_id=tok.pad_token_id, max_new_tokens=10, batch_size=8)
    try:
        shared = decode_ids(model, prompts, share_prefix=True, **kw)
        n_shared = len(seen)
        plain = decode_ids(model, prompts, share_prefix=False, **kw)
    finally:
        hook.remove()
    assert seen[0] == (1, shared_length(prompts))    # the prefix, once
    assert seen[1][0] == 8 and seen[1][1] < max(map(len, prompts)) - 5   # then only the rows' own tokens
    assert seen[n_shared][1] == max(map(len, prompts))      # the plain batch prefills everything
    assert [c.ids for c in shared] == [c.ids for c in plain]
    assert [c.stopped for c in shared] == [c.stopped for c in plain]
    assert sum(len(c.ids) for c in plain) > 8
    sample = dict(kw, temperature=1.0, top_p=0.9, seed=5)
    assert [c.ids for c in decode_ids(model, prompts, share_prefix=True, **sample)] == \
        [c.ids for c in decode_ids(model, prompts, share_prefix=False, **sample)]
