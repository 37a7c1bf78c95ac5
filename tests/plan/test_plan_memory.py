"""Memory estimates against hand calculations, monotonicity, and one clear error per impossible value."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loraforge.errors import LoraforgeError
from loraforge.plan import KNOWN_MODELS, TrainSetup, estimate, find_gpu
from loraforge.plan.fit import fits

GIB = 2**30
LLAMA8B = KNOWN_MODELS["Llama-3.1-8B"]
# Llama-3.1-8B by hand: 32 layers of q,o (4096x4096), k,v (4096x1024), gate,up,down (4096x14336).
LINEAR_8B = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
EMBED_NORMS_8B = 2 * 128256 * 4096 + 65 * 4096  # untied embedding + lm_head, 2 norms per layer + final


def test_qlora_weights_by_hand():
    mem = estimate(LLAMA8B, method="qlora", host_embedding="off")
    nf4 = LINEAR_8B * 0.5 + EMBED_NORMS_8B * 2
    absmax = LINEAR_8B * (1 / 64 + 4 / (64 * 256))  # 8-bit absmax per 64 + fp32 per 256 blocks
    assert mem.weights * GIB == pytest.approx(nf4)
    assert mem.quant_constants * GIB == pytest.approx(absmax)
    # ~5.7 GB = 5.3 GiB: 3.5 GB of NF4 linear layers + 2.1 GB of bf16 embedding and lm_head
    assert 5.5e9 < (mem.weights + mem.quant_constants) * GIB < 6.0e9
    # the default (model.host_embedding auto) keeps the 1 GB input table in host memory
    assert estimate(LLAMA8B, method="qlora").weights * GIB == pytest.approx(nf4 - 128256 * 4096 * 2)


def test_qlora_defaults_to_8bit_adam_and_host_embedding_only_where_untied():
    qlora, lora = TrainSetup(method="qlora"), TrainSetup(method="lora")
    assert (qlora.optimizer_name, lora.optimizer_name) == ("adamw_8bit", "adamw")
    assert TrainSetup(method="qlora", optimizer="adamw").optimizer_name == "adamw"
    assert estimate(LLAMA8B, method="qlora").optimizer == pytest.approx(41_943_040 * 2 / GIB)
    assert qlora.host_table(LLAMA8B) and not lora.host_table(LLAMA8B)
    assert TrainSetup(method="lora", host_embedding="on").host_table(LLAMA8B)
    assert not qlora.host_table(KNOWN_MODELS["Llama-3.2-1B"])   # tied: the head needs the table
    fsdp = TrainSetup(method="qlora", gpus=2, strategy="fsdp")
    assert not fsdp.host_table(LLAMA8B) and fsdp.optimizer_name == "adamw"   # bnb's states take no DTensor


def test_lora_bf16_weights_are_about_15_gib():
    mem = estimate(LLAMA8B, method="lora")
    assert mem.weights == pytest.approx((LINEAR_8B + EMBED_NORMS_8B) * 2 / GIB)
    assert 14.8 < mem.weights < 15.2
    assert mem.quant_constants == 0


def test_lora_adapter_params_match_peft():
    # PEFT reports 41,943,040 trainable params for r=16 on all linear layers of Llama-3-8B
    mem = estimate(LLAMA8B, method="lora", rank=16)
    assert mem.trainable_params == 41_943_040
    assert mem.adapters == mem.gradients == pytest.approx(41_943_040 * 4 / GIB)
    assert mem.optimizer == pytest.approx(41_943_040 * 8 / GIB)
    assert estimate(LLAMA8B, method="lora", optimizer="adamw_8bit").optimizer == pytest.approx(41_943_040 * 2 / GIB)


def test_full_finetune_needs_16_bytes_per_param_and_misses_an_h100():
    mem = estimate(LLAMA8B, method="full", batch=1, gradient_checkpointing=True)
    states = (mem.weights + mem.gradients + mem.optimizer) * GIB
    assert states == pytest.approx(16 * LLAMA8B.params)
    assert mem.optimizer > 80
    assert not fits(LLAMA8B, TrainSetup(method="full", batch=1, gradient_checkpointing=True),
                    find_gpu("H100").memory_gib)


def test_logits_and_checkpointed_activations_by_hand():
    mem = estimate(LLAMA8B, method="qlora", batch=1, seq=2048, gradient_checkpointing=True)
    assert mem.logits * GIB == 2048 * 128256 * (2 + 4 + 4)
    layer_inputs = 32 * 2 * 4096 * 2048
    assert layer_inputs < mem.activations * GIB < layer_inputs + mem.activations_without_checkpointing * GIB / 16


def test_qlora_8b_with_checkpointing_fits_a_12_gib_card():
    mem = estimate(LLAMA8B, method="qlora", batch=1, seq=2048, gradient_checkpointing=True)
    assert 8 < mem.total < 12


@pytest.mark.parametrize("field, small, large", [
    ("seq", 512, 4096), ("batch", 1, 8), ("rank", 8, 128), ("method", "qlora", "lora"), ("method", "lora", "full"),
    ("optimizer", "adamw_8bit", "adamw"), ("offload", True, False), ("gradient_checkpointing", True, False),
])
def test_more_costs_more(field, small, large):
    assert estimate(LLAMA8B, **{field: small}).total < estimate(LLAMA8B, **{field: large}).total


def test_checkpointing_reduces_activations_only():
    off, on = estimate(LLAMA8B, gradient_checkpointing=False), estimate(LLAMA8B, gradient_checkpointing=True)
    assert on.activations < off.activations / 10
    assert on.activations == off.activations_with_checkpointing
    assert off.activations == on.activations_without_checkpointing
    assert (on.weights, on.logits, on.optimizer) == (off.weights, off.logits, off.optimizer)


def test_total_is_sum_of_parts():
    mem = estimate(LLAMA8B)
    assert mem.total == pytest.approx(sum(mem.parts().values()))
    assert mem.to_dict()["total"] == mem.total


@pytest.mark.parametrize("changes, message", [
    ({"batch": -1}, "batch must be a whole number of at least 1 \\(got -1\\)"),
    ({"seq": 0}, "seq must be a whole number of at least 1 \\(got 0\\)"),
    ({"grad_accum": 0}, "grad_accum must be"),
    ({"rank": 8192}, "LoRA rank 8192 is larger than Llama-3.1-8B's hidden size 4096"),
    ({"method": "dpo"}, "method must be one of full, lora, qlora"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"targets": ("q_porj",)}, "unknown target module 'q_porj'. Did you mean 'q_proj'"),
    ({"targets": ("",)}, "targets is empty"),
])
def test_impossible_values_raise_one_clear_error(changes, message):
    with pytest.raises(LoraforgeError, match=message):
        estimate(LLAMA8B, **changes)


def test_targets_accept_all_linear_and_subsets():
    qv = estimate(LLAMA8B, targets=("q_proj", "v_proj"), rank=8).trainable_params
    assert qv == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert estimate(LLAMA8B, targets=("all-linear",)).trainable_params == estimate(LLAMA8B).trainable_params


def test_fast_path_by_hand():
    """The trainer's fused path: no logits kept, 0.72 of the plain path's saved activations + one layer's backward."""
    from loraforge.plan.memory import activation_bytes_per_token_layer

    plain = TrainSetup(method="lora", seq=2048, batch=2)
    fast = TrainSetup(method="lora", seq=2048, batch=2, fast_path=True)
    tokens = 2 * 2048
    per_layer = activation_bytes_per_token_layer(LLAMA8B, plain)
    backward = 8 * 14336 * tokens
    mem = estimate(LLAMA8B, fast)
    assert mem.logits * GIB == tokens * 4096 * 10  # hidden states, their copy and gradient: not vocab-sized
    assert mem.activations * GIB == pytest.approx(32 * 0.72 * per_layer * tokens + backward)
    ckpt = estimate(LLAMA8B, fast, gradient_checkpointing=True)
    inputs = 32 * 2 * 4096 * tokens
    assert ckpt.activations * GIB == pytest.approx(inputs + 0.72 * per_layer * tokens + backward)
    offloaded = estimate(LLAMA8B, fast, gradient_checkpointing=True, offload_checkpoints=True)
    assert offloaded.activations * GIB == pytest.approx(0.72 * per_layer * tokens + backward)
    assert mem.weights == estimate(LLAMA8B, plain).weights
    # full fine-tuning never takes the fast path
    assert estimate(LLAMA8B, fast, method="full").logits == estimate(LLAMA8B, plain, method="full").logits


