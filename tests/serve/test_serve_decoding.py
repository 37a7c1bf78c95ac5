"""Per-request decoding on its own: nucleus sampling keeps exactly the top-p set, seeds repeat, and stop
strings that arrive a piece at a time are never sent, not even their first characters."""

from __future__ import annotations

import pytest

from loraforge.serve.decoding import Job, Sampling, first_stop, pending_prefix, pick_token


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    import torch

    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    s = Sampling(temperature=1.0, top_p=0.7, seed=0)
    g = s.generator()
    draws = [pick_token(logits, s, g) for _ in range(4000)]
    assert set(draws) == {1, 3}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert draws.count(1) / len(draws) == pytest.approx(0.5 / 0.8, abs=0.03)
    s = Sampling(temperature=1.0, top_p=0.85, seed=0)
    g = s.generator()
    assert set(pick_token(logits, s, g) for _ in range(2000)) == {1, 2, 3}
    hot = Sampling(temperature=0.25, seed=0)  # a low temperature sharpens: p(1) = 0.5^4 / sum(p^4)
    g = hot.generator()
    share = sum(pick_token(logits, hot, g) == 1 for _ in range(4000)) / 4000
    want = 0.5 ** 4 / sum(p ** 4 for p in (0.05, 0.5, 0.15, 0.3))
    assert share == pytest.approx(want, abs=0.03)
    assert pick_token(logits, Sampling(), None) == 1  # temperature 0: argmax
    a, b = Sampling(temperature=1, seed=9).generator(), Sampling(temperature=1, seed=9).generator()
    flat = torch.zeros(50)
    assert [pick_token(flat, s, a) for _ in range(20)] == [pick_token(flat, s, b) for _ in range(20)]


def test_stop_helpers():
    assert first_stop("the apple and the pear", ("pear", "apple")) == 4
    assert first_stop("nothing", ("x",)) is None
    assert pending_prefix("I like app", ("apple",)) == 3
    assert pending_prefix("I like apple pie", ("apple",)) == 0
    assert pending_prefix("ab", ("abc", "bz")) == 2
    assert pending_prefix("xb", ("abc", "bz")) == 1


@pytest.mark.parametrize("stop, want, reason", [
    (("apple",), "The sky is blue. The ", "stop"),
    ((" is", "blue"), "The sky", "stop"),
    (("blue. The a",), "The sky is ", "stop"),           # arrives over several tokens: held back, then cut
    (("blue!", "red?"), "The sky is blue. The apple is red.", "length"),  # held back, then released
    (("plum",), "The sky is blue. The apple is red.", "length"),
])
def test_stop_strings_arriving_token_by_token_are_never_sent(tiny_model, stop, want, reason):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "The sky is blue. The apple is red."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 8
    sent, finishes = [], []
    job = Job([1], "a", len(ids), lambda d, f: (sent.append(d) if d else None, finishes.append(f) if f else None),
              sampling=Sampling(stop=stop))
    held = 0
    for t in ids:
        job.push(t, tok, set())
        assert want.startswith("".join(sent))  # at no point has any part of a stop string gone out
        held += not job.done and len("".join(sent)) < len(tok.decode(job.tokens))
    assert "".join(sent) == want and finishes == [reason] and job.finish_reason == reason
    if stop[0] in ("blue. The a", "blue!"):
        assert held  # a partial match really held text back
