"""The plan by objective: pairs double a step's rows, GRPO's peak is the larger of generation and training, the
reference forward is a phase of its own, the CLI and configs carry the objective, and the train-time estimate."""

from __future__ import annotations

import json
import re

import pytest

from loraforge.cli import main
from loraforge.config import build_config
from loraforge.plan import DataSize, TrainSetup, estimate, resolve_shape
from loraforge.plan.for_run import estimate_for_run
from loraforge.plan.gpus import find_gpu
from loraforge.plan.memory import GIB
from loraforge.plan.objective import decode_seconds, objective_seconds, run_rows, training_tokens
from loraforge.plan.throughput import train_seconds

LLAMA8B = resolve_shape("llama-3.1-8b")
FAST = {"method": "qlora", "fast_path": True, "gradient_checkpointing": True}


@pytest.mark.parametrize("path", [{}, FAST, {**FAST, "offload_checkpoints": True}])
def test_pairs_hold_twice_the_activations_of_sft(path):
    sft = estimate(LLAMA8B, seq=1024, batch=2, **path)
    for objective in ("orpo", "simpo", "dpo"):
        pair = estimate(LLAMA8B, seq=1024, batch=2, objective=objective, reference=False, **path)
        assert pair.phase == "training"
        assert pair.activations == pytest.approx(2 * sft.activations, rel=1e-9)
        assert pair.logits == pytest.approx(2 * sft.logits, rel=1e-9)
        assert pair.weights == sft.weights and pair.optimizer == sft.optimizer
    kto = estimate(LLAMA8B, seq=1024, batch=2, objective="kto", reference=False, **path)
    assert kto.total == pytest.approx(sft.total, rel=1e-9)  # unpaired: one row per example


def test_dpo_reference_is_a_phase_with_loss_position_logits():
    dpo = estimate(LLAMA8B, seq=1024, batch=1, objective="dpo", **FAST)
    orpo = estimate(LLAMA8B, seq=1024, batch=1, objective="orpo", **FAST)
    assert set(dpo.phases) == {"training", "reference"} and set(orpo.phases) == {"training"}
    assert dpo.phases["training"] == pytest.approx(orpo.total, rel=1e-9)
    # PEFT's forward with the adapter off: the head's logits at every (loss) token of both sides, bf16 + 2 x fp32
    assert dpo.phase == "reference"
    assert dpo.logits == pytest.approx(2 * 1024 * 128256 * 10 / GIB, rel=1e-9)
    assert dpo.weights == orpo.weights and dpo.kv_cache == 0


def _grpo(generations: int, completion: int, seq: int, model: str = "qwen3-0.6b", **kw):
    return estimate(resolve_shape(model), objective="grpo", generations=generations, completion=completion,
                    seq=seq, batch=2, offload_checkpoints=True, **FAST, **kw)


def test_grpo_peak_is_generation_for_long_completions_times_a_large_group():
    long = _grpo(16, 3968, 4096)
    shape = resolve_shape("qwen3-0.6b")
    kv = 2 * 16 * 4096 * shape.kv_dim * 4 * (shape.layers + 1)  # k and v in bf16, one layer's growth copy
    assert long.phase == "generation" and long.total == pytest.approx(long.phases["generation"])
    assert long.kv_cache == pytest.approx(kv / GIB, rel=1e-9)
    assert long.phases["generation"] > long.phases["training"]
    short = _grpo(2, 32, 160, "llama-3.1-8b")  # GQA: a small cache per token
    assert short.phase == "training" and short.kv_cache == 0
    assert short.phases["training"] > short.phases["generation"]
    assert _grpo(16, 3968, 4096, reference=True).phases["reference"] > 0
    plain = estimate(LLAMA8B, objective="grpo", generations=4, completion=256, seq=1024, batch=1)
    assert plain.logits == pytest.approx(4 * 256 * 128256 * 10 / GIB, rel=1e-9)  # the head at completions only


def test_objective_times():
    gpu, data = find_gpu("h100"), DataSize(examples=1000, epochs=2, avg_tokens=300)
    sft = TrainSetup(**FAST)
    assert objective_seconds(gpu, LLAMA8B, sft, data) == pytest.approx(train_seconds(gpu, LLAMA8B, sft, data))
    orpo = TrainSetup(objective="orpo", **FAST)
    assert training_tokens(orpo, data) == pytest.approx(2 * training_tokens(sft, data))
    dpo = TrainSetup(objective="dpo", **FAST)
    # the cached reference adds one no-grad forward per example: a third of a checkpointed LoRA step's FLOPs,
    # over one of the two epochs
    extra = objective_seconds(gpu, LLAMA8B, dpo, data) / objective_seconds(gpu, LLAMA8B, orpo, data)
    assert extra == pytest.approx(1 + 1 / 3 / 2, rel=1e-9)
    assert objective_seconds(gpu, LLAMA8B, dpo, data, live=True) > objective_seconds(gpu, LLAMA8B, dpo, data)
    grpo = TrainSetup(objective="grpo", generations=8, completion=512, seq=1024, **FAST)
    assert training_tokens(grpo, data) == pytest.approx(1000 * 2 * 8 * 812 * 1.25)  # rows padded (batch 2)
    assert decode_seconds(gpu, LLAMA8B, grpo, data) > 0
    assert objective_seconds(gpu, LLAMA8B, grpo, data) > decode_seconds(gpu, LLAMA8B, grpo, data)


