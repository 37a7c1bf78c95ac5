"""Validation by the task's metric during training (train.selection): early stopping after the patience,
adapter/ = the best step's weights (read back), the best checkpoint kept through keep_last pruning."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import metrics_rows, tiny_config

from loraforge.config import build_config
from loraforge.errors import LoraforgeError
from loraforge.train.run import run_training
from loraforge.train.selection import TaskTools


def scripted(values: list[float], seen: list | None = None) -> TaskTools:
    """Tools whose metric returns `values` one validation after another (the generation is real: it runs
    on the tiny model, so the hook's generation path is exercised)."""
    it = iter(values)

    def generate(model, tok, convs, n):
        return [SimpleNamespace(text="x", stopped=True) for _ in convs]

    def score(answers, refs):
        if seen is not None:
            seen.append(len(answers))
        return next(it)

    return TaskTools(generate=generate, score=score, metric="scripted", max_new_tokens=4)


def _cfg(tiny_model, chat_file, out, **train):
    tree = tiny_config(tiny_model, chat_file, out, **{"epochs": 4, "eval_every": 2, "save_every": 100, "keep_last": 1,
                                                      **train})
    tree["data"]["validation_split"] = 0.25
    return build_config(tree)


def test_early_stopping_stops_after_patience(tiny_model, chat_file, tmp_path):
    # 36 training examples / 4 per batch x 2 accumulation: 5 steps an epoch, 18 in 4 epochs; validation every 2
    seen: list[int] = []
    cfg = _cfg(tiny_model, chat_file, tmp_path / "run", select_by="metric", early_stopping_patience=2,
               validate_limit=5)
    res = run_training(cfg, tools=scripted([0.2, 0.5, 0.4, 0.45, 0.9, 0.9], seen))
    rows = metrics_rows(res.run_dir)
    # best at step 4 (0.5); steps 6 and 8 do not improve on it: stop after step 8, long before step 18
    assert rows[-1]["step"] == 8
    assert [r["val_metric"] for r in rows if "val_metric" in r] == [0.2, 0.5, 0.4, 0.45]
    assert all("val_loss" in r for r in rows if "val_metric" in r)
    assert seen == [5, 5, 5, 5]  # the validation slice: validate_limit examples
    s = json.loads((res.run_dir / "summary.json").read_text())
    assert s["stopped_early"] and s["selected_step"] == 4 and s["selected_value"] == pytest.approx(0.5)
    assert s["steps"] == 8 and "best validation scripted" in s["selection"]
    # the last step's checkpoint stays in checkpoints/, beside the best one
    assert sorted(p.name for p in (res.run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_adapter_is_the_best_steps_weights(tiny_model, chat_file, tmp_path):
    import torch

    cfg = _cfg(tiny_model, chat_file, tmp_path / "run", select_by="metric", save_every=2, validate_limit=3, epochs=2)
    # 9 steps; validations at 2, 4, 6, 8 and 9; the best at step 6
    res = run_training(cfg, tools=scripted([0.1, 0.3, 0.8, 0.2, 0.1]))
    ckpts = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000009"]  # keep_last=1 pruned everything but the best and the last
    adapter, best, last = (_weights(p) for p in (res.run_dir / "adapter", res.run_dir / "checkpoints" / ckpts[0],
                                                  res.run_dir / "checkpoints" / ckpts[1]))
    assert adapter.keys() == best.keys()
    assert all(torch.equal(adapter[k], best[k]) for k in adapter)
    assert any(not torch.equal(adapter[k], last[k]) for k in adapter)
    # the returned model holds the best weights too
    from peft import get_peft_model_state_dict

    live = get_peft_model_state_dict(res.model)
    assert all(torch.equal(live[k].cpu(), best[k]) for k in best)
    s = json.loads((res.run_dir / "summary.json").read_text())
    assert s["selected_step"] == 6 and not s["stopped_early"] and s["steps"] == 9


def test_select_by_loss_needs_no_metric(tiny_model, chat_file, tmp_path):
    res = run_training(_cfg(tiny_model, chat_file, tmp_path / "run", select_by="loss", epochs=1))
    rows = [r for r in metrics_rows(res.run_dir) if "val_loss" in r]
    best = min(rows, key=lambda r: r["val_loss"])
    s = json.loads((res.run_dir / "summary.json").read_text())
    assert s["selected_step"] == best["step"] and s["selected_value"] == pytest.approx(best["val_loss"])


def test_select_by_metric_without_tools_is_a_clear_error(tiny_model, chat_file, tmp_path):
    with pytest.raises(LoraforgeError, match="select_by=metric needs"):
        run_training(_cfg(tiny_model, chat_file, tmp_path / "run", select_by="metric"))


def test_best_adapter_with_slow_background_checkpoints(tiny_model, chat_file, tmp_path, monkeypatch):
    """Periodic checkpoints are written on a background thread; with each write slowed down the run still
    waits for them, so adapter/ is the best step's and pruning keeps the best and the last."""
    import time

    import torch

    from loraforge.train import checkpoint

    real = checkpoint._write_checkpoint
    monkeypatch.setattr(checkpoint, "_write_checkpoint", lambda *a: time.sleep(0.3) or real(*a))
    cfg = _cfg(tiny_model, chat_file, tmp_path / "run", select_by="metric", save_every=2, validate_limit=3, epochs=2)
    res = run_training(cfg, tools=scripted([0.1, 0.3, 0.8, 0.2, 0.1]))
    ckpts = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000009"]
    adapter, best = _weights(res.run_dir / "adapter"), _weights(res.run_dir / "checkpoints" / ckpts[0])
    assert adapter.keys() == best.keys() and all(torch.equal(adapter[k], best[k]) for k in adapter)
