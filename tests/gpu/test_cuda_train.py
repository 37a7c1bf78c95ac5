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


def test_readings_hold_the_values_of_their_step():
    """A metrics row's loss and grad norm are copied to the host behind the step that made them (train.interval
    Readings): work queued after the copy, here an in-place change of the same tensors, does not reach them."""
    from loraforge.train.interval import Readings

    loss, norm = torch.full((), 3.5, device="cuda"), torch.full((), 0.25, device="cuda")
    readings = Readings(loss, norm)
    big = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):   # later work on the stream, then the tensors change
        big = big @ big / 2048
    loss.add_(1.0)
    norm.mul_(4.0)
    assert readings.read() == (3.5, 0.25)
    assert float(loss) == 4.5 and float(norm) == 1.0
    assert Readings(torch.tensor(2.0), None).read() == (2.0, None)   # CPU tensors are read as they are
