"""Preference tuning on the tiny model: the losses against hand-computed values, the pair readers and
their validation, the reference by disabled adapter, the fast path's log-probs, and whole runs with resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import COLORS, THINGS, assert_same_curve, metrics_rows, tiny_config, write_jsonl
from loraforge.errors import LoraforgeError


def pair_rows(n: int = 32) -> list[dict]:
    rows = []
    for i in range(n):
        c, t = COLORS[i % len(COLORS)], THINGS[i % len(THINGS)]
        wrong = COLORS[(i + 3) % len(COLORS)]
        rows.append({"prompt": f"What colour is the {t}?", "chosen": f"The {t} is {c}.",
                     "rejected": f"The {t} is {wrong}."})
    return rows


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_ipo_orpo_simpo_kto_match_hand_computed_values():
    from loraforge.config import PreferenceSection
    from loraforge.train.objectives import dpo_loss, kto_loss, orpo_loss, pair_loss, simpo_loss

    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.5, -2.5])
    loss, wc, wr = dpo_loss(pc, pr, rc, rr, beta=0.1)
    h = [(-3.0 + 3.5) - (-4.0 + 3.5), (-5.0 + 4.0) - (-2.0 + 2.5)]  # 1.0, -1.5
    assert loss.tolist() == pytest.approx([-math.log(sig(0.1 * x)) for x in h], rel=1e-6)
    assert wc.tolist() == pytest.approx([0.05, -0.1]) and wr.tolist() == pytest.approx([-0.05, 0.05])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert ipo.tolist() == pytest.approx([(x - 5.0) ** 2 for x in h], rel=1e-6)

    mc, mr = torch.tensor([-0.5]), torch.tensor([-1.2])
    lo = (-0.5 - -1.2) - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.2)))
    orpo, _, _ = orpo_loss(mc, mr, beta=0.2)
    assert float(orpo) == pytest.approx(0.5 - 0.2 * math.log(sig(lo)), rel=1e-6)
    simpo, c, _ = simpo_loss(mc, mr, beta=2.0, gamma=0.5)
    assert float(simpo) == pytest.approx(-math.log(sig(2.0 * 0.7 - 0.5)), rel=1e-6)
    assert float(c) == pytest.approx(-1.0)
    # pair_loss: [chosen..., rejected...] summed log-probs and token counts -> the per-token means above
    pl, _, _ = pair_loss("simpo", torch.tensor([-1.0, -3.6]), torch.tensor([2, 3]), None,
                         PreferenceSection(beta=2.0, simpo_gamma=0.5))
    assert float(pl) == pytest.approx(float(simpo), rel=1e-6)

    pi, ref = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-2.5, -2.0, -1.0])
    good = torch.tensor([True, False, True])
    k, r = kto_loss(pi, ref, good, beta=0.5, w_desirable=1.0, w_undesirable=2.0)
    z = max(0.0, (0.5 - 1.0 + 0.0) / 3)  # 0: the mean reward is negative
    assert k.tolist() == pytest.approx([1 - sig(0.5 * (0.5 - z)), 2 * (1 - sig(0.5 * (z + 1.0))),
                                        1 - sig(0.5 * (0.0 - z))], rel=1e-6)
    assert r.tolist() == pytest.approx([0.25, -0.5, 0.0])


def test_grpo_advantages_are_normalised_per_group_and_the_ratio_is_clipped():
    from loraforge.train.objectives import group_advantages, grpo_loss

    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # sample std, as the GRPO paper's normalisation
    assert adv[0].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)] * 1 + [-0.5 / (s + 1e-4),
                                            0.5 / (s + 1e-4)], rel=1e-5)
    assert adv[1].tolist() == [0.0] * 4  # all equal: nothing to learn

    # two completions: row 0 (A = +1) with tokens at ratio e^0.5 and e^-0.1; row 1 (A = -1) with ratio e^-0.5
    logp = torch.tensor([0.5, -0.1, -0.5], requires_grad=True)
    old = torch.zeros(3)
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), torch.tensor([0, 0, 1]), 2, clip_eps=0.2)
    r = [math.exp(0.5), math.exp(-0.1), math.exp(-0.5)]
    want0 = -(min(r[0], 1.2) + min(r[1], max(r[1], 0.8))) / 2   # +A: the ratio is capped at 1 + eps
    want1 = -min(-r[2], -max(r[2], 0.8))                          # -A: capped at 1 - eps from below
    assert loss.tolist() == pytest.approx([want0, want1], rel=1e-6)
    assert stats["clipped"] == pytest.approx(2 / 3)
    loss.sum().backward()  # clipped tokens pass no gradient
    assert logp.grad.tolist() == pytest.approx([0.0, -r[1] / 2, 0.0], abs=1e-6)
    # the KL term (k3) is zero where policy == reference and positive elsewhere
    _, st = grpo_loss(logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), torch.tensor([0, 0, 1]), 2, 0.2,
                      ref_logp=torch.tensor([0.5, -0.1, 0.0]), kl_beta=0.1)
    d = 0.5
    assert st["kl"] == pytest.approx((math.exp(d) - d - 1) / 3, rel=1e-5)


def _pref_tree(tiny_model, data, out, objective="dpo", **train):
    tree = tiny_config(tiny_model, data, out, num_threads=1, **{"epochs": 2, "learning_rate": 2e-2, **train})
    tree["objective"] = objective
    tree["preference"] = {"beta": 0.5}
    return tree


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_preference_run_raises_reward_accuracy_and_resumes_to_the_same_losses(tiny_model, tmp_path, objective):
    import shutil

    from loraforge.config import build_config
    from loraforge.train.run import run_training

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40))
    ref = run_training(build_config(_pref_tree(tiny_model, data, tmp_path / "ref", objective, keep_last=10)))
    rep = ref.summary["preference"]
    assert rep["objective"] == objective and rep["base"]["examples"] == 4
    if objective == "dpo":  # the base's implicit reward is 0 for every pair: 50% by construction
        assert rep["base"]["reward_accuracy"] == 0.5 and rep["base"]["reward_margin"] == 0.0
    assert rep["tuned"]["reward_accuracy"] > rep["base"]["reward_accuracy"] or rep["tuned"]["reward_accuracy"] == 1
    rows = metrics_rows(tmp_path / "ref")
    assert rows[-1]["loss"] < rows[0]["loss"]
    scores = json.loads((tmp_path / "ref" / "preference_eval.json").read_text())["tuned_scores"]
    assert sum(scores) / len(scores) == pytest.approx(rep["tuned"]["reward_accuracy"])

    # resume from the checkpoint of step 3: the same losses as the uninterrupted run
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", run, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != "step-00000003":
            shutil.rmtree(ckpt)
    again = run_training(build_config(_pref_tree(tiny_model, data, run, objective, keep_last=10)), resume=True)
    assert_same_curve(metrics_rows(run), rows)
    assert again.summary["preference"]["tuned"] == pytest.approx(rep["tuned"])
