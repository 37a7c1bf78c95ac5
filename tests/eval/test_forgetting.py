"""The forgetting guard in `loraforge eval`: the regression set is scored for the base even with --no-base,
and a fine-tune that loses more than 5 points there is warned about in the terminal and atop report.html."""

import pytest
from conftest import chat_rows, tiny_config, write_jsonl

from loraforge.config import build_config
from loraforge.eval import regression
from loraforge.eval.run import evaluate_run


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    from loraforge.train.run import run_training

    d = tmp_path_factory.mktemp("forget")
    tree = tiny_config(tiny_model, write_jsonl(d / "train.jsonl", chat_rows()), d / "run", max_steps=1)
    tree["eval"] = {"test": str(write_jsonl(d / "test.jsonl", chat_rows(2))), "max_new_tokens": 2}
    run_training(build_config(tree))
    return d / "run"


def _scripted_rates(monkeypatch, base_passes: int, tuned_passes: int):
    """A 6-prompt regression set where the base passes `base_passes` prompts and the fine-tune `tuned_passes`
    (the tiny random model passes none for real, and never stops: 6 prompts keep the test quick)."""
    few = regression.load_prompts()[:6]
    monkeypatch.setattr(regression, "load_prompts", lambda path=None: few)
    real = regression.score_regression
    calls = iter([base_passes, tuned_passes])

    def scored(answers, prompts=None):
        n = next(calls)
        res = real(answers, prompts)
        return regression.RegressionResult([regression.CheckResult(c.id, i < n, "") for i, c in enumerate(res.checks)])

    monkeypatch.setattr(regression, "score_regression", scored)


@pytest.mark.parametrize(("tuned", "warned"), [(2, True), (3, False)])
def test_eval_warns_when_the_regression_rate_falls(run_dir, tmp_path, monkeypatch, tuned, warned):
    _scripted_rates(monkeypatch, 3, tuned)  # 3/6 = 50%; 2/6 = 33% (17 points lost) warns, 3/6 does not
    said: list[str] = []
    r = evaluate_run(run_dir, run_base=False, limit=1, out=tmp_path / "ev", log=said.append)
    f = r.forgetting
    assert f["base"] == pytest.approx(3 / 6) and f["finetuned"] == pytest.approx(tuned / 6)
    assert (f["warning"] is not None) == warned
    assert any(m.startswith("warning: forgetting") for m in said) == warned
    html = (tmp_path / "ev" / "report.html").read_text()
    assert ("id='forgetting-warning'" in html) == warned
