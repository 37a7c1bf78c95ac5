"""Checkpoints written in the background (train.checkpoint.CheckpointWriter): the files are those a save on
the training thread writes, they hold the state at the moment of the save even when training has moved on
before they are on disk, a failed write reaches the training thread as one clear error, and resuming from
them continues a run as before."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from loraforge.config import LoraSection
from loraforge.errors import LoraforgeError
from loraforge.model.adapters import attach_adapter
from loraforge.model.load import load_base
from loraforge.train.checkpoint import CheckpointWriter, TrainerState, save_checkpoint, verify


@pytest.fixture()
def parts(tiny_model):
    torch.manual_seed(0)
    model, _, _ = load_base(str(tiny_model))
    model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched, params


def _read(ckpt):
    return (load_file(ckpt / "adapter_model.safetensors"), torch.load(ckpt / "optimizer.pt", weights_only=True),
            json.loads((ckpt / "trainer_state.json").read_text()))


def test_background_save_writes_what_a_save_in_place_writes(parts, tmp_path, monkeypatch):
    from loraforge.train import checkpoint

    model, opt, sched, params = parts
    state = TrainerState(step=5, tokens_seen=123)
    torch.manual_seed(7)
    here = save_checkpoint(tmp_path / "a", model, opt, sched, state, "x: 1\n", keep_last=2)
    go, real = threading.Event(), checkpoint._write_checkpoint
    monkeypatch.setattr(checkpoint, "_write_checkpoint", lambda *a: go.wait(30) and real(*a))
    writer = CheckpointWriter()
    torch.manual_seed(7)
    there = save_checkpoint(tmp_path / "b", model, opt, sched, state, "x: 1\n", keep_last=2, writer=writer,
                            background=True)
    with torch.no_grad():   # training goes on before the background write starts: the files must not see it
        for p in params:
            p.add_(1.0)
    opt.state[params[0]]["exp_avg"].add_(5.0)
    torch.rand(3)   # and draws random numbers
    go.set()
    writer.wait()
    assert verify(here) is None and verify(there) is None
    (wa, oa, sa), (wb, ob, sb) = _read(here), _read(there)
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)
    torch.testing.assert_close(ob["state"][0]["exp_avg"], oa["state"][0]["exp_avg"], rtol=0, atol=0)
    assert sa == sb and sb["step"] == 5 and sb["tokens_seen"] == 123
    xa, xb = (torch.load(c / "state.pt", weights_only=False) for c in (here, there))
    assert xa["scheduler"] == xb["scheduler"]
    torch.testing.assert_close(xb["rng"]["torch"], xa["rng"]["torch"], rtol=0, atol=0)


def test_background_saves_keep_order_and_prune(parts, tmp_path):
    """keep_last=2 prunes in order; the best step (protect_step, as it was at its save) is never pruned."""
    model, opt, sched, _ = parts
    writer = CheckpointWriter()
    for step in (3, 6, 9, 12):
        save_checkpoint(tmp_path, model, opt, sched, TrainerState(step=step, protect_step=3 if step < 12 else 6),
                        "x: 1\n", keep_last=2, writer=writer, background=True)
    writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006", "step-00000009", "step-00000012"]


def test_a_failed_background_write_is_raised_on_the_training_thread(parts, tmp_path):
    model, opt, sched, _ = parts
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the folder should be")
    writer = CheckpointWriter()
    save_checkpoint(blocker, model, opt, sched, TrainerState(step=1), "x: 1\n", keep_last=2, writer=writer,
                    background=True)
    with pytest.raises(LoraforgeError, match="a checkpoint could not be written"):
        writer.wait()
    writer.wait()   # reported once
