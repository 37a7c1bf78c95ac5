"""`loraforge tune CONFIG --budget 30m`: the best adapter for the task without hand-tuning.

    from loraforge.tune.search import tune
    result = tune(cfg, budget_s=1800)          # result["best"]: the winning trial; best.yaml reproduces it

An Optuna study (TPE sampler, seeded) searches the learning rate, the LoRA rank and dropout; the number
of epochs is searched through early stopping (each trial runs at most the config's epochs, keeps its best
validation step and stops after train.early_stopping_patience validations without improvement). Every
trial is a normal run folder (TUNE_DIR/trial-NNN) trained with train.select_by=metric, so its value is the
best validation score of the config's eval.metric, reported to Optuna at every validation: a
successive-halving pruner (ASHA-style; or Hyperband) ends trials that fall behind at a rung. The first
trial is the config as given, the baseline the search must beat. No trial starts after the budget, and
a running one ends at its next validation once the budget is spent (recorded as pruned).

Priors follow the model's size: small models want larger learning rates. The learning-rate range is
log-uniform over [c/4, 4c] around c = 2e-4 (7e9 / N)^0.4 for N parameters (about 2e-4 for an 8B model,
1e-3 for SmolLM2-135M, whose quickstart uses 1e-3).

Written to TUNE_DIR: trials.json (every trial: parameters, state, value, curve), tune.html (table and
curves), best.yaml (the winner's config with a fresh output_dir: `loraforge train TUNE_DIR/best.yaml`
trains it again), the trial folders, and the study itself: Optuna's journal (study.journal) and the config it
searches around (tune-config.yaml). `resume=True` (`loraforge tune --resume`) continues that study with a new
budget: a trial the ended process left running is recorded as failed (interrupted), the sampler is seeded anew
for the trials to come (not to draw the first trials' parameters again), the pruner compares new trials with
every earlier one, and the summary's seconds add up over the invocations. A spot instance that dies loses at
most the trial it was running; a search longer than one session can be run as several.
"""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
import time
from pathlib import Path

import torch

from loraforge.config import AUTO_EVERY_MIN, RunConfig, build_config
from loraforge.errors import LoraforgeError
from loraforge.eval.validation import task_tools
from loraforge.files import atomic_write_text
from loraforge.model.load import resolve_base
from loraforge.plan.shapes import resolve_shape
from loraforge.train.run import run_training
from loraforge.tune.report import write_report

RANKS = (8, 16, 32, 64)
STUDY = "study.journal"          # Optuna's journal of the study (JournalFileBackend): what --resume continues
STUDY_CONFIG = "tune-config.yaml"   # the config the study searches around: --resume checks it is the same
STUDY_NAME = "loraforge-tune"
DROPOUT = (0.0, 0.2)
DEFAULT_PATIENCE = 2


def parse_budget(text: str) -> float:
    """'30m', '2h', '1h30m', '90s' -> seconds; a bare number is minutes."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t) * 60
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or re.sub(r"\d+(?:\.\d+)?\s*[hms]", "", t).strip():
        raise LoraforgeError(f"--budget '{text}' is not a duration", hint="write e.g. 30m, 2h, 1h30m or 900s")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parameter_count(base_model: str) -> int | None:
    """Parameters of the base (from its shape: config.json or the built-in table), None if unknown."""
    try:
        shape = resolve_shape(base_model)
    except LoraforgeError:
        try:
            shape = resolve_shape(resolve_base(base_model))
        except LoraforgeError:
            return None
    return shape.linear_params + shape.embedding_params


def lr_range(n_params: int | None) -> tuple[float, float]:
    """The learning-rate search range for a base of n_params parameters (unknown: as for 1B)."""
    centre = 2e-4 * (7e9 / (n_params or 1e9)) ** 0.4
    centre = min(max(centre, 2e-5), 3e-3)
    return centre / 4, centre * 4


def trial_config(base: RunConfig, params: dict, out: Path) -> RunConfig:
    """The base config with a trial's parameters, selecting by the metric, writing to `out`."""
    tree = base.model_dump(mode="json")
    ratio = base.lora.alpha / base.lora.r  # alpha follows the rank as in the base config
    tree["output_dir"] = str(out)
    tree["lora"].update(r=params["r"], alpha=params["r"] * ratio, dropout=params["dropout"])
    tree["train"].update(learning_rate=params["learning_rate"], select_by="metric",
                         early_stopping_patience=base.train.early_stopping_patience or DEFAULT_PATIENCE)
    return build_config(tree, f"trial {out.name}")


