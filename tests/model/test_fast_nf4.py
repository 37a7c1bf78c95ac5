"""The fast path over an NF4 (QLoRA) base, on CPU through bitsandbytes' CPU backend (skipped where
bitsandbytes is not installed): loss and LoRA gradients against PEFT's own forward over the same
Linear4bit layers, and gate/up rebuilt one projection at a time (the group is larger than the largest
single projection) giving the same loss and gradients as one rebuild of the whole group; the MLP in chunks
giving the unchunked ones."""

import pytest
import torch

pytest.importorskip("bitsandbytes")

from loraforge.config import LoraSection  # noqa: E402
from loraforge.data.templates import IGNORE_INDEX  # noqa: E402
from loraforge.model.adapters import attach_adapter  # noqa: E402
from loraforge.model.fast import FastLlama  # noqa: E402
from loraforge.model.quant import quantize_linears_  # noqa: E402
from loraforge.train.loop import loss_sum, split_model  # noqa: E402


def _nf4_model():
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = tr.LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert quantize_linears_(model, device="cpu") == 14
    model = attach_adapter(model, LoraSection(r=8, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.05)
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _loss_grads(model, parts, batch):
    model.zero_grad(set_to_none=True)
    s, _ = loss_sum(model, batch, parts)
    s.backward()
    return float(s), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_nf4_fast_path_matches_peft_and_split_rebuild_matches_whole():
    model, batch = _nf4_model(), _batch()
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True)
    layer = fast.layers[0]
    assert layer.gate_up.parts[0][1].split and not layer.qkv.parts[0][1].split
    assert fast.state.largest == 256 * 128
    split_loss, split_grads = _loss_grads(model, fast, batch)
    # the same forward with gate/up rebuilt as one (256 + 256) x 128 matrix
    fast.state.largest = float("inf")
    assert not layer.gate_up.parts[0][1].split
    whole_loss, whole_grads = _loss_grads(model, fast, batch)
    assert split_loss == pytest.approx(whole_loss, rel=1e-4)
    assert split_grads.keys() == whole_grads.keys() and len(split_grads) == 28
    for k in split_grads:
        assert _rel(split_grads[k], whole_grads[k]) < 2e-2, k
    # PEFT's own forward over the same NF4 layers (bitsandbytes' matmul, bf16 compute)
    ref_loss, ref_grads = _loss_grads(model, split_model(model), batch)
    assert split_loss == pytest.approx(ref_loss, rel=1e-3)
    for k in ref_grads:
        assert _rel(split_grads[k], ref_grads[k]) < 0.05, k


def test_down_proj_weight_still_in_the_buffer_is_not_rebuilt_again(monkeypatch):
    """A layer's recomputation rebuilds down_proj last and its backward needs it first: the shared buffer
    still holds it, so a checkpointed step dequantizes 7 + 7 + 6 weights a layer, not 7 + 7 + 7; the
    gradients stay PEFT's."""
    import bitsandbytes.functional as bnbf

    model, batch = _nf4_model(), _batch()
    ref_loss, ref = _loss_grads(model, split_model(model), batch)
    calls = []
    real = bnbf.dequantize_4bit
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True, graphs="off")
    loss, got = _loss_grads(model, fast, batch)
    assert len(calls) == 2 * (7 + 7 + 6)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for k in ref:
        assert _rel(got[k], ref[k]) < 5e-2, k
    # without recomputation: 7 a layer in the forward; in the backward 6 for layer 1 (its down held) and 4
    # for layer 0 (its input needs no gradient, so q/k/v are not rebuilt for one)
    calls.clear()
    _loss_grads(model, FastLlama(model, dtype=torch.bfloat16, checkpointing=False), batch)
    assert len(calls) == 7 + 7 + 6 + 4


def test_nf4_chunked_mlp_matches_unchunked(monkeypatch):
    """The MLP over chunks of 10 rows (2 x 24 tokens: 5 chunks, the last short) with the shared NF4 buffer
    rebuilt per chunk: the unchunked loss and gradients (bf16), and per chunk and layer gate, up and down are
    rebuilt in the forward and in the recomputation, with down still held for its backward."""
    import bitsandbytes.functional as bnbf

    model, batch = _nf4_model(), _batch()
    plain_loss, plain = _loss_grads(model, FastLlama(model, dtype=torch.bfloat16, checkpointing=True,
                                                     mlp_chunk_tokens=0), batch)
    calls = []
    real = bnbf.dequantize_4bit
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True, mlp_chunk_tokens=10)
    loss, got = _loss_grads(model, fast, batch)
    assert loss == pytest.approx(plain_loss, rel=1e-3)
    for k in plain:
        assert _rel(got[k], plain[k]) < 2e-2, k
    # per layer: forward q/k/v and o (4), then 5 chunks x gate, up, down (3); backward: the attention half
    # recomputed (4), each chunk recomputed (3) and back-propagated (gate and up: 2, down held), then the
    # attention half's backward (4: the buffer holds up by then)
    assert len(calls) == 2 * ((4 + 5 * 3) + (4 + 5 * (3 + 2) + 4))
