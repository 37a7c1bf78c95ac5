"""Several processes on CPU (gloo), as torchrun runs them: 2 processes give the 1-process loss curve,
a checkpoint of a 2-process run resumes in 1 process, two local "nodes" joined by a c10d rendezvous give
the same curve, and bad input (too many GPUs, configs that differ between nodes, a rank that dies)
stops with one clear message instead of hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import assert_same_curve, metrics_rows, tiny_config
from loraforge.cli import main
from loraforge.config import build_config
from loraforge.train.checkpoint import list_checkpoints
from loraforge.train.run import run_training

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def _tree(tiny_model, chat_file, out, **kw):
    # constant lr: the schedule does not depend on max_steps, so a run cut by max_steps can be resumed
    # without it; grad_accum=3 is not a multiple of 2, so one rank runs a weightless repeat every step
    t = dict(grad_accum=3, lr_scheduler="constant", warmup_ratio=0.0, num_threads=1, device="cpu",
             dist_timeout_s=30, eval_every=2, save_every=3)
    t.update(kw)
    return tiny_config(tiny_model, chat_file, out, **t)


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(cfg: Path, port: int, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
           "-m", "loraforge", "train", str(cfg), *overrides]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One uninterrupted single-process run: the curve every other run must reproduce."""
    from conftest import chat_rows, write_jsonl

    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "train.jsonl", chat_rows())
    run_training(build_config(_tree(tiny_model, data, root / "ref")))
    return root, data, metrics_rows(root / "ref")


def _gpus2(cfg: Path, *extra: str) -> None:
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", "2", *extra], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]


def test_two_processes_match_one_and_resume_on_other_counts(tiny_model, reference):
    """DDP x2 (steps 1-4, checkpoint at 3) -> FSDP2 x2 resumes (4-6) -> 1 process resumes (7-8): one curve,
    the reference's (max_steps on even steps, where the reference validates too)."""
    root, data, ref = reference
    assert len(ref) == 8 and sum("val_loss" in r for r in ref) == 4
    out = root / "two"
    cfg = _write(root / "two.yaml", _tree(tiny_model, data, out))
    _gpus2(cfg, "train.max_steps=4")
    assert_same_curve(metrics_rows(out), ref[:4])  # the global batch, loss normalisation and validation match 1 process
    assert json.loads((out / "summary.json").read_text())["processes"] == 2

    # a DDP checkpoint into FSDP2 shards; a longer run is a change to what is trained, said explicitly
    _gpus2(cfg, "train.max_steps=6", "train.distributed=fsdp", "--resume", "--resume-with-changes")
    assert_same_curve(metrics_rows(out), ref[:6])
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-00000003", "step-00000006"]

    # the FSDP2 checkpoint (gathered on rank 0, global data position) continues in 1 process
    resumed = run_training(build_config(_tree(tiny_model, data, out)), resume=True, with_changes=True)
    assert_same_curve(metrics_rows(out), ref)
    assert resumed.summary["final_val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-5)


def test_nodes_with_different_configs_refuse_to_start(tiny_model, reference):
    root, data, _ = reference
    cfg = _write(root / "mismatch.yaml", _tree(tiny_model, data, root / "mismatch"))
    port = _free_port()
    nodes = [_node(cfg, port), _node(cfg, port, "train.learning_rate=0.001")]
    logs = [n.communicate(timeout=120)[0] for n in nodes]
    assert all(n.returncode != 0 for n in nodes)
    for log in logs:
        assert "the processes of this run disagree on the config" in log and "differs from rank 0" in log
    assert not (root / "mismatch" / "metrics.jsonl").exists()


def test_two_local_nodes_give_the_same_curve_and_survive_a_dead_rank(tiny_model, reference):
    """Two torchrun invocations (one process each) joined by a c10d rendezvous on 127.0.0.1 follow the
    1-process curve (a longer run: same batches and constant lr, so its first steps are the reference's);
    then the second node's worker is killed and the first exits with a message within the timeout."""
    root, data, ref = reference
    out = root / "nodes"
    cfg = _write(root / "nodes.yaml", _tree(tiny_model, data, out, epochs=400, dist_timeout_s=20, save_every=1000))
    port = _free_port()
    nodes = [_node(cfg, port), _node(cfg, port)]
    deadline = time.time() + 90
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics_rows(out)) >= 6):
        assert all(n.poll() is None for n in nodes), "a node stopped early"
        time.sleep(0.1)
    workers = psutil.Process(nodes[1].pid).children(recursive=True)
    assert workers, "no worker under the second node"
    killed = time.time()
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    log = nodes[0].communicate(timeout=60)[0]
    nodes[1].communicate(timeout=60)
    assert_same_curve(metrics_rows(out)[:6], ref[:6])
    assert nodes[0].returncode != 0
    assert "another process of this run stopped or stopped answering" in log, log[-3000:]
    assert time.time() - killed < 20 + 30  # the configured timeout, plus process exit


