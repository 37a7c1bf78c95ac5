"""train.replay: the base model's own answers to the shipped general instructions mixed into training,
in the configured share, the same picks for the same seed, cached in the run folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import tiny_config

from loraforge.config import build_config
from loraforge.eval.regression import load_prompts
from loraforge.train.replay import load_instructions, replay_count, replay_examples
from loraforge.train.run import run_training
from loraforge.train.selection import TaskTools


def _answers(instructions):
    return [{"id": i["id"], "prompt": i["prompt"], "answer": f"answer to {i['id']}", "stopped": True}
            for i in instructions]


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("n_task", [40, 770, 3000])
def test_replay_share_within_tolerance(share, n_task):
    ex = replay_examples(n_task, share, seed=1, answer=_answers)
    assert len(ex) == replay_count(n_task, share)
    assert len(ex) / (len(ex) + n_task) == pytest.approx(share, abs=0.5 / (n_task * (1 - share)) + 1e-9)
    assert all(e.source.startswith("replay:") and [m["role"] for m in e.messages] == ["user", "assistant"]
               for e in ex)


def test_replay_is_deterministic_by_seed_and_skips_unfinished_answers():
    ids = lambda seed, n=500: [e.source for e in replay_examples(n, 0.25, seed=seed, answer=_answers)]  # noqa: E731
    assert ids(7) == ids(7) and ids(7) != ids(8) and len(set(ids(7))) == 167
    assert len(set(ids(7, 1000))) == len(load_instructions())  # 333 needed > the set: every instruction, cycled

    def half_cut(instructions):
        return [r | {"stopped": k % 2 == 0} for k, r in enumerate(_answers(instructions))]

    ex = replay_examples(100, 0.1, seed=3, answer=half_cut)
    assert len(ex) == 11 and len({e.source for e in ex}) == 6  # 11 picks, 5 cut answers left out, cycled


def test_instructions_are_not_the_regression_prompts():
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    instructions = load_instructions()
    assert len(instructions) >= 250 and len({i["id"] for i in instructions}) == len(instructions)
    assert not {norm(i["prompt"]) for i in instructions} & {norm(p.prompt) for p in load_prompts()}


def test_training_mixes_cached_base_answers(tiny_model, chat_file, tmp_path):
    calls = []

    def generate(model, tok, convs, n):
        calls.append((len(convs), n))
        assert not hasattr(model, "peft_config")  # the base, before the adapter is attached
        return [SimpleNamespace(text=f"general answer {k}", stopped=True) for k in range(len(convs))]

    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=1, replay=0.25)
    tree["data"]["max_seq_length"] = 256  # the tiny tokenizer spends many tokens on the general instructions
    res = run_training(build_config(tree), tools=TaskTools(generate=generate))
    report = json.loads((res.run_dir / "data_report.json").read_text())
    # 48 examples, 10% validation split: 43 task examples + round(0.25 * 43 / 0.75) = 14 replay
    assert report["replay_examples"] == 14 and report["train_examples"] == 43 + 14
    cache = [json.loads(x) for x in (res.run_dir / "replay.jsonl").read_text().splitlines()]
    assert calls == [(14, 128)] and len(cache) == 14 and all(r["answer"].startswith("general answer") for r in cache)
    assert json.loads((res.run_dir / "summary.json").read_text())["replay_examples"] == 14
