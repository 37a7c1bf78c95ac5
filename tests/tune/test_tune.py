"""`loraforge tune`: weak trials pruned by successive halving, the lr prior follows the model's size, and a
study on the tiny model writes trial run folders, the trials table and page, and a best.yaml that trains."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_config

pytest.importorskip("optuna")

import optuna  # noqa: E402

from loraforge.cli import main  # noqa: E402
from loraforge.config import build_config, load_config  # noqa: E402
from loraforge.errors import LoraforgeError  # noqa: E402
from loraforge.tune.search import lr_range, make_pruner, parse_budget, reporter  # noqa: E402


def test_a_trial_with_a_bad_intermediate_value_is_pruned():
    scripts = {0: [0.5, 0.6, 0.7, 0.8], 1: [0.55, 0.65, 0.75, 0.85], 2: [0.05, 0.9, 0.9, 0.9]}
    curves: dict[int, list] = {}

    def objective(trial):
        curves[trial.number] = []
        observe = reporter(trial, curves[trial.number])
        for k, v in enumerate(scripts[trial.number], 1):
            observe(10 * k, {"val_loss": 1.0, "val_metric": v})  # what training's on_validate hook passes on
        return scripts[trial.number][-1]

    study = optuna.create_study(direction="maximize", pruner=make_pruner("halving", 10))
    study.optimize(objective, n_trials=3)
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert states[2] == optuna.trial.TrialState.PRUNED
    assert curves[2] == [[10, 0.05]]  # stopped at the first rung, its later (good) values never ran
    assert study.best_trial.number == 1


def test_a_trial_past_the_budget_ends_at_its_next_validation():
    study = optuna.create_study(direction="maximize", pruner=make_pruner("none", 10))
    trial = study.ask()
    curve: list = []
    observe = reporter(trial, curve, deadline=0.0)  # long spent
    observe(5, {"val_loss": 1.0})                    # no metric in this row: nothing to report, no stop
    with pytest.raises(optuna.TrialPruned, match="budget spent at step 10"):
        observe(10, {"val_loss": 1.0, "val_metric": 0.5})
    assert curve == [[10, 0.5]]


def test_budget_and_size_aware_learning_rates():
    assert parse_budget("30m") == 1800 and parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget("45") == 2700
    with pytest.raises(LoraforgeError, match="not a duration"):
        parse_budget("soon")
    small, big = lr_range(135e6), lr_range(8e9)
    assert small[0] < 1e-3 < small[1] and big[0] < 2e-4 < big[1]  # SmolLM2-135M ~1e-3, 8B ~2e-4
    assert small[0] > 2 * big[0] and small[1] / small[0] == pytest.approx(16)


def test_tune_on_the_tiny_model_writes_trials_and_a_best_config(tiny_model, chat_file, tmp_path, capsys):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=1, eval_every=2)
    tree["data"]["validation_split"] = 0.2
    tree["eval"] = {"metric": "exact_match", "max_new_tokens": 4}
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    out = tmp_path / "tune"
    assert main(["tune", str(cfg_file), "--trials", "2", "--out", str(out), "--pruner", "none"]) == 0
    printed = capsys.readouterr().out
    assert "by trial" in printed and "train it: loraforge train" in printed
    summary = json.loads((out / "trials.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "complete"]
    first = summary["trials"][0]
    assert first["params"] == {"learning_rate": pytest.approx(5e-3), "r": 16, "dropout": pytest.approx(0.1)}  # r=4: no choice
    for t in summary["trials"]:  # each trial a normal run folder, selected by the metric
        run = out / f"trial-{t['number']:03d}"
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        s = json.loads((run / "summary.json").read_text())
        assert s["select_by"] == "metric" and s["selected_value"] == t["value"]
        assert [p[1] for p in t["curve"]] == [r["val_metric"] for r in map(json.loads, (run / "metrics.jsonl")
                                                                           .read_text().splitlines()) if "val_metric" in r]
    html = (out / "tune.html").read_text()
    assert "id='trials-table'" in html and html.count("<tr") == 3 and "<svg" in html
    best = load_config(out / "best.yaml")
    chosen = summary["trials"][summary["best"]["number"]]["params"]
    assert best.train.learning_rate == pytest.approx(chosen["learning_rate"]) and best.lora.r == chosen["r"]
    assert best.output_dir == str(out / "best") and best.train.select_by == "metric"
    assert build_config(best.model_dump(mode="json")) == best
    # `loraforge train best.yaml` reproduces the winning trial: same selected step, value and weights
    import torch
    from safetensors.torch import load_file

    assert main(["train", str(out / "best.yaml")]) == 0
    again = json.loads((out / "best" / "summary.json").read_text())
    won = summary["best"]
    assert again["selected_step"] == won["selected_step"] and again["selected_value"] == won["value"]
    trial_dir = out / f"trial-{won['number']:03d}"
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (out / "best", trial_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tune_needs_a_budget_or_trials(tiny_model, chat_file, tmp_path):
    from loraforge.tune.search import tune

    with pytest.raises(LoraforgeError, match="how long"):
        tune(build_config(tiny_config(tiny_model, chat_file, tmp_path / "r")), out=tmp_path / "t")


def _fake_train(seen: list):
    """A trial's training without training: its value peaks at learning rate 1e-3 (what the study optimises)."""
    import math

    def train_fn(cfg, tools):
        seen.append(cfg.train.learning_rate)
        value = 1.0 - abs(math.log10(cfg.train.learning_rate) + 3.0)
        return {"selected_value": value, "selected_step": 2, "steps": 4, "stopped_early": False}

    return train_fn