def test_more_gpus_than_visible_is_refused(tiny_model, reference, tmp_path, capsys):
    root, data, _ = reference
    tree = _tree(tiny_model, data, tmp_path / "run")
    tree["train"]["device"] = "auto"
    code = main(["train", str(_write(tmp_path / "run.yaml", tree)), "--gpus", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "--gpus 64 but only" in err and "GPU" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_a_user_error_under_gpus_n_is_one_message_and_exit_2(tiny_model, reference, tmp_path):
    """Both workers meet the missing data file: the user sees its message once, exit code 2, and none of
    torchrun's failure report (its error line, launcher traceback, per-rank box)."""
    root, data, _ = reference
    tree = _tree(tiny_model, data, tmp_path / "run")
    tree["data"]["train"] = str(tmp_path / "missing.jsonl")
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(_write(tmp_path / "run.yaml", tree)),
                          "--gpus", "2"], env=ENV, capture_output=True, text=True, timeout=120)
    log = res.stdout + res.stderr
    assert res.returncode == 2, log[-3000:]
    assert log.count("data file not found") == 1 and "missing.jsonl" in log, log[-3000:]
    for noise in ("Traceback", "ChildFailedError", "FAILED", "exitcode"):
        assert noise not in log, log[-3000:]


def test_fsdp_shards_an_untied_embedding_and_head_as_groups_of_their_own(tmp_path):
    """edge_modules: an untied embedding and head are FSDP2 groups of their own (a tied pair stays in the
    root group); with them, FSDP2 x2 follows the one-process curve of an untied model."""
    from transformers import AutoModelForCausalLM

    from conftest import chat_rows, make_tiny_model, write_jsonl
    from loraforge.train.distributed import edge_modules

    untied = make_tiny_model(tmp_path / "untied", tied=False)
    model = AutoModelForCausalLM.from_pretrained(untied)
    assert edge_modules(model) == [model.get_input_embeddings(), model.get_output_embeddings()]
    tied = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "tied"))
    assert edge_modules(tied) == []

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    run_training(build_config(_tree(untied, data, tmp_path / "one", max_steps=4)))
    cfg = _write(tmp_path / "fsdp.yaml", _tree(untied, data, tmp_path / "two", max_steps=4, distributed="fsdp"))
    _gpus2(cfg)
    assert_same_curve(metrics_rows(tmp_path / "two"), metrics_rows(tmp_path / "one"))


def test_a_deliberate_stop_under_gpus_n_exits_3_and_resumes(tiny_model, reference, tmp_path):
    """SIGTERM to `loraforge train --gpus 2` reaches both workers, which checkpoint and stop: the command exits 3
    (stopped on purpose, resumable), not torchrun's own 1, and --resume continues from the checkpoint."""
    root, data, _ = reference
    out = tmp_path / "run"
    cfg = _write(tmp_path / "long.yaml", _tree(tiny_model, data, out, epochs=400, save_every=1000))
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", "2"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics_rows(out)) >= 3):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=90)[0]
    assert proc.returncode == 3, log[-3000:]
    saved = list_checkpoints(out / "checkpoints")
    assert saved, log[-3000:]
    assert "Traceback" not in log and log.count("stopped: SIGTERM received") >= 1
    # a few steps past the checkpoint the stop left (on a loaded 2-core machine SIGTERM can land as late as step 10)
    last = int(saved[-1].name.split("-")[-1])
    cont = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", "2", "--resume",
                           "--resume-with-changes", f"train.max_steps={last + 3}"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert cont.returncode == 0, cont.stdout + cont.stderr[-3000:]
    assert f"resuming from {saved[-1]}" in cont.stdout + cont.stderr
