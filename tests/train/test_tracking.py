"""train.report_to: every tracker, read back with its own reader, holds the same numbers as metrics.jsonl;
a run that crashes after logging a step past its checkpoint and is resumed continues the same tracked run
with every step exactly once; `loraforge eval`'s scores and report land in the same runs; a missing package
is one clear error naming the extra."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import metrics_rows, tiny_config
from loraforge.config import build_config
from loraforge.errors import LoraforgeError
from loraforge.train import run as run_mod
from loraforge.train import tracking
from loraforge.train.run import run_training
from tracker_readers import mlflow_history, tensorboard_history, trackio_history, wandb_history, wandb_summary

# Trackio reads its store location once, at import: point it at a scratch folder before anything imports it
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="trackio-test-"))
os.environ.setdefault("WANDB_SILENT", "true")
ALL = ["tensorboard", "mlflow", "wandb", "trackio"]
KEYS = {"train/loss": "loss", "train/lr": "lr", "train/grad_norm": "grad_norm", "val/loss": "val_loss"}


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    return {name: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for name, key in KEYS.items()}


def _assert_same(got: dict, rows: list[dict], rel: float = 1e-5) -> None:
    for name, want in _expected(rows).items():
        have = got.get(name, [])
        assert [s for s, _ in have] == [s for s, _ in want], f"{name}: steps {[s for s, _ in have]}"
        assert [v for _, v in have] == pytest.approx([v for _, v in want], rel=rel), name


@pytest.fixture(scope="module")
def tracked(tiny_model, tmp_path_factory):
    """A run reported to all four trackers that crashes after step 7 was logged (checkpoint at 6), is
    resumed to step 12, and then gets an evaluation's scores and report."""
    for pkg in ("tensorboard", "mlflow", "wandb", "trackio"):
        pytest.importorskip(pkg)
    root = tmp_path_factory.mktemp("tracked")
    from conftest import chat_rows, write_jsonl

    data = write_jsonl(root / "train.jsonl", chat_rows())
    tree = tiny_config(tiny_model, data, root / "runs" / "tiny-a", epochs=4, max_steps=12, save_every=3, eval_every=4,
                       report_to=ALL, report_project="lf-test")
    real = run_mod.train_loop

    def crash_after_7(*a, on_log=None, **k):
        def hook(row):
            on_log(row)
            if row["step"] == 7:
                raise RuntimeError("simulated crash")
        return real(*a, on_log=hook, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(run_mod, "train_loop", crash_after_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(build_config(tree))
    mp.undo()
    run_dir = root / "runs" / "tiny-a"
    first = tracking.read_state(run_dir)
    assert {n: first[n]["last_step"] for n in ALL} == {n: 7 for n in ALL}
    run_training(build_config(tree), resume=True)
    html = run_dir / "eval" / "report.html"
    html.parent.mkdir()
    html.write_text("<html>report</html>")
    result = {"metric": "exact_match", "models": {"base": {"value": 0.25, "ci": [0.1, 0.4]},
                                                  "finetuned": {"value": 0.75, "ci": [0.6, 0.9]}}}
    done = tracking.report_eval(run_dir, build_config(tree), result, [html])
    return run_dir, first, done


@pytest.mark.slow   # the fixture starts the four trackers three times (~30 s; more on a busy machine)
def test_state_keeps_the_same_tracked_runs_across_resume(tracked):
    run_dir, first, done = tracked
    state = tracking.read_state(run_dir)
    assert done == ALL
    for name in ("mlflow", "wandb", "trackio"):
        assert state[name]["run_id"] == first[name]["run_id"]
    assert all(state[n]["last_step"] == 12 for n in ALL)
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))


@pytest.mark.slow
def test_tensorboard_event_files_match_metrics(tracked):
    run_dir, _, _ = tracked
    got = tensorboard_history(run_dir / "tensorboard")
    _assert_same(got, metrics_rows(run_dir))
    assert got["eval/finetuned_exact_match"] == [(12, pytest.approx(0.75))]


@pytest.mark.slow
def test_mlflow_store_matches_metrics_and_holds_config_and_report(tracked):
    import mlflow

    run_dir, _, _ = tracked
    st = tracking.read_state(run_dir)["mlflow"]
    assert st["tracking_uri"] == f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    _assert_same(mlflow_history(st["tracking_uri"], st["run_id"], list(KEYS)), metrics_rows(run_dir))
    mlflow.set_tracking_uri(st["tracking_uri"])
    df = mlflow.search_runs(experiment_names=["lf-test"])
    row = df[df["run_id"] == st["run_id"]].iloc[0]
    assert row["tags.mlflow.runName"] == "tiny-a" and row["status"] == "FINISHED"
    assert float(row["params.train.learning_rate"]) == pytest.approx(5e-3)
    assert row["metrics.eval/finetuned_exact_match"] == pytest.approx(0.75)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert row["metrics.summary/best_val_loss"] == pytest.approx(summary["best_val_loss"])
    arts = {a.path for a in mlflow.MlflowClient(st["tracking_uri"]).list_artifacts(st["run_id"], "eval")}
    assert arts == {"eval/report.html"}


