"""Report a run to the trackers people already watch: TensorBoard, MLflow, W&B (offline) and Trackio.

    train:
      report_to: [tensorboard, mlflow, wandb, trackio]     # any of them; none by default

Each tracker is driven through its own library (the optional extra `track`), lazily imported. Rank 0 alone
reports. The run's name is its folder's name, the project (W&B, Trackio; MLflow's experiment) is
`train.report_project`; where each tracker stores its data:

    tensorboard   RUN_DIR/tensorboard/            (tensorboard --logdir runs/)
    mlflow        train.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/../mlflow.db (artefacts in
                  RUN_DIR/../mlartifacts; mlflow ui --backend-store-uri sqlite:///runs/mlflow.db)
    wandb         RUN_DIR/wandb/offline-run-*     (offline unless $WANDB_MODE says otherwise; `wandb sync` uploads)
    trackio       Trackio's local store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio; `trackio show`)

Every numeric field of a metrics row is logged at the row's step as train/<field> (val_<x> as val/<x>); the
config goes in as hyperparameters. `RUN_DIR/tracking.json` keeps each tracker's run id, so `train --resume`
continues the same tracked run: each tracker is asked how far it got (MLflow's metric history, Trackio's store,
W&B's run files), gets the steps up to the checkpoint it lacks from metrics.jsonl (a kill loses what a tracker
had not yet written) and skips those it has (the resumed run recomputes them with the same values);
TensorBoard's events are purged and replayed. `loraforge eval` adds its scores and the HTML report to the run.
log() only queues the row for loraforge's reporting thread, which hands it to the trackers, whose own
background writers (TensorBoard's event writer thread, MLflow's async logging, W&B's service process, Trackio's
sender thread) do the writing: a step never waits on a tracker, its disk or its network
(bench/tracking_overhead.py measures both sides). A tracker that
fails while training is reported once and dropped; the run goes on (metrics.jsonl stays the record).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import queue
import threading
import time
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.files import write_json

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
STATE_FILE = "tracking.json"


def _need(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoraforgeError(f"train.report_to includes {tracker}, but the {module.split('.')[0]} package is not "
                             "installed", hint='pip install "loraforge[track]" (or remove it from train.report_to)'
                             ) from None


def metric_name(key: str) -> str:
    """The tracker-side name of a metrics.jsonl field: train/loss, train/lr, val/loss, ..."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def numeric(row: dict) -> dict[str, float]:
    """The row's numeric fields (but the step) under their tracker-side names; None and NaN left out."""
    return {metric_name(k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train.learning_rate": 2e-4, ...}: scalars as they are, lists and None as text."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class Reporter:
    """One tracker. start() opens (or, resuming, reopens) its run and returns the state to keep in
    tracking.json; log() hands one row over; finish() ends the run as finished / interrupted / failed."""

    name = ""
    replays_all = False

    def __init__(self, cfg, run_dir: Path, saved: dict | None):
        self.cfg, self.run_dir, self.saved = cfg, run_dir, saved or {}
        self.run_name = Path(cfg.output_dir).name or "run"
        self.project = cfg.train.report_project
        self.stored_step = 0   # steps up to here are already in the tracker (resume)

    def start(self, resume_step: int | None) -> dict:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_eval(self, scores: dict[str, float], step: int, files: list[Path], text: str) -> None:
        raise NotImplementedError

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def finish(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardReporter(Reporter):
    name = "tensorboard"
    replays_all = True   # resuming: every step is purged and replayed (which events a kill lost is unknown)

    def start(self, resume_step):
        tb = _need("torch.utils.tensorboard", "tensorboard")
        self.logdir = self.run_dir / "tensorboard"
        # events past `resume_step` are purged (TensorBoard drops them when reading)
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = tb.SummaryWriter(str(self.logdir), purge_step=purge, flush_secs=10)
        if resume_step is None:
            from torch.utils.tensorboard.summary import hparams

            self.writer.add_text("config", "```\n" + self.cfg.to_yaml() + "\n```", 0)
            for part in hparams(flat_config(self.cfg.model_dump(mode="json")), {"val/loss": 0.0}):
                self.writer.file_writer.add_summary(part)
        return {"logdir": str(self.logdir)}

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_eval(self, scores, step, files, text):
        self.log(scores, step)
        self.writer.add_text("eval/report", text, step)

    def finish(self, status):
        self.writer.close()


class MLflowReporter(Reporter):
    name = "mlflow"

    def start(self, resume_step):
        mlflow = _need("mlflow", "mlflow")
        self.uri = (self.saved.get("tracking_uri") or self.cfg.train.tracking_uri
                    or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{Path(self.cfg.output_dir).resolve().parent / 'mlflow.db'}")
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.pending: list = []
        try:
            if self.saved.get("run_id"):
                self.run_id = self.saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                hist = self.client.get_metric_history(self.run_id, "train/loss")
                self.stored_step = max((m.step for m in hist), default=0)
            else:
                exp = self.client.get_experiment_by_name(self.project)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(
                    self.project, artifact_location=self._artifacts())
                run = self.client.create_run(exp_id, run_name=self.run_name,
                                             tags={"loraforge.run_dir": str(self.run_dir.resolve())})
                self.run_id = run.info.run_id
                params = [mlflow.entities.Param(k, str(v)[:6000])
                          for k, v in flat_config(self.cfg.model_dump(mode="json")).items()]
                for i in range(0, len(params), 100):
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
                if (self.run_dir / "config.yaml").is_file():
                    self.client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
        except mlflow.exceptions.MlflowException as e:
            raise LoraforgeError(f"MLflow at {self.uri} refused the run: {str(e).splitlines()[0]}",
                                 hint="check train.tracking_uri / MLFLOW_TRACKING_URI (is the server up?)") from None
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def _artifacts(self) -> str | None:
        """A local store keeps artefacts in mlartifacts/ beside its database (a server picks its own)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return None

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        op = self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                                   synchronous=False)
        self.pending = [p for p in self.pending[-64:] if not _done(p)] + [op]

    def log_eval(self, scores, step, files, text):
        self.log(scores, step)
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path="eval")

    def finish(self, status):
        for op in self.pending:
            op.wait()
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status,
                                                                                                      "FAILED"))


def _done(op) -> bool:
    futures = getattr(op, "_operation_futures", None)
    return futures is not None and all(f.done() for f in futures)


class WandbReporter(Reporter):
    name = "wandb"

    def start(self, resume_step):
        wandb = _need("wandb", "wandb")
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(project=self.project, name=self.run_name, id=self.saved.get("run_id"),
                              dir=str(self.run_dir), mode=mode, resume="allow" if self.saved else None,
                              config=self.cfg.model_dump(mode="json"), reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        if self.saved:   # what the run's own files hold (a kill loses what W&B had not written yet)
            from loraforge.train.wandb_files import last_step

            self.stored_step = last_step(self.run_dir, self.run.id)
        return {"run_id": self.run.id, "mode": mode}

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_summary(self, values, step):
        self.run.summary.update(values)

    def log_eval(self, scores, step, files, text):
        self.run.summary.update(scores)
        for f in files:
            self.run.save(str(f), base_path=str(f.parent), policy="now")

    def finish(self, status):
        self.run.finish(exit_code=0 if status == "finished" else 1)


class TrackioReporter(Reporter):
    name = "trackio"

    def start(self, resume_step):
        trackio = _need("trackio", "trackio")
        from trackio.sqlite_storage import SQLiteStorage

        with contextlib.redirect_stdout(sys.stderr):   # its banner: not on the command's stdout
            self.run = trackio.init(project=self.project, name=self.saved.get("run") or self.run_name,
                                    config=flat_config(self.cfg.model_dump(mode="json")),
                                    resume="must" if self.saved else "never", embed=False,
                                    auto_log_gpu=False, auto_log_cpu=False)
        if self.saved:
            self.stored_step = SQLiteStorage.get_max_step_for_run(self.project, run_id=self.run.id) or 0
        return {"run": self.run.name, "run_id": self.run.id}

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_eval(self, scores, step, files, text):
        import trackio

        self.run.log({**scores, **{f"eval/{f.stem}": trackio.Markdown(text) for f in files[:1]}}, step=step)

    def finish(self, status):
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()


CLASSES = {c.name: c for c in (TensorBoardReporter, MLflowReporter, WandbReporter, TrackioReporter)}


class Reporters:
    """The run's reporters together; what train.run hands to train_loop as on_log. Once start_thread() ran,
    log() only queues the row: one background thread hands rows to the trackers (so the step never waits on a
    tracker's own Python work: building protobufs, its queue's lock, a socket write)."""

    def __init__(self, run_dir: Path | None = None, reporters: list[Reporter] | None = None, warn=print):
        self.run_dir, self.reporters, self.warn = run_dir, reporters or [], warn
        self.state: dict[str, dict] = {}
        self.busy_s: dict[str, float] = {}   # background time each tracker took, all rows together
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    def __bool__(self) -> bool:
        return bool(self.reporters)

    def start_thread(self) -> None:
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="loraforge-trackers", daemon=True)
        self._thread.start()

    def log(self, row: dict, only: Reporter | None = None) -> None:
        if self._queue is not None:
            self._queue.put((row, only))
        else:
            self._deliver(row, only)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._deliver(*item)

    def _deliver(self, row: dict, only: Reporter | None = None) -> None:
        step, metrics = int(row["step"]), numeric(row)
        for r in [only] if only is not None else list(self.reporters):
            if only is None and step <= r.stored_step:
                continue   # already in the tracker from before the resume
            t = time.perf_counter()
            try:
                r.log(metrics, step)
                self.state[r.name]["last_step"] = step
            except Exception as e:  # a dashboard going down must not stop the training
                self.warn(f"[yellow]warning:[/] {r.name} failed ({type(e).__name__}: {e}); no longer reporting to it")
                self.reporters.remove(r)
            self.busy_s[r.name] = self.busy_s.get(r.name, 0.0) + time.perf_counter() - t
        if self.reporters and self.run_dir is not None:
            self.save()   # after every row (off the training thread): a killed run knows what each tracker got

    def save(self) -> None:
        write_state(self.run_dir, self.state)

    def finish(self, status: str, summary: dict | None = None) -> None:
        """Hand over the rows still queued, add the run's summary.json numbers (summary/<key>), then end every
        tracked run as `status`."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None
        values = {f"summary/{k}": float(v) for k, v in (summary or {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for r in self.reporters:
            try:
                if values:
                    r.log_summary(values, int(summary.get("steps") or 0))
                r.finish(status)
            except Exception as e:
                self.warn(f"[yellow]warning:[/] {r.name} could not close its run: {e}")
        if self.reporters:
            self.save()
        self.reporters = []


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, state: dict) -> None:
    path = Path(run_dir) / STATE_FILE
    write_json(path, state)


def open_reporters(cfg, run_dir: Path, resume_step: int | None, warn=print) -> Reporters:
    """Start (resume_step None) or continue the run in every tracker of train.report_to."""
    saved = read_state(run_dir) if resume_step is not None else {}
    out = Reporters(run_dir, warn=warn)
    for name in cfg.train.report_to:
        r = CLASSES[name](cfg, Path(run_dir), saved.get(name))
        try:
            info = r.start(0 if resume_step is not None and r.replays_all else resume_step)
        except LoraforgeError:
            raise
        except Exception as e:
            raise LoraforgeError(f"{name} could not {'continue' if r.saved else 'start'} the tracked run: "
                                 f"{type(e).__name__}: {e}", hint=f"fix it, or remove {name} from train.report_to"
                                 ) from None
        out.reporters.append(r)
        out.state[name] = {**info, "last_step": max(r.stored_step, resume_step or 0)}
    if out:
        out.save()
        out.start_thread()
    if out and resume_step is not None:
        # steps up to the checkpoint that a tracker lacks (a kill loses what it had not written) come from
        # metrics.jsonl, which holds exactly those steps now, before the resumed run's own rows
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()] \
            if (Path(run_dir) / "metrics.jsonl").is_file() else []
        for r in out.reporters:
            for row in rows:
                if r.stored_step < row["step"] <= resume_step:
                    out.log(row, only=r)
    return out


def report_eval(run_dir: Path, cfg, result: dict, files: list[Path], warn=print) -> list[str]:
    """Add an evaluation's scores and files (eval.json, report.html) to the run's tracked runs; returns the
    trackers reported to."""
    state = read_state(run_dir)
    names = [n for n in cfg.train.report_to if n in state]
    if not names:
        return []
    metric = result["metric"]
    scores = {f"eval/{m}_{metric}": float(v["value"]) for m, v in result["models"].items()}
    scores |= {f"eval/{m}_{metric}_ci_low": float(v["ci"][0]) for m, v in result["models"].items()
               if v["ci"][0] is not None}
    scores |= {f"eval/{m}_{metric}_ci_high": float(v["ci"][1]) for m, v in result["models"].items()
               if v["ci"][1] is not None}
    lines = [f"| model | {metric} | 95% CI |", "|---|---|---|"]
    lines += [f"| {m} | {v['value']:.4f} | {v['ci'][0]} – {v['ci'][1]} |" for m, v in result["models"].items()]
    text = "\n".join(lines) + "\n\nHTML report: " + ", ".join(str(Path(f).resolve()) for f in files)
    step = max(int(s.get("last_step") or 0) for s in state.values())
    done = []
    for name in names:
        r = CLASSES[name](cfg, Path(run_dir), state[name])
        try:
            r.start(step)
            r.log_eval(scores, step, [Path(f) for f in files], text)
            r.finish("finished")
            done.append(name)
        except Exception as e:  # the evaluation itself is written already; a tracker does not undo it
            warn(f"warning: could not add the evaluation to {name}: {type(e).__name__}: {e}")
    return done