def test_cli_prints_the_objective_and_its_peak_phase(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--method", "qlora", "--objective", "grpo", "--num-generations",
                 "8", "--completion-length", "1024", "--prompt-length", "256", "--batch", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "objective grpo: G=8 completions of up to 1024 tokens per prompt after 256 prompt tokens" in out
    assert re.search(r"peak in the (training|generation) phase \(GiB: training [\d.]+, generation [\d.]+\)", out)
    assert "GRPO's time is a rough guess" in out
    assert main(["plan", "--model", "llama-3.1-8b", "--objective", "dpo", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"]["objective"] == "dpo" and plan["memory_gib"]["phase"] in plan["memory_gib"]["phases"]


@pytest.mark.parametrize("args, message", [
    (["--objective", "ppo"], "objective must be one of sft, dpo, orpo, simpo, kto, grpo (got 'ppo')"),
    (["--objective", "grpo", "--seq", "256"], "--seq 256 leaves no room for a prompt before a completion of 256"),
    (["--objective", "dpo", "--prompt-length", "100"], "--prompt-length is for objective grpo"),
    (["--objective", "orpo", "--reference"], "objective orpo has no reference model"),
    (["--objective", "grpo", "--num-generations", "0"], "generations must be a whole number of at least 1"),
])
def test_bad_objective_input_is_one_clear_error(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_config_with_objective_grpo_gives_the_grpo_plan(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("""
base_model: Qwen/Qwen3-0.6B
objective: grpo
data: {max_seq_length: 1536}
grpo: {group_size: 4, max_new_tokens: 1024, kl_beta: 0.04}
train: {batch_size: 2}
""")
    assert main(["plan", str(config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    setup, memory = plan["setup"], plan["memory_gib"]
    assert (setup["objective"], setup["generations"], setup["completion"], setup["seq"], setup["reference"]) == \
        ("grpo", 4, 1024, 1536, True)
    assert set(memory["phases"]) == {"training", "generation", "reference"}
    assert memory["total"] == pytest.approx(max(memory["phases"].values()))
    assert main(["plan", str(config), "--json", "--num-generations", "16"]) == 0
    bigger = json.loads(capsys.readouterr().out)["memory_gib"]["phases"]
    assert bigger["generation"] > memory["phases"]["generation"]
    assert main(["plan", str(config), "--json", "--objective", "dpo"]) == 0  # the config's KL is grpo's only
    dpo = json.loads(capsys.readouterr().out)
    assert dpo["setup"]["reference"] is None and set(dpo["memory_gib"]["phases"]) == {"training", "reference"}


def test_train_estimate_by_objective():
    assert run_rows("dpo", [300, 5000], 2048, 256) == [150, 2048]  # both sides' count, halved, capped
    assert run_rows("grpo", [100, 1900], 2048, 256) == [356, 2048]
    assert run_rows("kto", [100, 5000], 2048, 256) == [100, 2048]
    llama = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
             "_name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}
    h100 = ("NVIDIA H100 80GB HBM3", 81559 * 2**20)
    cfg = build_config({"objective": "grpo", "grpo": {"group_size": 8, "max_new_tokens": 512},
                        "model": {"quantization": "nf4"}, "data": {"max_seq_length": 1024}})
    text, fits, speed = estimate_for_run(cfg, llama, [200, 300, 400], *h100)
    flat = " ".join(text.split())
    assert "grpo's" in flat and "phase (longest row 912 tokens x batch" in flat
    assert "grpo: 8 rows per example" in flat and "decoding (a rough guess)" in flat and speed is None
    dpo = build_config({"objective": "dpo", "model": {"quantization": "nf4"}})
    text, _, speed = estimate_for_run(dpo, llama, [800, 1200], *h100)
    flat = " ".join(text.split())
    assert re.search(r"dpo's (training|reference) phase \(longest row 600 tokens", flat) and speed > 0
    assert re.search(r"-> ~\d+ s for 0.01M training tokens$", flat)  # 2 pairs x 2 sides x 500 x 3 epochs
