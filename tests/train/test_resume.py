"""Checkpoints survive a killed process: SIGTERM mid-run, then --resume, ends with the same losses as an
uninterrupted run; a corrupt newest checkpoint is reported and the previous good one is used."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.train.checkpoint import list_checkpoints, verify
from loraforge.train.run import run_training


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tree(tiny_model, chat_file, out, **kw):
    t = tiny_config(tiny_model, chat_file, out, num_threads=1, **kw)
    return t


def test_sigterm_then_resume_matches_uninterrupted(tiny_model, chat_file, tmp_path):
    steps = dict(epochs=60, save_every=1000, eval_every=40, grad_accum=1)
    ref = run_training(build_config(_tree(tiny_model, chat_file, tmp_path / "ref", **steps)))

    out = tmp_path / "killed"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(_tree(tiny_model, chat_file, out, **steps)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(cfg_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, output
    assert "SIGTERM received: stopped after step" in output and "Traceback" not in output
    (ckpt,) = list_checkpoints(out / "checkpoints")
    assert verify(ckpt) is None
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 30 <= stopped_at < ref.summary["steps"]

    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg_file), "--resume"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["steps"] == ref.summary["steps"]
    assert resumed["final_train_loss"] == pytest.approx(ref.summary["final_train_loss"], abs=1e-5)
    assert resumed["final_val_loss"] == pytest.approx(ref.summary["final_val_loss"], abs=1e-5)
    assert _losses(out) == pytest.approx(_losses(tmp_path / "ref"), abs=1e-5)  # every step, no duplicates


def test_corrupt_checkpoint_falls_back_to_previous(tiny_model, chat_file, tmp_path, capsys):
    tree = _tree(tiny_model, chat_file, tmp_path / "run", max_steps=9, save_every=3, keep_last=3)
    ref = run_training(build_config(tree))
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006", "step-00000009"]
    newest = ckpts[-1] / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a truncated write
    assert "checksum" in verify(ckpts[-1])
    res = run_training(build_config(tree), resume=True)
    err = capsys.readouterr().err
    assert "step-00000009 is unusable" in err and "resuming from" in err and "step-00000006" in err
    assert res.summary["final_train_loss"] == pytest.approx(ref.summary["final_train_loss"], abs=1e-6)


def test_keep_last_prunes_old_checkpoints(tiny_model, chat_file, tmp_path):
    run_training(build_config(_tree(tiny_model, chat_file, tmp_path / "run", max_steps=7, save_every=2, keep_last=2)))
    names = [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000004", "step-00000006"]
