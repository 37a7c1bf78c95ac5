"""FSDP2 with the fast Llama path, on CPU with gloo: every decoder layer (and an untied head) runs the fast
code through the method FastLlama.attach_fsdp registers with FSDP2, so two processes holding half the
weights each follow the one-process curve of the same fast path: bf16-style grouped projections with
recomputation, and an NF4 base (its packed bytes sharded)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import assert_same_curve, chat_rows, make_tiny_model, metrics_rows, tiny_config, write_jsonl
from loraforge.config import build_config
from loraforge.train.run import run_training

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def _tree(model, data, out, lora: dict, checkpointing: bool, dtype: str = "auto", **train):
    t = tiny_config(model, data, out, grad_accum=3, lr_scheduler="constant", warmup_ratio=0.0, num_threads=1,
                    device="cpu", dist_timeout_s=60, eval_every=2, save_every=100, max_steps=4, **train)
    t["lora"].update(lora)
    t["model"] = {"fast_path": "on", "gradient_checkpointing": checkpointing, "dtype": dtype}
    return t


@pytest.mark.parametrize("lora,checkpointing,dtype,rel", [
    ({"dropout": 0.0}, True, "float32", 1e-5),      # q/k/v and gate/up as grouped projections, recomputed
    ({"dropout": 0.1, "adapter": "dora"}, False, "float32", 1e-5),  # one projection at a time, DoRA, no recompute
    # a bf16 base under fp32 LoRA weights: FSDP2 computes the layers in bf16 and reduces in fp32, while the
    # frozen embedding and head (used over their shards, never gathered) get no reduce dtype
    ({"dropout": 0.0}, True, "bfloat16", 1e-2),
], ids=["grouped-recompute", "dora-dropout", "bf16-base"])
def test_fsdp2_runs_the_fast_path_and_follows_its_one_process_curve(tmp_path, lora, checkpointing, dtype, rel):
    untied = make_tiny_model(tmp_path / "untied", tied=False)   # the head is an FSDP2 group of its own
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    one = run_training(build_config(_tree(untied, data, tmp_path / "one", lora, checkpointing, dtype)))
    assert one.summary["fast_path"] is True and one.summary["compute_dtype"] == dtype
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(_tree(untied, data, tmp_path / "two", lora, checkpointing, dtype,
                                        distributed="fsdp")))
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", "2"], env=ENV,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "(fast Llama path, embedding and head over their FSDP2 shards)" in res.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["fast_path"] is True and two["compute_dtype"] == dtype
    ref = metrics_rows(tmp_path / "one")
    assert len(ref) == 4 and ref[-1]["loss"] < ref[0]["loss"]
    assert_same_curve(metrics_rows(tmp_path / "two"), ref, rel=rel)


def test_fsdp2_over_an_nf4_base_loaded_from_a_folder(tmp_path):
    """The user's path: `loraforge train --gpus 2` with FSDP2 and quantization nf4 on a model folder. The
    base is quantised one linear at a time into CPU memory (model.load.load_base store_on), the same NF4
    bytes as quantising the loaded 16-bit model, then sharded; the run learns on the fast path."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.model.load import load_base
    from loraforge.model.quant import quantize_linears_

    untied = make_tiny_model(tmp_path / "untied", tied=False)
    model, _, _ = load_base(str(untied), quantization="nf4", device="cpu", store_on="cpu")
    ref = AutoModelForCausalLM.from_pretrained(untied, dtype=torch.bfloat16)
    assert quantize_linears_(ref, "cpu") == 14
    got = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    want = {n: m for n, m in ref.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(got) == set(want) and len(got) == 14 and model.is_loaded_in_4bit
    for n in got:
        assert torch.equal(got[n].weight.data.view(torch.uint8), want[n].weight.data.view(torch.uint8)), n
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    tree = _tree(untied, data, tmp_path / "two", {"dropout": 0.0}, True, distributed="fsdp")
    tree["model"]["quantization"] = "nf4"
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", "2"], env=ENV,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "over an NF4 base on cpu (fast Llama path, embedding and head over their FSDP2 shards)" in res.stderr
    rows = metrics_rows(tmp_path / "two")
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
