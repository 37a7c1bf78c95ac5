"""model.fast.decode: the fast path's layers decoding with a static KV cache give transformers' greedy tokens
for left-padded prompts (Llama with GQA and a tied head, Qwen2's q/k/v bias, Qwen3's q/k norms, Mistral, LoRA
and DoRA); they stop early once every row has met a stop token; sampling follows temperature and top-p and
repeats under the same seed. On CPU, without CUDA graphs (tests/gpu/test_fast_gpu.py replays them)."""

import pytest
import torch

from loraforge.model.fast import FastLlama
from loraforge.model.fast.decode import choose, fast_generate, why_not
from test_fast_path import SHAPE, _adapted


def _prompts(seed=3):
    """Three left-padded prompts of 9, 5 and 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SHAPE["vocab_size"], (3, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 4), (2, 7)):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


@pytest.mark.parametrize("kind,adapter", [("llama", "lora"), ("qwen2", "lora"), ("qwen3", "lora"),
                                          ("mistral", "lora"), ("llama", "dora")])
def test_greedy_tokens_equal_generate(kind, adapter):
    model = _adapted(kind, adapter).eval()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off")
    ids, mask = _prompts()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None, min_new_tokens=12)
    out = fast_generate(fast, ids, mask, max_new_tokens=12, stops=[], graphs=False)
    assert out.shape == ref.shape == (3, 21)
    assert out.tolist() == ref.tolist()


def test_decoding_stops_once_every_row_has_stopped():
    model = _adapted("llama").eval()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off")
    ids, mask = _prompts()
    free = fast_generate(fast, ids, mask, max_new_tokens=40, stops=[], graphs=False)
    assert free.shape[1] == 9 + 40
    # each row's 3rd new token as a stop: every row has stopped after at most 3 tokens, so the next check of
    # the stop flags (every CHECK_EVERY tokens) ends the decode well before 40
    stops = free[:, 9 + 2].tolist()
    cut = fast_generate(fast, ids, mask, max_new_tokens=40, stops=stops, graphs=False)
    assert 9 + 3 <= cut.shape[1] < 9 + 40
    assert cut.tolist() == free[:, :cut.shape[1]].tolist()


def test_choose_samples_the_top_p_set_at_its_renormalised_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40000, -1)
    assert choose(logits[:3], 0.0, 1.0).tolist() == [0, 0, 0]
    torch.manual_seed(0)
    counts = torch.bincount(choose(logits, 1.0, 0.7), minlength=4).float() / len(logits)
    # kept: 0 (nothing ranked above it) and 1 (0.5 above it < 0.7); dropped: 2 (0.8 above it) and 3
    assert counts[2] == 0 and counts[3] == 0
    assert abs(float(counts[0]) - 0.5 / 0.8) < 0.01
    counts = torch.bincount(choose(logits, 1.0, 1.0), minlength=4).float() / len(logits)
    assert torch.allclose(counts, probs, atol=0.01)
    # temperature 2 flattens: p ~ sqrt(probs)
    counts = torch.bincount(choose(logits, 2.0, 1.0), minlength=4).float() / len(logits)
    assert torch.allclose(counts, probs.sqrt() / probs.sqrt().sum(), atol=0.01)


def test_seeded_sampling_repeats_and_differs_between_seeds():
    model = _adapted("llama").eval()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off")
    ids, mask = _prompts()

    def run(seed):
        torch.manual_seed(seed)
        return fast_generate(fast, ids, mask, max_new_tokens=16, stops=[], temperature=1.0, top_p=0.9,
                             graphs=False).tolist()

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_why_not_names_what_the_decoder_cannot_take():
    model = _adapted("llama").eval()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off")
    assert why_not(fast) is None
    fast.decoder.rotary_emb.rope_type = "dynamic"
    assert "depends on the sequence length" in why_not(fast)


def test_a_failed_capture_decodes_on_eagerly_with_a_warning(monkeypatch):
    import contextlib

    from loraforge.model.fast import decode

    @contextlib.contextmanager
    def refused(graph, pool):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(decode, "capturing", refused)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    model = _adapted("llama").eval()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off")
    ids, mask = _prompts()
    eager = fast_generate(fast, ids, mask, max_new_tokens=8, stops=[], graphs=False)
    with pytest.warns(UserWarning, match="decoding without a CUDA graph"):
        tried = fast_generate(fast, ids, mask, max_new_tokens=8, stops=[], graphs=True)
    assert tried.tolist() == eager.tolist()


def test_prompts_prefilled_a_row_at_a_time_decode_the_same(monkeypatch):
    from loraforge.model.fast import decode

    model = _adapted("qwen2").eval()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off")
    ids, mask = _prompts()
    whole = fast_generate(fast, ids, mask, max_new_tokens=10, stops=[], graphs=False)
    monkeypatch.setattr(decode, "PREFILL_MASK", 1)   # one row per prefill forward
    assert fast_generate(fast, ids, mask, max_new_tokens=10, stops=[], graphs=False).tolist() == whole.tolist()
