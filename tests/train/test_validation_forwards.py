"""Validation's forwards (train.validation_forwards) with the budget multiplier of model.fast.memory: the same
validation loss in fewer forwards on a tiny random Llama through the fast path, and the multiplier's arithmetic
(SmolLM2-135M's shape; the FastLlama settings that change what training keeps)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import chat_rows, make_tokenizer

from loraforge.config import LoraSection, build_config
from loraforge.data.formats import Example
from loraforge.data.templates import tokenize_example
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast import FastLlama
from loraforge.model.fast.memory import MAX_SCALE, forward_ceiling, layer_sizes, step_floor, validation_scale
from loraforge.model.load import load_base
from loraforge.train.loop import StepModule, evaluate_loss
from loraforge.train.validation_forwards import loss_fraction, validation_layout
from loraforge.train.validation_forwards import validation_scale as run_scale

SMOL = (30, 576, 576, 384, 1536)   # SmolLM2-135M: layers, hidden, q width, k + v widths, intermediate


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A random Llama of 12 layers (hidden 32): deep enough for a multiplier above 2 with checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("deep-tiny")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def peft_model(path):
    model, tok, _ = load_base(str(path))
    torch.manual_seed(1)
    model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:   # an adapter that changes the logits
            p.data.normal_(0, 0.1)
    return model, tok


class Counting(StepModule):
    """The step module, counting evaluate_loss's forwards."""

    calls = 0

    def forward(self, batch):
        self.calls += 1
        return super().forward(batch)


@pytest.mark.parametrize("packing", [False, True])
def test_validation_loss_is_the_same_in_fewer_forwards(deep_model, packing):
    model, tok = peft_model(deep_model)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    rows = chat_rows(48)
    for i in range(0, 48, 5):   # lengths that differ
        rows[i]["messages"].insert(0, {"role": "system", "content": "Answer with one word only please."})
    items = [tokenize_example(tok, Example(r["messages"], f"r{i}"), "assistant") for i, r in enumerate(rows)]
    train, val = items[:12], items[12:]
    cfg = build_config({"base_model": "x", "data": {"train": "t.jsonl", "max_seq_length": 128, "packing": packing},
                        "train": {"batch_size": 2}})
    scale = run_scale(fast, cfg, train, val)
    sizes = layer_sizes(fast)
    assert sizes == (12, 32, 32, 32, 64)
    assert scale == pytest.approx(step_floor(sizes, recomputed=True) / forward_ceiling(sizes, loss_fraction(val)))
    assert scale == pytest.approx(768 / 352)   # (12 x 32 + 160 + 224) / (4 x 32 + 4 x 32 + 3 x 32): attention's
    losses, forwards = {}, {}
    for name, k in (("old", 1.0), ("new", scale)):
        counting = Counting(model, fast)
        layout = validation_layout(cfg, train, k)
        losses[name] = evaluate_loss(model, val, **layout, pad_id=tok.pad_token_id, device=torch.device("cpu"),
                                     autocast=lambda: torch.autocast("cpu", enabled=False), fast=fast,
                                     step_module=counting)
        forwards[name] = counting.calls
    assert losses["new"] == pytest.approx(losses["old"], rel=1e-6)
    assert forwards["new"] < forwards["old"]
    assert forwards["new"] <= math.ceil(forwards["old"] / 2) + 1   # over twice the tokens a forward


def test_layout_scales_the_budget_and_packed_rows():
    from loraforge.data.templates import Tokenized

    items = [Tokenized(list(range(n)), list(range(n)), f"v{k}") for k, n in enumerate([50, 7, 300, 120])]
    cfg = build_config({"base_model": "x", "data": {"train": "t.jsonl", "max_seq_length": 300},
                        "train": {"batch_size": 4}})
    assert validation_layout(cfg, items) == {"batch_size": 4, "pack_to": None, "max_tokens": 1200}
    assert validation_layout(cfg, items, 2.5) == {"batch_size": 4, "pack_to": None, "max_tokens": 3000}
    cfg.data.packing = True
    assert validation_layout(cfg, items, 2.5)["batch_size"] == 10 and validation_layout(cfg, items)["batch_size"] == 4
    assert validation_layout(cfg, items, 2.5)["pack_to"] == 300
    assert run_scale(None, cfg, items, items) == 1.0   # the PEFT forward: its allocations are not counted


def test_multiplier_of_smollm2_135m():
    """SmolLM2-135M's shape: with the stack recomputed (the 135m-snips run: CUDA graphs) training holds 30 layer
    inputs and one recomputed layer's tensors a token; a forward without grad at most its MLP's peak, or the loss
    where every token carries loss."""
    assert step_floor(SMOL, recomputed=True) == 30 * 576 + 2688 + 5184
    assert forward_ceiling(SMOL, 0.5) == 3 * 576 + 3 * 1536          # 6,336: the MLP's
    assert forward_ceiling(SMOL, 1.0) == 18 * 576                     # the fused loss over every token
    assert step_floor(SMOL, recomputed=True) / forward_ceiling(SMOL, 0.5) == pytest.approx(3.97, abs=0.005)
    assert step_floor(SMOL, recomputed=True) / forward_ceiling(SMOL, 1.0) == pytest.approx(2.43, abs=0.005)
    assert step_floor(SMOL, recomputed=True, offload=True) < forward_ceiling(SMOL, 0.5) * 2   # inputs on the host
    assert step_floor(SMOL, recomputed=False) == 30 * (576 + 2688 + 5184)   # every layer's tensors kept
    assert step_floor(SMOL, recomputed=True, chunked=True) == 30 * 576 + 2688


def test_multiplier_follows_what_training_keeps(deep_model):
    model, _ = peft_model(deep_model)

    def scale(**kw):
        return validation_scale(FastLlama(model, dtype=torch.float32, graphs="off", **kw), 0.3, 64)

    eager, checkpointed = scale(checkpointing=False), scale(checkpointing=True)
    spans, offload = scale(checkpointing=True, checkpoint_every=2), scale(checkpointing="offload")
    assert checkpointed == pytest.approx(768 / 352)
    assert eager == MAX_SCALE > checkpointed > spans > offload >= 1.0
    # CUDA graphs recompute the stack in backward whether checkpointing is on or not
    assert validation_scale(FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="eager"), 0.3, 64) \
        == pytest.approx(checkpointed)
    assert validation_scale(FastLlama(model, dtype=torch.float32, checkpointing=True, sharded=True), 0.3, 64) == 1.0
