"""Several GPUs: DDP replicates (and double-buffers gradients), FSDP divides weights and states; speed, steps and
cost scale with the GPU count. Numbers by hand for Llama-3.1-8B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.plan import KNOWN_MODELS, DataSize, TrainSetup, estimate, find_gpu, plan_run, suggest
from loraforge.plan.inputs import PlanInputs
from loraforge.plan.throughput import MULTI_GPU_EFFICIENCY, optimizer_steps, tokens_per_second

GIB = 2**30
LLAMA8B = KNOWN_MODELS["Llama-3.1-8B"]
MULTI_GPU = Path(__file__).resolve().parents[2] / "bench" / "results" / "multi_gpu" / "qlora_8b_2xh200.json"
LINEAR_8B = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
LAYER_8B = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # 218,103,808 weights in one decoder layer
EMBED_NORMS_8B = 2 * 128256 * 4096 + 65 * 4096
GATHERED_EDGE_8B = 128256 * 4096 + 65 * 4096   # untied: the embedding or the head gathered (+ norms), not both
LORA_8B = 41_943_040  # r=16 on all linear layers
STAGING_8B = 128256 * 4096 * 2  # FSDP2's all-gather staging copy of the largest group (the bf16 head)


def test_fsdp_divides_weights_and_states_by_hand():
    one = estimate(LLAMA8B, method="lora", seq=1024, batch=1)
    four = estimate(LLAMA8B, method="lora", seq=1024, batch=1, gpus=4, strategy="fsdp")
    # 1/4 of every weight, + 2 decoder layers all-gathered, + the embedding or the head gathered (each its own
    # group: Llama-3.1-8B's are untied) and the norms, + the staging copy of the largest gathered group
    weights = (LINEAR_8B * 2 + EMBED_NORMS_8B * 2) / 4 + 2 * LAYER_8B * 2 + GATHERED_EDGE_8B * 2 * 3 / 4 + STAGING_8B
    assert four.weights * GIB == pytest.approx(weights)
    assert 6.0 < four.weights < 7.0 < 14.8 < one.weights
    assert four.adapters * GIB == pytest.approx(LORA_8B * 4 / 4)
    assert four.gradients * GIB == pytest.approx(LORA_8B * 4 / 4)
    assert four.optimizer * GIB == pytest.approx(LORA_8B * 8 / 4)
    # batch is per GPU: activations and logits do not change
    assert (four.activations, four.logits) == (one.activations, one.logits)


def test_qlora_fsdp_shards_nf4_weights_and_replicates_constants():
    four = estimate(LLAMA8B, method="qlora", gpus=4, strategy="fsdp")
    weights = (LINEAR_8B * 0.5 + EMBED_NORMS_8B * 2) / 4 + 2 * LAYER_8B * 0.5 + GATHERED_EDGE_8B * 2 * 3 / 4 \
        + STAGING_8B
    assert four.weights * GIB == pytest.approx(weights)
    # every rank keeps every QuantState (model.shard_nf4): the constants are not divided
    assert four.quant_constants * GIB == pytest.approx(LINEAR_8B * (1 / 64 + 4 / (64 * 256)))


def test_fsdp_fast_path_never_gathers_an_untied_embedding_or_head():
    four = estimate(LLAMA8B, method="qlora", gpus=4, strategy="fsdp", fast_path=True)
    # 1/4 of everything, 2 gathered layers, the norms, and the staging copy of the largest group: a layer
    weights = (LINEAR_8B * 0.5 + EMBED_NORMS_8B * 2) / 4 + 2 * LAYER_8B * 0.5 + 65 * 4096 * 2 * 3 / 4 \
        + LAYER_8B * 0.5
    assert four.weights * GIB == pytest.approx(weights)
    assert four.weights < estimate(LLAMA8B, method="qlora", gpus=4, strategy="fsdp").weights - 1.5


def test_ddp_replicates_and_keeps_a_bucket_copy_of_gradients():
    one = estimate(LLAMA8B, method="lora")
    two = estimate(LLAMA8B, method="lora", gpus=2, strategy="ddp")
    assert (two.weights, two.adapters, two.optimizer, two.activations) == (one.weights, one.adapters,
                                                                           one.optimizer, one.activations)
    assert two.gradients * GIB == pytest.approx(2 * LORA_8B * 4)
    # one GPU: the strategy changes nothing
    assert estimate(LLAMA8B, method="lora", strategy="fsdp").total == pytest.approx(one.total)


def test_full_finetune_of_8b_fits_four_h100s_only_with_fsdp():
    h100 = find_gpu("H100").memory_gib
    setup = TrainSetup(method="full", batch=1, seq=2048, gradient_checkpointing=True, gpus=4)
    assert estimate(LLAMA8B, setup).total > h100
    fsdp = estimate(LLAMA8B, setup, strategy="fsdp")
    assert fsdp.total < h100
    # 16 bytes per parameter of states, sharded 4 ways (plus 2 gathered layers and the root in bf16)
    states = (fsdp.gradients + fsdp.optimizer) * GIB
    assert states == pytest.approx(LLAMA8B.params * (2 + 4 + 8) / 4)
    found = suggest(LLAMA8B, setup, h100)
    assert found[0].changes == ("FSDP (shard weights and states over the 4 GPUs)",)


def test_speed_steps_and_cost_scale_with_gpus():
    h100 = find_gpu("H100")
    one, four = TrainSetup(method="lora", batch=2), TrainSetup(method="lora", batch=2, gpus=4)
    single = tokens_per_second(h100, LLAMA8B, one, 512, calibration={})
    assert tokens_per_second(h100, LLAMA8B, four, 512, calibration={}) == pytest.approx(
        4 * MULTI_GPU_EFFICIENCY * single)
    data = DataSize(examples=1000, epochs=1, avg_tokens=512)
    assert optimizer_steps(one, data) == 63  # ceil(1000 / (2 x 8))
    # grad_accum counts micro-batches per step over all GPUs (the trainer deals them out round-robin),
    # so the step count does not depend on the GPU count; the time does
    assert optimizer_steps(four, data) == 63
    report = plan_run(PlanInputs(LLAMA8B, four, data))
    row = next(r for r in report.rows if r.gpu == "H100 80GB")
    speed = tokens_per_second(h100, LLAMA8B, four, 512)
    assert row.hours == pytest.approx(report.total_tokens / speed / 3600)
    assert row.usd_per_hour == pytest.approx(4 * 2.50)
    assert row.cost_usd == pytest.approx(row.hours * 4 * 2.50)


def test_cli_gpus_and_strategy(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--method", "qlora", "--gpus", "4", "--strategy", "fsdp",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"]["gpus"] == 4 and plan["setup"]["strategy"] == "fsdp"
    single = estimate(KNOWN_MODELS["Llama-3.1-70B"], method="qlora")
    assert plan["memory_gib"]["weights"] < single.weights / 2
    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "2"]) == 0
    assert "2 x H100 80GB" in capsys.readouterr().out


@pytest.mark.parametrize("changes, message", [
    ({"gpus": 0}, "gpus must be a whole number of at least 1 \\(got 0\\)"),
    ({"strategy": "zero3"}, "strategy must be one of ddp, fsdp \\(got 'zero3'\\)"),
])
def test_bad_sharding_values(changes, message):
    with pytest.raises(LoraforgeError, match=message):
        estimate(LLAMA8B, **changes)


@pytest.mark.parametrize("result,model", [("qlora_8b_2xh200.json", "Llama-3.1-8B"),
                                          ("qlora_70b_2xh200.json", "Llama-3.1-70B")])
def test_fsdp_plans_the_fast_path_and_matches_the_measured_peaks(result, model):
    """FSDP2 runs the fast path too (FastLlama.attach_fsdp), which never gathers an untied embedding or head
    (model.fast.vocab_parallel). The plan of the 2 x H200 benchmark's cases is within 5% of their measured
    peak allocated memory (the plan less the CUDA context and slack, which torch.cuda.max_memory_allocated
    does not count)."""
    ddp = estimate(LLAMA8B, method="qlora", seq=2048, batch=2, gpus=2, strategy="ddp", fast_path=True)
    fsdp = estimate(LLAMA8B, method="qlora", seq=2048, batch=2, gpus=2, strategy="fsdp", fast_path=True)
    assert TrainSetup(method="qlora", gpus=2, strategy="fsdp", fast_path=True).fast
    assert fsdp.logits == ddp.logits  # the fused loss on both
    assert fsdp.quant_constants == ddp.quant_constants  # NF4 constants are replicated, not sharded
    report = json.loads((MULTI_GPU.parent / result).read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert report["base"].startswith("nf4") and report["gradient_checkpointing"] == "offload"
    assert all(c["fast_path"] and c["nf4_bytes_kept"] for c in cases.values())
    for case, gpus, strategy in (("ddp-1", 1, "ddp"), ("fsdp-2", 2, "fsdp")):
        plan = estimate(KNOWN_MODELS[model], method="qlora", seq=2048, batch=2, gpus=gpus, strategy=strategy,
                        fast_path=True, gradient_checkpointing=True, offload_checkpoints=True, lora_dropout=0.0,
                        rank=16, optimizer="adamw", host_embedding="off")   # as those runs trained
        measured = max(cases[case]["peak_gib_per_gpu"])
        assert plan.total - plan.overhead == pytest.approx(measured, rel=0.05), case