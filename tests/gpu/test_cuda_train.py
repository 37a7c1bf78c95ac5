"""On a CUDA device: the same training path in bf16; the loss-token head matches the plain forward."""

import pytest
import torch

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.train.run import run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_bf16_run_learns(tiny_model, chat_file, tmp_path):
    cfg = build_config(tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=4, learning_rate=1e-2,
                                   precision="auto"))
    res = run_training(cfg)
    assert res.summary["device"] == "cuda" and res.summary["precision"] == "bf16"
    assert next(res.model.parameters()).device.type == "cuda"
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