def test_config_decides_the_fast_path():
    from loraforge.config import build_config
    from loraforge.plan.inputs import setup_from_config

    cfg = build_config({"model": {"gradient_checkpointing": "offload"}})
    assert setup_from_config(cfg, LLAMA8B).fast_path and setup_from_config(cfg, LLAMA8B).offload_checkpoints
    assert not setup_from_config(cfg, KNOWN_MODELS["Gemma-2-9B"]).fast_path  # not a fast-path family
    off = build_config({"model": {"fast_path": "off", "gradient_checkpointing": "offload"}})
    assert not setup_from_config(off, LLAMA8B).fast_path
    assert not setup_from_config(off, LLAMA8B).offload_checkpoints  # the plain path keeps inputs on the GPU


LONG = TrainSetup(method="qlora", batch=1, rank=16, lora_dropout=0.0, gradient_checkpointing=True, fast_path=True,
                  offload_checkpoints=True)


def test_plan_chunks_the_mlp_where_the_fast_path_does():
    """The plan's MLP chunk (plan.memory.mlp_chunk) is the code's (model.fast.chunked.chunk_rows) for every setting."""
    from loraforge.model.fast.chunked import chunk_rows
    from loraforge.plan.memory import mlp_chunk

    for setting in ("auto", 0, 4096, 100_000):
        for tokens in (1, 4096, 4097, 16384, 16385, 100_000, 100_001, 524_288):
            assert mlp_chunk(tokens, setting) == chunk_rows(tokens, setting), (setting, tokens)