def _study_config(tiny_model, chat_file, tmp_path):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=1, eval_every=2)
    tree["data"]["validation_split"] = 0.2
    tree["eval"] = {"metric": "exact_match", "max_new_tokens": 4}
    return build_config(tree)


def test_resume_continues_the_study_with_new_parameters_and_adds_up_its_time(tiny_model, chat_file, tmp_path):
    from loraforge.tune.search import STUDY, tune

    cfg, out, seen = _study_config(tiny_model, chat_file, tmp_path), tmp_path / "tune", []
    first = tune(cfg, trials=3, out=out, pruner="none", train_fn=_fake_train(seen), log=lambda *_: None)
    assert (out / STUDY).is_file() and [t["number"] for t in first["trials"]] == [0, 1, 2]
    with pytest.raises(LoraforgeError, match="already exists") as e:   # not resumed, not replaced: nothing lost
        tune(cfg, trials=1, out=out, train_fn=_fake_train(seen), log=lambda *_: None)
    assert "--resume" in e.value.hint and (out / "trials.json").is_file()
    said = []
    second = tune(cfg, trials=3, out=out, pruner="none", resume=True, train_fn=_fake_train(seen), log=said.append)
    assert "3 earlier trials" in said[1]
    assert [t["number"] for t in second["trials"]] == [0, 1, 2, 3, 4, 5]
    assert [t["state"] for t in second["trials"]] == ["complete"] * 6
    assert second["trials"][:3] == first["trials"]
    assert len(set(seen)) == 6                    # the resumed sampler did not draw the first trials again
    assert second["seconds"] >= first["seconds"] and second["best"]["value"] == max(
        t["value"] for t in second["trials"])
    assert json.loads((out / "trials.json").read_text()) == second
    assert len(optuna.load_study(study_name="loraforge-tune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / STUDY)))).trials) == 6


def test_a_trial_cut_off_by_the_end_of_the_process_is_recorded_as_interrupted(tiny_model, chat_file, tmp_path):
    from loraforge.tune.search import STUDY, STUDY_NAME, tune

    cfg, out, seen = _study_config(tiny_model, chat_file, tmp_path), tmp_path / "tune", []
    tune(cfg, trials=1, out=out, pruner="none", train_fn=_fake_train(seen), log=lambda *_: None)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY)))
    # killed after suggesting its learning rate and before its rank: left running, one validation reported
    cut = optuna.load_study(study_name=STUDY_NAME, storage=storage).ask(
        {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    cut.report(0.25, 2)
    summary = tune(cfg, trials=1, out=out, pruner="none", resume=True, train_fn=_fake_train(seen),
                   log=lambda *_: None)
    states = {t["number"]: t["state"] for t in summary["trials"]}
    assert states == {0: "complete", 1: "failed", 2: "complete"}
    rec = summary["trials"][1]
    assert rec["curve"] == [[2, 0.25]] and "interrupted" in rec["note"] and set(rec["params"]) == {"learning_rate"}
    html = (out / "tune.html").read_text()
    assert "interrupted" in html and html.count("<tr") == 4   # the header and three trials
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    assert study.trials[1].state == optuna.trial.TrialState.FAIL


def test_resume_needs_the_study_and_its_config(tiny_model, chat_file, tmp_path):
    from loraforge.tune.search import tune

    cfg, out = _study_config(tiny_model, chat_file, tmp_path), tmp_path / "tune"
    with pytest.raises(LoraforgeError, match="nothing to resume"):
        tune(cfg, trials=1, out=out, resume=True, train_fn=_fake_train([]), log=lambda *_: None)
    tune(cfg, trials=1, out=out, pruner="none", train_fn=_fake_train([]), log=lambda *_: None)
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(LoraforgeError, match="another config"):
        tune(other, trials=1, out=out, resume=True, train_fn=_fake_train([]), log=lambda *_: None)


def test_the_cli_says_when_there_is_nothing_to_resume(tiny_model, chat_file, tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(_study_config(tiny_model, chat_file, tmp_path).to_yaml())
    assert main(["tune", str(cfg_file), "--trials", "1", "--resume", "--out", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "Traceback" not in err
