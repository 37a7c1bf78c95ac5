"""The estimate printed at the start of `loraforge train`: text for a tiny run, a warning with a fix that works for
a run that cannot fit a 12 GB card, the CUDA device name -> card mapping, and the trainer printing it."""

from __future__ import annotations

import re

import pytest

from loraforge.config import build_config, load_config
from loraforge.plan import KNOWN_MODELS, estimate
from loraforge.plan.for_run import estimate_for_run, gpu_from_device
from loraforge.plan.inputs import setup_from_config
from loraforge.plan.shapes import shape_from_config
from loraforge.plan.throughput import tokens_per_second

GIB = 2**30
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 600, "tie_word_embeddings": True, "_name_or_path": "/m/tiny"}
LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "head_dim": 128,
           "_name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "quantization_config": None}
H100 = ("NVIDIA H100 80GB HBM3", 81559 * 2**20)


def test_tiny_run_text_on_a_gpu():
    cfg = build_config({"data": {"max_seq_length": 64}, "train": {"batch_size": 4, "epochs": 2},
                        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    lengths = [20, 30, 40, 90]  # the longest is cut to max_seq_length
    text, fits, _ = estimate_for_run(cfg, TINY, lengths, *H100)
    assert fits
    lines = text.splitlines()
    assert len(lines) == 2 and "warning" not in text
    shape = shape_from_config(TINY, "tiny")
    setup = setup_from_config(cfg, seq=64)  # the peak comes from the longest (truncated) example, batch 4
    mem = estimate(shape, setup)
    assert f"peak memory ~{mem.total:.1f} GiB of 79.6 GiB on NVIDIA H100 80GB HBM3" in lines[0]
    assert "longest example 64 tokens x batch 4" in lines[0]
    shown = float(re.search(r"~([\d,]+) tokens/s", lines[1])[1].replace(",", ""))
    # speed at the average truncated length, round((20 + 30 + 40 + 64) / 4) = 38 tokens, on the H100 (989 TFLOP/s)
    assert shown == pytest.approx(tokens_per_second(gpu_from_device(*H100), shape, setup, 38), abs=1)
    assert shown != pytest.approx(tokens_per_second(gpu_from_device(*H100), shape, setup, 64), abs=1)
    assert f"for {(20 + 30 + 40 + 64) * 2:,} tokens" in lines[1]


def test_cpu_gets_one_line_without_vram_check():
    text, fits, _ = estimate_for_run(build_config({}), TINY, [10, 20], None, None)
    assert fits and len(text.splitlines()) == 1
    assert "training on CPU" in text and " of " not in text


def test_warning_and_a_fix_that_fits_on_a_12gb_card():
    cfg = build_config({"base_model": "meta-llama/Llama-3.1-8B-Instruct", "data": {"max_seq_length": 2048}})
    card = ("NVIDIA GeForce RTX 3060", 12 * GIB)
    text, fits, _ = estimate_for_run(cfg, LLAMA8B, [2048] * 10, *card)
    assert not fits
    assert "[yellow]warning:[/] this run needs ~" in text and "but NVIDIA GeForce RTX 3060 has 12.0 GiB" in text
    fix = re.search(r"cheapest fix: (.*) -> ~([\d.]+) GiB \(add: (.*)\)", text)
    assert fix and "QLoRA" in fix[1] and float(fix[2]) <= 12
    # the overrides it prints make the run fit
    fixed = load_config(None, fix[3].split(), base={"base_model": cfg.base_model,
                                                    "data": {"max_seq_length": 2048}})
    assert fixed.model.quantization == "nf4"
    text2, fits2, _ = estimate_for_run(fixed, LLAMA8B, [2048] * 10, *card)
    assert fits2 and "warning" not in text2


def test_model_plan_cannot_read_is_a_note_not_an_error():
    moe = {**LLAMA8B, "num_local_experts": 8}
    text, fits, _ = estimate_for_run(build_config({}), moe, [10], *H100)
    assert fits and "no memory estimate" in text and "mixture-of-experts" in text


@pytest.mark.parametrize("name, memory_gib, card_tflops", [
    ("NVIDIA H100 80GB HBM3", 79.6, 989.4), ("NVIDIA H100 PCIe", 79.6, 756.0), ("NVIDIA H200", 139.8, 989.4),
    ("NVIDIA A100-SXM4-40GB", 39.4, 312.0), ("NVIDIA GeForce RTX 4090", 23.6, 165.2),
    ("NVIDIA GeForce RTX 4070 Ti", 11.7, 80.2), ("NVIDIA L4", 22.0, 121.0), ("NVIDIA A10G", 22.0, 70.0),
    ("Tesla T4", 14.6, 0.0),
])
def test_cuda_device_names_map_to_cards(name, memory_gib, card_tflops):
    gpu = gpu_from_device(name, int(memory_gib * GIB))
    assert gpu.bf16_tflops == card_tflops
    assert gpu.memory_gib == pytest.approx(memory_gib)
    assert gpu.name == name


def test_train_prints_the_plan(tiny_model, chat_file, tmp_path, capsys):
    from conftest import tiny_config

    from loraforge.train.run import run_training

    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", max_steps=1, epochs=1)
    run_training(build_config(tree))
    err = " ".join(capsys.readouterr().err.split())
    assert "plan: training on CPU; on a GPU this run would need ~" in err


def test_known_shape_matches_config_json():
    assert shape_from_config(LLAMA8B, "x").params == KNOWN_MODELS["Llama-3.1-8B"].params
