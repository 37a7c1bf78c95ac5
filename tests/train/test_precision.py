"""train.precision does what it says: fp16 autocasts to float16 with loss scaling (an overflowing step is
skipped and the scale backs off, clipping sees true gradients), auto picks fp16 on a GPU without bf16, and
a run in fp16 trains, saves its scaler state with its checkpoints and resumes from it."""

import json

import pytest
import torch

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.errors import LoraforgeError
from loraforge.train import precision as P
from loraforge.train.run import run_training


@pytest.mark.parametrize("bf16,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert P.pick_precision("auto", "cuda") == expected
    assert P.pick_precision("fp16", "cuda") == "fp16"


def test_auto_on_cpu_never_fp16(monkeypatch):
    monkeypatch.setattr(P, "has_bf16", lambda device: False)
    assert P.pick_precision("auto", "cpu") == "fp32"
    with pytest.raises(LoraforgeError, match="no bf16 support"):
        P.pick_precision("bf16", "cpu")


def test_fp16_scales_unscales_and_skips_overflow():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8) * 1e-3  # small enough that 65536 x the gradient fits fp16
    ref = torch.nn.Parameter(w.detach().clone())
    (ref @ x.T).pow(2).mean().backward()

    prec = P.Precision("fp16", "cpu")
    assert prec.dtype is torch.float16 and prec.scaler is not None
    opt = torch.optim.SGD([w], lr=0.1)
    with prec.autocast():
        y = w @ x.T
    assert y.dtype is torch.float16
    prec.backward(y.float().pow(2).mean())
    assert w.grad.abs().max() > ref.grad.abs().max() * 1000  # scaled up (by 65536)
    prec.unscale(opt)  # what clipping sees: the true gradient
    assert torch.allclose(w.grad, ref.grad, rtol=1e-2, atol=3e-3)
    before, scale = w.detach().clone(), prec.scaler.get_scale()
    assert prec.step(opt) is True and not torch.equal(w, before)
    assert prec.scaler.get_scale() == scale

    opt.zero_grad()
    prec.backward((w * float("inf")).sum())  # an overflow: the step is skipped, the scale halves
    before = w.detach().clone()
    assert prec.step(opt) is False and torch.equal(w, before)
    assert prec.scaler.get_scale() == scale / 2


def test_fp32_and_bf16_have_no_scaler():
    assert P.Precision("fp32", "cpu").scaler is None and P.Precision("fp32", "cpu").dtype is None
    assert P.Precision("bf16", "cpu").dtype is torch.bfloat16 and P.Precision("bf16", "cpu").scaler is None


def test_fp16_run_trains_and_resumes(tiny_model, chat_file, tmp_path):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", precision="fp16", max_steps=10, save_every=5,
                       keep_last=2, num_threads=1, eval_every=100)
    res = run_training(build_config(tree))
    assert res.summary["precision"] == "fp16" and res.summary["compute_dtype"] == "float16"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert all(loss == loss for loss in losses) and min(losses[-3:]) < losses[0] - 0.5
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0

    (tmp_path / "run" / "summary.json").unlink()
    (tmp_path / "run" / "checkpoints" / "step-00000010").rename(tmp_path / "run" / "gone")
    again = run_training(build_config(tree), resume=True)  # from step 5, the scaler's state restored
    assert again.summary["final_train_loss"] == pytest.approx(res.summary["final_train_loss"], rel=1e-4)