def test_chunked_mlp_memory_by_hand_and_only_for_long_checkpointed_batches():
    from loraforge.plan.memory import MLP_AUTO_CHUNK

    seq = 131072
    mem = estimate(LLAMA8B, LONG, seq=seq)
    per_token = 2 * (4 * 4096 + 2 * 4096 + 2 * (4096 + 2 * 1024)) + 4 * 4096 + 4 * 32
    assert per_token == 90_240  # 88 KB a token for Llama-3.1-8B's layer in backward (memory.py)
    assert mem.activations * GIB == pytest.approx(per_token * seq + (0.72 * 8 + 8) * 14336 * MLP_AUTO_CHUNK)
    unchunked = estimate(LLAMA8B, LONG, seq=seq, mlp_chunk_tokens=0)
    assert unchunked.activations > 2 * mem.activations
    assert mem.logits == unchunked.logits and mem.weights == unchunked.weights
    for short in (dict(seq=16384), dict(gradient_checkpointing=False), dict(fast_path=False)):
        assert estimate(LLAMA8B, LONG, **short) == estimate(LLAMA8B, LONG, mlp_chunk_tokens=0, **short)


def test_max_seq_with_chunks_is_consistent_and_monotone():
    """The longest sequence that fits: it fits, one token more does not, nothing longer on a grid fits either
    (memory drops where chunking starts: max_seq searches each side), it grows with the card, and chunking
    never lowers it."""
    from loraforge.plan.fit import fits, max_seq

    last = 0
    for card in (8.0, 10.4, 10.8, 11.5, 16.0, 24.0, 40.0, 80.0):
        best = max_seq(LLAMA8B, LONG, card)
        assert best >= last
        last = best
        assert best >= max_seq(LLAMA8B, replace(LONG, mlp_chunk_tokens=0), card)
        if best:
            assert fits(LLAMA8B, replace(LONG, seq=best), card)
        assert not fits(LLAMA8B, replace(LONG, seq=best + 1), card)
        assert not any(fits(LLAMA8B, replace(LONG, seq=s), card) for s in range(best + 1, 1_048_577, 8191))
    assert max_seq(LLAMA8B, LONG, 80.0) > 2 * max_seq(LLAMA8B, replace(LONG, mlp_chunk_tokens=0), 80.0)


def test_checkpoint_spans_keep_fewer_inputs():
    """checkpoint_every = n: one kept input per span of n layers on the GPU, n - 1 rebuilt inside a span's
    backward; with offload only the rebuilt ones."""
    tokens, per_input = 65536, 2 * 4096 * 65536
    base = replace(LONG, seq=tokens, offload_checkpoints=False)
    for n, kept in ((1, 32), (2, 16), (4, 8), (5, 7)):
        got = estimate(LLAMA8B, base, checkpoint_every=n).activations - estimate(LLAMA8B, base).activations
        assert got * GIB == pytest.approx((kept + n - 1 - 32) * per_input), n
        off = estimate(LLAMA8B, LONG, seq=tokens, checkpoint_every=n).activations
        assert off * GIB == pytest.approx(estimate(LLAMA8B, LONG, seq=tokens).activations * GIB + (n - 1) * per_input)
