"""FLOPs per token, tokens/s, wall time, cost, and the fit search with its suggestions."""

from __future__ import annotations

import pytest

from loraforge.plan import GPUS, KNOWN_MODELS, DataSize, TrainSetup, estimate, find_gpu, flops_per_token, suggest
from loraforge.plan.fit import fits, max_batch, max_seq
from loraforge.plan.throughput import MFU, optimizer_steps, tokens_per_second, total_tokens, train_seconds

LLAMA8B = KNOWN_MODELS["Llama-3.1-8B"]
N = LLAMA8B.linear_params + LLAMA8B.vocab * LLAMA8B.hidden  # weights that do matmuls (lm_head included)


@pytest.mark.parametrize("setup, per_param", [
    (TrainSetup(method="full"), 6), (TrainSetup(method="full", gradient_checkpointing=True), 8),
    (TrainSetup(method="lora"), 4), (TrainSetup(method="lora", gradient_checkpointing=True), 6),
])
def test_flops_per_token_follow_the_6n_rule(setup, per_param):
    # a short context keeps the attention term small: within 2% of per_param * N
    assert flops_per_token(LLAMA8B, setup, context=64) == pytest.approx(per_param * N, rel=0.02)


def test_attention_term_grows_with_context():
    setup = TrainSetup()
    assert flops_per_token(LLAMA8B, setup, 8192) > flops_per_token(LLAMA8B, setup, 512)


def test_tokens_per_second_and_time_by_hand():
    h100, setup = find_gpu("H100"), TrainSetup(method="lora", batch=1)
    data = DataSize(examples=1000, epochs=2, avg_tokens=500)
    speed = tokens_per_second(h100, LLAMA8B, setup, 500, calibration={})  # the uncalibrated MFU model
    assert speed == pytest.approx(989.4e12 * MFU / flops_per_token(LLAMA8B, setup, 500))
    # train_seconds uses the committed calibration when there is one: the same speed as tokens_per_second's default
    assert train_seconds(h100, LLAMA8B, setup, data) == pytest.approx(
        1000 * 2 * 500 / tokens_per_second(h100, LLAMA8B, setup, 500))
    assert tokens_per_second(find_gpu("3060"), LLAMA8B, setup, 500, calibration={}) < speed
    assert tokens_per_second(h100, LLAMA8B, TrainSetup(method="qlora", batch=1), 500, calibration={}) < speed


def test_padding_truncation_packing_and_steps():
    data = DataSize(examples=1000, epochs=1, avg_tokens=4000)
    assert total_tokens(TrainSetup(seq=2048, batch=1), data) == 1000 * 2048  # truncated
    padded = total_tokens(TrainSetup(seq=8192, batch=4), data)
    packed = total_tokens(TrainSetup(seq=8192, batch=4, packing=True), data)
    assert packed == 1000 * 4000 < padded
    assert optimizer_steps(TrainSetup(batch=2, grad_accum=8), DataSize(examples=1000, epochs=3)) == 3 * 63
    assert optimizer_steps(TrainSetup(seq=2048, batch=1, grad_accum=1, packing=True),
                           DataSize(examples=1000, epochs=1, avg_tokens=512)) == 250


@pytest.mark.parametrize("gpu", [g.name for g in GPUS])
def test_max_batch_and_seq_are_the_largest_that_fit(gpu):
    memory, setup = find_gpu(gpu).memory_gib, TrainSetup(method="qlora", gradient_checkpointing=True)
    b = max_batch(LLAMA8B, setup, memory)
    if b:
        assert fits(LLAMA8B, TrainSetup(method="qlora", gradient_checkpointing=True, batch=b), memory)
    assert not fits(LLAMA8B, TrainSetup(method="qlora", gradient_checkpointing=True, batch=b + 1), memory)
    s = max_seq(LLAMA8B, setup, memory)
    assert s == 0 or estimate(LLAMA8B, setup, seq=s).total <= memory < estimate(LLAMA8B, setup, seq=s + 1).total


def test_suggestions_fit_and_are_ranked_cheapest_first():
    memory = find_gpu("RTX 3060").memory_gib
    setup = TrainSetup(method="lora", batch=2, seq=2048)
    found = suggest(LLAMA8B, setup, memory)
    assert found and all(s.total_gib <= memory for s in found)
    assert all(fits(LLAMA8B, s.setup, memory) for s in found)
    assert [s.penalty for s in found] == sorted(s.penalty for s in found)
    assert any("QLoRA" in change for change in found[0].changes)
    pure = [set(s.changes) for s in found if not any(c.startswith("seq ") for c in s.changes)]
    assert not any(a < b for a in pure for b in pure)  # minimal: no suggestion contains another


def test_checkpointing_is_the_first_fix_when_it_suffices():
    found = suggest(LLAMA8B, TrainSetup(method="qlora", batch=1), find_gpu("RTX 3060").memory_gib)
    assert found[0].changes == ("gradient checkpointing on",)


def test_no_suggestions_when_it_fits():
    assert suggest(KNOWN_MODELS["SmolLM2-135M"], TrainSetup(), find_gpu("H100").memory_gib) == []
