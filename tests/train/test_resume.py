"""Checkpoints survive a killed process: SIGTERM mid-run (exit 3, said at once), then --resume, ends with the
same losses as an uninterrupted run and its clock continues; a corrupt newest checkpoint is reported, moved to
checkpoints/corrupt/ and the previous good one is used."""

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
    assert proc.returncode == 3, output  # stopped on purpose, resumable: not a user error (2)
    assert "SIGTERM received: stopping after this step, saving a checkpoint" in output  # said at once
    assert "stopped: SIGTERM received: stopped after step" in output
    assert "Traceback" not in output and "error:" not in output
    assert "step 1/" in output and " ETA " in output  # not a terminal: plain progress lines
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
    # the clock continues across the resume: elapsed_s never restarts at 0, train_seconds counts both parts
    saved_elapsed = json.loads((ckpt / "trainer_state.json").read_text())["elapsed_s"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved_elapsed > 0 and rows[stopped_at]["elapsed_s"] >= saved_elapsed
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(rows, rows[1:]))
    assert resumed["train_seconds"] >= rows[-1]["elapsed_s"] - 0.5 and resumed["train_seconds"] > saved_elapsed


def test_corrupt_checkpoint_falls_back_to_previous(tiny_model, chat_file, tmp_path, capsys):
    tree = _tree(tiny_model, chat_file, tmp_path / "run", max_steps=9, save_every=3, keep_last=3)
    ref = run_training(build_config(tree))
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006", "step-00000009"]
    newest = ckpts[-1] / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a truncated write
    assert "checksum" in verify(ckpts[-1])
    (tmp_path / "run" / "summary.json").unlink()  # as if killed after the last checkpoint, before the end
    partial = tmp_path / "run" / "checkpoints" / ".step-00000007.tmp"  # a save that was killed
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"half")
    # keep_last 1 with a checkpoint every step: the corrupt step 9 must not count among the kept ones
    tree["train"].update(keep_last=1, save_every=1)
    res = run_training(build_config(tree), resume=True)
    err = capsys.readouterr().err
    assert "step-00000009 is unusable" in err and "resuming from" in err and "step-00000006" in err
    assert res.summary["final_train_loss"] == pytest.approx(ref.summary["final_train_loss"], abs=1e-6)
    root = tmp_path / "run" / "checkpoints"
    assert [c.name for c in list_checkpoints(root)] == ["step-00000009"] and verify(root / "step-00000009") is None
    assert "checksum" in verify(root / "corrupt" / "step-00000009")  # kept aside for a look, not deleted
    assert not partial.exists()


def test_keep_last_never_prunes_the_checkpoint_just_saved(tiny_model, chat_file, tmp_path, monkeypatch):
    """keep_last 1, a corrupt newest checkpoint: the next save after resuming from an older one survives."""
    import loraforge.train.checkpoint as C

    tree = _tree(tiny_model, chat_file, tmp_path / "run", max_steps=9, save_every=3, keep_last=3)
    run_training(build_config(tree))
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000009" / "MANIFEST.json").write_text("{")
    (tmp_path / "run" / "summary.json").unlink()
    saved = []
    real = C._write_checkpoint

    def spy(ckpt_root, final, *a):
        real(ckpt_root, final, *a)
        saved.append((final.name, [c.name for c in list_checkpoints(ckpt_root)]))

    monkeypatch.setattr(C, "_write_checkpoint", spy)
    tree["train"].update(keep_last=1, save_every=1)
    run_training(build_config(tree), resume=True)
    assert saved[0] == ("step-00000007", ["step-00000007"])  # today: pruned at once, the corrupt step 9 kept


def test_keep_last_prunes_old_checkpoints(tiny_model, chat_file, tmp_path):
    run_training(build_config(_tree(tiny_model, chat_file, tmp_path / "run", max_steps=7, save_every=2, keep_last=2)))
    names = [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000004", "step-00000006"]


def test_first_signal_says_so_at_once_and_a_second_quits(capfd):
    from loraforge.train.loop import _StopFlag

    with _StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs in the main thread between bytecodes
        assert stop.signum == signal.SIGINT
        assert "SIGINT received: stopping after this step, saving a checkpoint (Ctrl-C again to quit without " \
               "saving)" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)


def test_quit_without_saving_is_exit_130(tiny_model, chat_file, tmp_path, capsys, monkeypatch):
    import loraforge.train.run as R
    from loraforge.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "run_training", interrupted)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(_tree(tiny_model, chat_file, tmp_path / "run")))
    assert main(["train", str(cfg_file)]) == 130
    assert "quit: interrupted without saving" in capsys.readouterr().err


def test_checkpoint_files_are_fsynced_before_the_rename(tiny_model, chat_file, tmp_path, monkeypatch):
    import loraforge.train.checkpoint as C

    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(C.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                   real_fsync(fd)))
    monkeypatch.setattr(Path, "rename", lambda self, dst: (events.append(("rename", str(self))),
                                                           real_rename(self, dst))[1])
    run_training(build_config(_tree(tiny_model, chat_file, tmp_path / "run", max_steps=2, save_every=2)))
    (ckpt,) = list_checkpoints(tmp_path / "run" / "checkpoints")
    tmp = str(ckpt.parent / f".{ckpt.name}.tmp")
    renamed = events.index(("rename", tmp))
    synced = {Path(p).name for kind, p in events[:renamed] if kind == "fsync" and p.startswith(tmp)}
    assert synced >= {p.name for p in ckpt.iterdir() if p.is_file()} | {f".{ckpt.name}.tmp"}
    assert ("fsync", str(ckpt.parent)) in events[renamed:]


def test_auto_spacing_validates_and_saves_a_tenth_of_the_run_apart(tiny_model, chat_file, tmp_path):
    """train.eval_every / save_every auto (the defaults): a 120-step run validates at steps 50, 100 and its last,
    and saves checkpoints at steps 50 and 100 (the adapter of the last step is adapter/)."""
    tree = _tree(tiny_model, chat_file, tmp_path / "run", epochs=100, max_steps=120, grad_accum=1)
    del tree["train"]["eval_every"], tree["train"]["save_every"]
    run_training(build_config(tree))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [50, 100, 120]
    assert [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000050", "step-00000100"]
