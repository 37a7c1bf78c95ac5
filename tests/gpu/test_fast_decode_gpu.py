"""model.fast.decode on a CUDA device: the one-token step replayed as a CUDA graph gives the eager step's tokens
(bf16 and NF4 bases, LoRA and DoRA), greedy and seeded sampling, and transformers' greedy tokens for most of the
completion (bf16 kernels of two different paths may split a near tie); model.decode's GRPO path uses it; NF4
products of a step's few rows read the packed weights (model.fast.nf4_matmul) and match the rebuilt weight's."""

import warnings

import pytest
import torch

from loraforge.model.fast import FastLlama
from loraforge.model.fast.decode import fast_generate
from test_fast_gpu import _small_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _prompts():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 1000, (4, 40), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 10), (2, 25), (3, 39)):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("quantize,adapter", [(False, "lora"), (True, "lora"), (True, "dora")])
def test_graph_replays_give_the_eager_tokens(quantize, adapter):
    model = _small_llama(quantize, adapter).eval()
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True)
    ids, mask = _prompts()
    eager = fast_generate(fast, ids, mask, max_new_tokens=48, stops=[], graphs=False)
    with warnings.catch_warnings():   # the capture must not fall back to the eager step
        warnings.filterwarnings("error", message="decoding without a CUDA graph")
        graphed = fast_generate(fast, ids, mask, max_new_tokens=48, stops=[], graphs=True)
    assert graphed.tolist() == eager.tolist()
    sampled = []
    for graphs in (False, True, True):
        torch.manual_seed(7)
        sampled.append(fast_generate(fast, ids, mask, max_new_tokens=48, stops=[], temperature=1.0, top_p=0.95,
                                     graphs=graphs).tolist())
    assert sampled[1] == sampled[2]          # a graph's replays draw from the seeded generator
    assert sampled[1] != eager.tolist()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, min_new_tokens=48,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    first = (graphed[:, 40:] == ref[:, 40:]).float().cumprod(1).sum(1)   # tokens equal before the first split
    assert float(first.min()) >= 8, first.tolist()


def test_grpo_sampling_decodes_through_the_fast_path(monkeypatch):
    from loraforge.model import decode

    model = _small_llama(True).eval()
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True)
    calls = []
    real = decode.fast_generate
    monkeypatch.setattr(decode, "fast_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]] * 4
    out = decode.decode_ids(model, prompts, stops=[2], pad_id=0, max_new_tokens=20, batch_size=8, temperature=1.0,
                            seed=3, fast=fast)
    again = decode.decode_ids(model, prompts, stops=[2], pad_id=0, max_new_tokens=20, batch_size=8,
                              temperature=1.0, seed=3, fast=fast)
    assert calls == [1, 1] and [c.ids for c in out] == [c.ids for c in again]
    assert all(len(c.ids) == 20 or c.stopped for c in out)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
def test_packed_nf4_products_match_the_rebuilt_weight_in_bf16(nested):
    import bitsandbytes.functional as bnbf

    from loraforge.model.fast import nf4_matmul

    torch.manual_seed(0)
    for m, n, k in ((1, 1024, 4096), (8, 6144, 4096), (64, 4096, 14336), (13, 200, 640)):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        dense = bnbf.dequantize_4bit(packed, qs)          # bf16, as the fast path rebuilds it
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dense.float().t()
        got = nf4_matmul.partial_products(x, packed, qs, n).sum(0)
        assert torch.allclose(got, ref, rtol=0, atol=1e-3 * float(ref.abs().max())), (m, n, k)


def test_nf4_decoding_reads_the_packed_weights_and_gives_the_rebuilt_tokens(monkeypatch):
    from loraforge.model.fast import nf4_matmul

    model = _small_llama(True, "lora").eval()
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True)
    ids, mask = _prompts()
    rebuilt_rows = nf4_matmul.ROWS
    monkeypatch.setattr(nf4_matmul, "ROWS", 0)                 # no product takes the packed path
    rebuilt = fast_generate(fast, ids, mask, max_new_tokens=32, stops=[])
    monkeypatch.setattr(nf4_matmul, "ROWS", rebuilt_rows)
    calls = []
    real = nf4_matmul.product
    monkeypatch.setattr(nf4_matmul, "product", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():   # the packed product must build: no fallback to the rebuilt weights
        warnings.filterwarnings("error", message="NF4 decoding rebuilds")
        packed = fast_generate(fast, ids, mask, max_new_tokens=32, stops=[])
    assert calls and not fast.state.decoding and not fast.state.packed_failed
    first = (packed[:, 40:] == rebuilt[:, 40:]).float().cumprod(1).sum(1)
    assert float(first.min()) >= 8, first.tolist()