@pytest.mark.slow
def test_wandb_offline_files_match_metrics(tracked):
    run_dir, _, _ = tracked
    st = tracking.read_state(run_dir)["wandb"]
    _assert_same(wandb_history(run_dir, st["run_id"]), metrics_rows(run_dir))
    sessions = sorted(run_dir.glob(f"wandb/offline-run-*-{st['run_id']}"))
    assert len(sessions) == 3                       # first run, resumed run, evaluation: one W&B run id
    assert wandb_summary(sessions[-1])["eval/finetuned_exact_match"] == pytest.approx(0.75)
    trained = json.loads((run_dir / "summary.json").read_text())
    assert wandb_summary(sessions[-2])["summary/tokens_seen"] == trained["tokens_seen"]
    assert (sessions[-1] / "files" / "report.html").is_file()


@pytest.mark.slow
def test_trackio_store_matches_metrics(tracked):
    run_dir, _, _ = tracked
    st = tracking.read_state(run_dir)["trackio"]
    got = trackio_history("lf-test", st["run_id"])
    _assert_same(got, metrics_rows(run_dir))
    assert got["eval/finetuned_exact_match"] == [(12, pytest.approx(0.75))]


def test_eval_adds_scores_and_report_to_the_tracked_run(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from conftest import chat_rows, write_jsonl
    from loraforge.eval.run import evaluate_run

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    tree = tiny_config(tiny_model, data, tmp_path / "run", max_steps=2, eval_every=1, report_to=["tensorboard"])
    tree["eval"] = {"test": str(write_jsonl(tmp_path / "test.jsonl", chat_rows(3))), "max_new_tokens": 4}
    run_training(build_config(tree))
    r = evaluate_run(tmp_path / "run", run_base=False, regression=False, log=lambda m: None)
    got = tensorboard_history(tmp_path / "run" / "tensorboard")
    assert got["eval/finetuned_exact_match"] == [(2, pytest.approx(r.models["finetuned"].value))]
    _assert_same(got, metrics_rows(tmp_path / "run"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    text = acc.Tensors("eval/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert str((tmp_path / "run" / "eval" / "report.html").resolve()) in text and "| finetuned |" in text


def test_missing_tracker_package_names_the_extra(tiny_model, chat_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    cfg = build_config(tiny_config(tiny_model, chat_file, tmp_path / "run", report_to=["wandb"]))
    with pytest.raises(LoraforgeError, match=r"wandb package is not installed") as e:
        tracking.open_reporters(cfg, tmp_path, None)
    assert 'loraforge[track]' in str(e.value)


def test_a_failing_tracker_is_dropped_and_training_goes_on():
    class Broken(tracking.Reporter):
        name = "broken"

        def __init__(self):
            self.stored_step = 0

        def log(self, metrics, step):
            raise OSError("disk full")

    warned = []
    reps = tracking.Reporters(None, [Broken()], warn=warned.append)
    reps.state["broken"] = {}
    reps.log({"step": 1, "loss": 2.0})
    assert not reps and "broken failed (OSError: disk full)" in warned[0]


@pytest.mark.slow
def test_sigkill_then_resume_logs_every_step_once(tiny_model, chat_file, tmp_path):
    """kill -9 after the run logged steps past its last checkpoint; --resume: TensorBoard (events past the
    checkpoint purged) and W&B (steps it has skipped) hold every step once, with metrics.jsonl's values."""
    for pkg in ("tensorboard", "wandb"):
        pytest.importorskip(pkg)
    import yaml

    out = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_model, chat_file, out, epochs=60, max_steps=60,
                                                   grad_accum=1, save_every=10, eval_every=7, num_threads=1,
                                                   report_to=["tensorboard", "wandb"])))
    # W&B's service of this test process (earlier tests started one) must not be inherited: the killed run
    # would stay registered, "in use", in a service that outlives it
    env = {k: v for k, v in os.environ.items() if "WANDB_SERVICE" not in k}
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(cfg_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        state = tracking.read_state(out) if (out / "tracking.json").is_file() else {}
        if min((s.get("last_step", 0) for s in state.values()), default=0) >= 14:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    assert len(metrics_rows(out)) > 10   # rows past the checkpoint at step 10, logged before the kill
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg_file), "--resume"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    _assert_same(tensorboard_history(out / "tensorboard"), rows, rel=1e-4)
    _assert_same(wandb_history(out, tracking.read_state(out)["wandb"]["run_id"]), rows, rel=1e-4)


@pytest.mark.slow
def test_only_rank_zero_reports(tiny_model, chat_file, tmp_path):
    """Two CPU processes (torchrun, gloo): one TensorBoard event file, from rank 0, with every step once."""
    pytest.importorskip("tensorboard")
    import yaml

    from test_distributed import ENV, _tree

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tiny_model, chat_file, out, max_steps=4, report_to=["tensorboard"])))
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", "2"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_same(tensorboard_history(out / "tensorboard"), metrics_rows(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_on_localhost(tiny_model, chat_file, tmp_path):
    pytest.importorskip("mlflow")
    import urllib.request

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))  # no job workers
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        tree = tiny_config(tiny_model, chat_file, tmp_path / "run", max_steps=6, report_to=["mlflow"],
                           tracking_uri=uri)
        run_training(build_config(tree))
        run_id = tracking.read_state(tmp_path / "run")["mlflow"]["run_id"]
        _assert_same(mlflow_history(uri, run_id, list(KEYS)), metrics_rows(tmp_path / "run"))
        import mlflow

        mlflow.set_tracking_uri(uri)
        df = mlflow.search_runs(experiment_names=["loraforge"])
        assert list(df["run_id"]) == [run_id] and df["status"].iloc[0] == "FINISHED"
        assert df["metrics.train/loss"].iloc[0] == pytest.approx(metrics_rows(tmp_path / "run")[-1]["loss"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)   # the server and the uvicorn process it started
        server.wait(timeout=30)
