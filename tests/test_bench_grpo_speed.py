"""bench/grpo_speed.py's CPU-side logic: one reward for both tools (loraforge's file reward and TRL's list
adapter agree), a valid loraforge GRPO config on the bench's settings, the prompts both tools read, step timing
and the ratios against #24's targets. No timings asserted."""

from __future__ import annotations

import json

import pytest
from conftest import BENCH, load_bench


@pytest.fixture(scope="module")
def gs():
    return load_bench("grpo_speed")


def test_both_tools_score_a_completion_the_same(gs):
    from loraforge.train.rewards import load_rewards, score

    ours = load_rewards([f"{BENCH / 'grpo_speed.py'}:reward"])
    counted = []
    trl = gs.trl_reward(counted)
    texts = ["  short answer\n", "x" * 5000, ""]
    got = trl(prompts=[[{"role": "user", "content": "q"}]] * 3,
              completions=[[{"role": "assistant", "content": t}] for t in texts], completion_ids=[[1, 2], [3], []])
    assert got == [score(ours, "q", t, {}, "test") for t in texts] == [12 / 4096, 1.0, 0.0]
    assert trl(prompts=["q"], completions=["abcd"], completion_ids=[[5, 6, 7]]) == [4 / 4096]
    assert counted == [2, 1, 0, 3]


@pytest.mark.parametrize("cuda", [False, True])
def test_loraforge_config_is_a_valid_grpo_run_on_the_bench_settings(gs, tmp_path, cuda):
    from loraforge.config import load_config

    spec = {"model_dir": str(tmp_path / "model"), "prompts": str(tmp_path / "p.jsonl"), "steps": 2,
            "max_completion": 1024, "max_seq_length": 1300}
    cfg = load_config(base=gs.loraforge_config(spec, tmp_path, cuda))
    assert cfg.objective == "grpo" and cfg.model.quantization == ("nf4" if cuda else "none")
    g = cfg.grpo
    assert (g.group_size, g.max_new_tokens, g.kl_beta, g.temperature) == (8, 1024, 0.0, 1.0)
    assert g.rewards[0].endswith("grpo_speed.py:reward")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_steps, cfg.train.learning_rate) == (1, 1, 2, 5e-6)


def test_prompts_are_conversational_rows_of_about_n_tokens(gs, tiny_model, tmp_path):
    path = gs.make_prompts(str(tiny_model), 3, 20, tmp_path / "prompts.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"] for r in rows)
    lengths = gs.prompt_lengths(str(tiny_model), path)
    assert len(lengths) == 3 and all(n > 10 for n in lengths)   # ~20 words' tokens plus the chat template's


def test_seconds_per_step_leave_out_the_first_step_when_there_are_more(gs):
    assert gs.step_seconds([3.0, 5.0, 8.0]) == {"seconds_per_step": 2.5, "step_seconds": [3.0, 2.0, 3.0]}
    assert gs.step_seconds([4.0]) == {"seconds_per_step": 4.0, "step_seconds": [4.0]}


def test_ratios_are_ours_over_the_peer_against_the_targets(gs):
    row = {"seconds_per_step": 40.0, "peak_reserved_gib": 10.0, "peak_allocated_gib": 8.0, "completion_tokens": 100}
    rows = [{"tool": "loraforge", **row}, {"tool": "unsloth-trl", **row, "seconds_per_step": 50.0},
            {"tool": "trl", "error": "timed out"}]
    got = gs.ratios(rows)
    assert list(got) == ["unsloth-trl"]
    assert got["unsloth-trl"]["seconds_per_step"] == 0.8 and got["unsloth-trl"]["peak_reserved_gib"] == 1.0
    assert got["unsloth-trl"]["meets_24"] is False                       # memory 1.0x > 0.8x
    rows[1]["peak_reserved_gib"] = 12.5
    assert gs.ratios(rows)["unsloth-trl"]["meets_24"] is True