def _sample(trial, lo: float, hi: float) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", lo, hi, log=True),
            "r": trial.suggest_categorical("r", list(RANKS)),
            "dropout": trial.suggest_float("dropout", *DROPOUT)}


def reporter(trial, curve: list, deadline: float | None = None):
    """The `observe` hook of a trial's training: report each validation's metric to Optuna and end the
    trial (optuna.TrialPruned, raised through the training loop) when the pruner says so, or when the
    search's budget (`deadline`, time.time()) is spent."""
    import optuna  # the optional extra loraforge[tune], as in _import_optuna

    def observe(step: int, row: dict) -> None:
        value = row.get("val_metric")
        if value is None:
            return
        curve.append([step, value])
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (validation {value:.4g})")
        if deadline is not None and time.time() > deadline:
            raise optuna.TrialPruned(f"budget spent at step {step} (validation {value:.4g})")

    return observe


def make_pruner(kind: str, min_resource: int):
    import optuna  # the optional extra loraforge[tune], as in _import_optuna

    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise LoraforgeError(f"unknown pruner '{kind}'", hint="use halving, hyperband or none")


def _import_optuna():
    try:
        import optuna  # the optional extra loraforge[tune]
    except ImportError:
        raise LoraforgeError("`loraforge tune` needs Optuna", hint="pip install 'loraforge[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _tune_folder(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """Check (and for a new study, make) the tune folder; nothing is removed before every check passed."""
    if resume:
        if not (out / STUDY).is_file():
            raise LoraforgeError("nothing to resume: no study in the tune folder", where=str(out / STUDY),
                                 hint="start the search without --resume")
        kept = (out / STUDY_CONFIG).read_text() if (out / STUDY_CONFIG).is_file() else None
        if kept != cfg.to_yaml():
            raise LoraforgeError("the tune folder holds a study of another config", where=str(out / STUDY_CONFIG),
                                 hint="resume with the config the study began with, or start a new one with --out")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LoraforgeError("the tune folder already exists", where=str(out),
                                 hint="pass --resume to continue its study, --overwrite to replace it, or --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / STUDY_CONFIG, cfg.to_yaml())


def _interrupted(study, out: Path) -> list[dict]:
    """Trials the ended process left running: told to Optuna as failed, recorded as interrupted."""
    import optuna  # the optional extra loraforge[tune], as in _import_optuna

    records = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        records.append({"number": t.number, "params": dict(t.params), "run_dir": str(out / f"trial-{t.number:03d}"),
                        "curve": [[s, v] for s, v in sorted(t.intermediate_values.items())], "state": "failed",
                        "note": "interrupted: the tune process ended during this trial"})
    return records


def tune(cfg: RunConfig, *, budget_s: float | None = None, trials: int | None = None, out: Path | None = None,
         pruner: str = "halving", overwrite: bool = False, resume: bool = False, log=print, train_fn=None) -> dict:
    """Run the study (`resume`: continue the one in the tune folder); returns the summary written to
    TUNE_DIR/trials.json. `train_fn(cfg, tools)` trains one trial (default: loraforge.train.run.run_training)."""
    optuna = _import_optuna()
    if budget_s is None and trials is None:
        raise LoraforgeError("say how long to search", hint="pass --budget 30m or --trials N")
    if not (cfg.data.validation or cfg.data.validation_split):
        raise LoraforgeError("tune needs validation examples to score trials on",
                             hint="set data.validation or data.validation_split > 0")
    out = Path(out or f"{cfg.output_dir}-tune")
    _tune_folder(cfg, out, resume, overwrite)
    # trials validate often enough for the pruner to compare them early: every AUTO_EVERY_MIN steps unless the
    # config says otherwise (train.eval_every auto would space a long trial's validations a tenth of it apart)
    every = AUTO_EVERY_MIN if cfg.train.eval_every == "auto" else cfg.train.eval_every
    base = cfg.model_copy(update={"train": cfg.train.model_copy(update={"select_by": "metric", "eval_every": every})})
    task_tools(base)  # a missing label set or schema is an error now, before any trial
    if train_fn is None:
        def train_fn(c, tools):
            try:
                return run_training(c, tools=tools, overwrite=True).summary
            finally:  # the next trial loads its base afresh: give this one's memory back
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    n_params = parameter_count(cfg.base_model)
    lo, hi = lr_range(n_params)
    size = f" ({n_params / 1e6:,.0f}M parameters)" if n_params else ""
    log(f"tune: {cfg.base_model}{size}; learning rate in [{lo:.2g}, {hi:.2g}], rank in {list(RANKS)}, "
        f"dropout in {list(DROPOUT)}; metric {cfg.eval.metric}; {pruner} pruner")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY)))
    before = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) if resume else 0
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=resume, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed + before),
                                pruner=make_pruner(pruner, 2 * every))
    records: list[dict] = []
    spent = 0.0   # seconds of the earlier invocations (resume)
    if resume:
        earlier = read_summary(out) if (out / "trials.json").is_file() else {"trials": [], "seconds": 0.0}
        records, spent = earlier["trials"], earlier["seconds"]
        known = {r["number"] for r in records}
        records += [r for r in _interrupted(study, out) if r["number"] not in known]
        log(f"tune: resuming the study in {out}: {before} earlier trials, {spent:.0f} s")
    else:   # the baseline: the config's own values (its learning rate clipped into the searched range)
        study.enqueue_trial({"learning_rate": min(max(cfg.train.learning_rate, lo), hi),
                             "r": cfg.lora.r if cfg.lora.r in RANKS else 16,
                             "dropout": min(cfg.lora.dropout, DROPOUT[1])})
    t0 = time.time()

    def objective(trial):
        params = _sample(trial, lo, hi)
        run = out / f"trial-{trial.number:03d}"
        rec = {"number": trial.number, "params": params, "run_dir": str(run), "curve": [], "state": "running"}
        records.append(rec)
        start = time.time()
        try:
            observe = reporter(trial, rec["curve"], t0 + budget_s if budget_s else None)
            summary = train_fn(trial_config(base, params, run), task_tools(base, observe))
        except optuna.TrialPruned as e:
            rec.update(state="pruned", note=str(e), seconds=round(time.time() - start, 1))
            raise
        except LoraforgeError as e:  # e.g. the loss became NaN at this learning rate: a failed trial, go on
            rec.update(state="failed", note=str(e), seconds=round(time.time() - start, 1))
            raise
        rec.update(state="complete", value=summary["selected_value"], selected_step=summary["selected_step"],
                   steps=summary["steps"], stopped_early=summary["stopped_early"],
                   seconds=round(time.time() - start, 1))
        return summary["selected_value"]

    def after(study, trial) -> None:
        rec = next(r for r in records if r["number"] == trial.number)
        log(f"trial {trial.number}: {rec['state']}" + (f", {cfg.eval.metric} {rec['value']:.4f}" if "value" in rec
                                                        else f" ({rec.get('note', '')})"))
        write_report(out, _summary(cfg, records, study, n_params, (lo, hi), pruner, spent + time.time() - t0))

    study.optimize(objective, n_trials=trials, timeout=budget_s, catch=(LoraforgeError,), callbacks=[after])
    summary = _summary(cfg, records, study, n_params, (lo, hi), pruner, spent + time.time() - t0)
    if summary["best"] is None:
        raise LoraforgeError("no trial completed", where=str(out), hint="see trials.json; raise --budget or --trials")
    best_cfg = trial_config(base, summary["best"]["params"], out / "best")
    best_yaml = out / "best.yaml"
    atomic_write_text(best_yaml, f"# loraforge tune: trial {summary['best']['number']} of {len(records)}, validation "
                   f"{cfg.eval.metric} {summary['best']['value']:.4f}\n# loraforge train {best_yaml}\n"
                   + best_cfg.to_yaml())
    summary["best_yaml"] = str(best_yaml)
    write_report(out, summary)
    return summary


def _summary(cfg: RunConfig, records: list, study, n_params, lr: tuple, pruner: str, seconds: float) -> dict:
    done = [r for r in records if r["state"] == "complete" and r.get("value") is not None
            and not math.isnan(r["value"])]
    best = max(done, key=lambda r: (r["value"], -r["number"])) if done else None
    return {"base_model": cfg.base_model, "metric": cfg.eval.metric, "parameters": n_params,
            "space": {"learning_rate": list(lr), "r": list(RANKS), "dropout": list(DROPOUT)}, "pruner": pruner,
            "trials": records, "best": best, "seconds": round(seconds, 1),
            "counts": {s: sum(r["state"] == s for r in records) for s in ("complete", "pruned", "failed")}}


def read_summary(out: Path) -> dict:
    return json.loads((Path(out) / "trials.json").read_text())
