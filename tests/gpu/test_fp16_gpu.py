"""On a CUDA device: train.precision=fp16 (autocast + loss scaling, what GPUs without bf16 run) follows the
bf16 loss curve of the same run, on the fast Llama path and on PEFT's forward."""

import json

import pytest
import torch

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.train.run import run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _curve(tiny_model, chat_file, out, precision, fast_path):
    tree = tiny_config(tiny_model, chat_file, out, epochs=4, learning_rate=1e-2, precision=precision,
                       eval_every=1000)
    tree["model"] = {"dtype": "float32", "fast_path": fast_path}
    res = run_training(build_config(tree))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return res, [r["loss"] for r in rows]


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_fp16_follows_bf16(tiny_model, chat_file, tmp_path, fast_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16 for the reference curve")
    res16, fp16 = _curve(tiny_model, chat_file, tmp_path / "fp16", "fp16", fast_path)
    _, bf16 = _curve(tiny_model, chat_file, tmp_path / "bf16", "bf16", fast_path)
    assert res16.summary["precision"] == "fp16" and res16.summary["compute_dtype"] == "float16"
    assert len(fp16) == len(bf16) and all(x == x for x in fp16)
    assert fp16[-1] < 0.6 * fp16[0]  # it learns
    # the scaler may skip a first step or two while the scale backs off: compare the curves after that
    diffs = [abs(a - b) / max(b, 1e-3) for a, b in zip(fp16[5:], bf16[5:])]
    assert sum(diffs) / len(diffs) < 0.1 and fp16[-1] == pytest.approx(bf16[-1], rel=0.15)


def test_fp16_run_stores_the_base_in_fp16_and_trains_fp32_adapters(tiny_model, chat_file, tmp_path):
    """What a T4/V100 runs: fp16 compute, the frozen base stored in fp16 (model.dtype auto), LoRA weights
    in fp32 (the scaler refuses to unscale fp16 gradients)."""
    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=4, learning_rate=1e-2, precision="fp16")
    res = run_training(build_config(tree))
    frozen = {p.dtype for p in res.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in res.model.parameters() if p.requires_grad}
    assert frozen == {torch.float16} and trained == {torch.float32}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows) and rows[-1]["loss"] < 0.6 * rows[0]["loss"]
