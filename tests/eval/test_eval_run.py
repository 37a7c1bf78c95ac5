"""`loraforge eval`: a 2-step run on the tiny model evaluated as base / few-shot base / fine-tuned, answers
streamed to results.jsonl, scores with intervals and paired tests in eval.json, bad requests as one
error before any model loads, per-example scoring failures, a failing stage that keeps what it had,
and the overfitting verdict."""

import json

import pytest
from conftest import COLORS, THINGS, chat_rows, copy_run, tiny_config, write_jsonl

from loraforge.cli import main
from loraforge.config import build_config
from loraforge.errors import LoraforgeError
from loraforge.eval.overfit import verdict
from loraforge.eval.run import evaluate_run


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    from loraforge.train.run import run_training

    d = tmp_path_factory.mktemp("evalrun")
    data = write_jsonl(d / "train.jsonl", chat_rows())
    tree = tiny_config(tiny_model, data, d / "run", max_steps=2, num_threads=1, eval_every=1)
    tree["eval"] = {"test": str(write_jsonl(d / "test.jsonl", chat_rows(5))), "max_new_tokens": 4}
    run_training(build_config(tree))
    return d / "run"


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_three_models_same_prompts_streamed_and_scored(run_dir, tmp_path):
    out = tmp_path / "ev"
    r = evaluate_run(run_dir, fewshot=2, out=out, log=lambda m: None)
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "eval.json", "report.html"}
    rows = _rows(out / "results.jsonl")
    for m in ("base", "fewshot", "finetuned"):
        assert sorted(x["index"] for x in rows if x["model"] == m) == list(range(5))
    assert {x["model"] for x in rows} >= {"regression:base", "regression:finetuned"}
    assert set(r.models) == {"base", "fewshot", "finetuned"} and r.errors == []
    for v in r.models.values():
        assert v.ci[0] <= v.value <= v.ci[1] and 0 <= v.stop_rate <= 1
    assert set(r.comparisons) == {"finetuned_vs_base", "finetuned_vs_fewshot", "regression_finetuned_vs_base"}
    assert r.decoding["do_sample"] is False and r.decoding["max_new_tokens"] == 4
    # a random tiny model never reaches its end-of-turn token in 4 tokens: reported, not hidden
    assert r.never_stopped["base"] == sum(not e["stopped"]["base"] for e in r.examples) > 0
    assert {e["outcome"] for e in r.examples} <= {"win", "loss", "tie"}
    assert r.overfit["best_step"] in (1, 2) and len(r.curves["train"]) == 2
    assert json.loads((out / "eval.json").read_text())["n"] == 5


def test_cli_eval_finetuned_only(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["eval", str(run_dir), "--limit", "2", "--no-base", "--no-regression", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "finetuned" in text and "report:" in text
    r = json.loads((out / "eval.json").read_text())
    assert list(r["models"]) == ["finetuned"] and r["n"] == 2 and r["comparisons"] == {}


def test_missing_label_set_is_one_error_before_loading(run_dir, tmp_path, capsys):
    out = tmp_path / "nolabels"
    code = main(["eval", str(run_dir), "--metric", "accuracy", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "needs the label set" in err and "Traceback" not in err
    assert not (out / "results.jsonl").exists()


def test_invalid_schema_is_one_error(run_dir, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "not-a-type"}))
    with pytest.raises(LoraforgeError, match="invalid JSON schema"):
        _eval_with(run_dir, tmp_path, schema_file=str(schema), metric="json_schema")
    assert not (tmp_path / "runcopy" / "eval" / "results.jsonl").exists()


def _eval_with(run_dir, tmp_path, **eval_fields):
    """Evaluate a copy of the run whose config carries extra eval.* fields."""
    copy = copy_run(run_dir, tmp_path / "runcopy", **eval_fields)
    return evaluate_run(copy, limit=3, regression=False, log=lambda m: None)


def test_unscorable_answers_are_per_example_failures(run_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"The {t} is {c}." for t, c in zip(THINGS, COLORS)) + "\n")
    r = _eval_with(run_dir, tmp_path, metric="accuracy", labels=str(labels))
    fails = r.models["finetuned"].details["failures"]
    assert r.errors == [] and len(fails) == 3 and "out of label set" in fails[0]["reason"]
    r = evaluate_run(run_dir, metric="json_valid", limit=2, regression=False, out=tmp_path / "j", log=lambda m: None)
    assert all("not JSON" in f["reason"] or "empty" in f["reason"]
               for f in r.models["base"].details["failures"])


def test_a_failing_stage_keeps_what_it_had(run_dir, tmp_path, monkeypatch):
    from loraforge.model import adapters

    def broken(*a, **k):
        raise RuntimeError("adapter file is corrupt")

    monkeypatch.setattr(adapters, "load_adapter", broken)
    out = tmp_path / "broken"
    r = evaluate_run(run_dir, limit=2, regression=False, out=out, log=lambda m: None)
    assert [e.stage for e in r.errors] == ["load adapter"] and "corrupt" in r.errors[0].error
    assert set(r.models) == {"base", "fewshot"}
    assert {x["model"] for x in _rows(out / "results.jsonl")} == {"base", "fewshot"}
    assert "adapter file is corrupt" in (out / "report.html").read_text()


def _rows_of(train, val=None):
    return [{"step": i + 1, "loss": t, **({"val_loss": val[i]} if val and val[i] is not None else {})}
            for i, t in enumerate(train)]


def test_overfit_verdict():
    good = verdict(_rows_of([2.0, 1.5, 1.2, 1.0, 0.9], [2.1, 1.7, 1.4, 1.2, 1.1]))
    assert good["status"] == "ok" and good["best_step"] == 5
    bad = verdict(_rows_of([1.0, 0.5, 0.3, 0.15, 0.05], [1.1, 0.9, 1.0, 1.2, 1.5]))
    assert bad["status"] == "overfitting" and bad["best_step"] == 2 and len(bad["signals"]) == 3
    assert verdict(_rows_of([0.1]))["status"] == "watch"
    assert verdict([])["status"] == "unknown"
