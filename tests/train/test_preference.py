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
    # no LoRA dropout: 4 held-out pairs of a tiny random model move with the masks' random stream alone
    tree.setdefault("lora", {})["dropout"] = 0.0
    return tree


def kto_rows(n: int = 40) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in pair_rows(n // 2) for side in ("chosen", "rejected")]


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "kto"])
def test_preference_run_raises_reward_accuracy_and_resumes_to_the_same_losses(tiny_model, tmp_path, objective):
    import shutil

    from loraforge.config import build_config
    from loraforge.train.run import run_training

    data = write_jsonl(tmp_path / "pairs.jsonl", kto_rows(40) if objective == "kto" else pair_rows(40))
    lr = {"learning_rate": 5e-3} if objective == "orpo" else {}  # its NLL term dominates at 2e-2
    ref = run_training(build_config(_pref_tree(tiny_model, data, tmp_path / "ref", objective, keep_last=10, **lr)))
    rep = ref.summary["preference"]
    assert rep["objective"] == objective and rep["base"]["examples"] == 4
    if objective in ("dpo", "kto"):  # the base's implicit reward is 0 for every example: 50% by construction
        assert rep["base"]["reward_accuracy"] == 0.5 and rep["base"]["reward_margin"] == 0.0
    rows = metrics_rows(tmp_path / "ref")
    assert rows[-1]["loss"] < rows[0]["loss"]
    if objective == "kto":  # on the training examples (its 4 held-out ones are too few to move reliably)
        assert rows[-1]["reward_accuracy"] > rows[0]["reward_accuracy"]
    else:  # chosen pulled above rejected on held-out pairs
        assert rep["tuned"]["reward_margin"] > rep["base"]["reward_margin"]
        assert rep["tuned"]["reward_accuracy"] >= rep["base"]["reward_accuracy"]
    scores = json.loads((tmp_path / "ref" / "preference_eval.json").read_text())["tuned_scores"]
    assert sum(scores) / len(scores) == pytest.approx(rep["tuned"]["reward_accuracy"])

    # resume from the checkpoint of step 3: the same losses as the uninterrupted run
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", run, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != "step-00000003":
            shutil.rmtree(ckpt)
    again = run_training(build_config(_pref_tree(tiny_model, data, run, objective, keep_last=10, **lr)), resume=True)
    assert_same_curve(metrics_rows(run), rows)
    assert again.summary["preference"]["tuned"] == pytest.approx(rep["tuned"])


def test_decoder_greedy_equals_eval_generate_and_one_prompt_at_a_time(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.templates import prompt_text
    from loraforge.eval.generate import generate_batch, stop_token_ids
    from loraforge.model.decode import decode_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    convs = [[{"role": "user", "content": f"What colour is the {t}?" + " please" * i}] for i, t in enumerate(THINGS)]
    ids = [tok(prompt_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    stops = stop_token_ids(tok, model)
    batched = decode_ids(model, ids, stops=stops, pad_id=tok.pad_token_id, max_new_tokens=8, batch_size=4)
    for i, c in zip(ids, batched):  # one prompt at a time, no padding: the same tokens
        (alone,) = decode_ids(model, [i], stops=stops, pad_id=tok.pad_token_id, max_new_tokens=8)
        assert c.ids == alone.ids and c.stopped == alone.stopped
    answers = generate_batch(model, tok, convs, max_new_tokens=8, batch_size=4)
    assert [a.text for a in answers] == [tok.decode(c.ids, skip_special_tokens=True).strip() for c in batched]
    # sampling is seeded: the same seed gives the same completions, another seed others
    kw = dict(stops=stops, pad_id=tok.pad_token_id, max_new_tokens=8, temperature=1.0, top_p=0.9)
    a, b, c = (decode_ids(model, ids, seed=s, **kw) for s in (1, 1, 2))
    assert [x.ids for x in a] == [x.ids for x in b] != [x.ids for x in c]


def test_reference_by_disabled_adapter_equals_a_separate_copy_of_the_base(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.config import LoraSection
    from loraforge.data.batching import collate
    from loraforge.data.preference import Pair, tokenize_preferences
    from loraforge.model.adapters import attach_adapter
    from loraforge.train.logprobs import reference_token_logps, row_sums, sequence_logps

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSection(r=4, alpha=8, dropout=0.1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the adapter now changes the output
    pairs = [Pair([{"role": "user", "content": r["prompt"]}], [{"role": "assistant", "content": r["chosen"]}],
                  [{"role": "assistant", "content": r["rejected"]}], f"x:{i}") for i, r in enumerate(pair_rows(4))]
    items, _ = tokenize_preferences(tok, pairs, 64, 64)
    batch = collate([s for it in items for s in it.sides()], tok.pad_token_id)
    ref, _ = row_sums(*reference_token_logps(model, batch), 8)
    with torch.no_grad():
        want, counts = sequence_logps(base, batch)
        model.eval()
        adapted, _ = sequence_logps(model, batch)
    assert ref.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    # the head applied a few logits at a time (3 rows of the tiny vocabulary): the same log-probs
    small, _ = row_sums(*reference_token_logps(model, batch, chunk=3 * model.config.vocab_size), 8)
    assert small.tolist() == pytest.approx(ref.tolist(), rel=1e-6)
    assert (adapted - want).abs().max() > 1e-2  # the adapter was on for the policy
    assert model.training is False and counts.tolist() == [s.n_loss_tokens for it in items for s in it.sides()]


def adapted(tiny_model):
    """(tokenizer, the tiny model with a LoRA adapter whose B matrices are not zero: it changes the output)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.config import LoraSection
    from loraforge.model.adapters import attach_adapter

    model = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSection(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return AutoTokenizer.from_pretrained(tiny_model), model


def test_fast_path_log_probs_equal_the_plain_path_values_and_gradients(tiny_model):
    from loraforge.data.batching import collate
    from loraforge.data.preference import Pair, tokenize_preferences
    from loraforge.model.fast import FastLlama
    from loraforge.train.logprobs import LogpStep, sequence_logps, token_logps

    tok, model = adapted(tiny_model)
    pairs = [Pair([{"role": "user", "content": r["prompt"] + " ok" * i}],
                  [{"role": "assistant", "content": r["chosen"]}], [{"role": "assistant", "content": r["rejected"]}],
                  f"x:{i}") for i, r in enumerate(pair_rows(3))]
    items, _ = tokenize_preferences(tok, pairs, 64, 64)
    batch = collate([s for it in items for s in it.sides()], tok.pad_token_id)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    grads = []
    for parts in (None, fast):
        model.zero_grad()
        sums, counts = LogpStep(model, parts)(batch)
        (sums * torch.linspace(1, 2, len(sums))).sum().backward()  # rows weighted differently
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        if parts is None:
            plain = sums.detach()
    assert sums.tolist() == pytest.approx(plain.tolist(), rel=1e-5)
    for n in grads[0]:  # equal up to 1e-5 of the largest entry (fp32 sums in another order)
        err = float((grads[1][n] - grads[0][n]).abs().max()) / float(grads[0][n].abs().max())
        assert err < 1e-5, n
    lp, rows = token_logps(model, batch, fast)
    assert rows.tolist() == sorted(rows.tolist()) and counts.tolist() == torch.bincount(rows).tolist()
    assert sequence_logps(model, batch, fast)[0].tolist() == pytest.approx(plain.tolist(), rel=1e-5)


def test_grpo_groups_sharing_their_prompt_give_the_padded_log_probs_and_gradients(tiny_model):
    from loraforge.data.prefix import MIN_TOKENS
    from loraforge.data.templates import prompt_text
    from loraforge.model.decode import Completion
    from loraforge.model.fast import FastLlama
    from loraforge.train.grpo_loop import PromptItem, completion_batch
    from loraforge.train.logprobs import token_logps

    tok, model = adapted(tiny_model)
    items = [PromptItem(tok(prompt_text(tok, [{"role": "user", "content": f"What colour is the {t}?" + " ok" * i}]),
                            add_special_tokens=False)["input_ids"], t, {}, f"x:{i}") for i, t in enumerate(THINGS[:3])]
    g = torch.Generator().manual_seed(0)   # 4 completions a prompt, of 1-6 tokens, stopped or cut off
    lengths = torch.randint(1, 7, (12,), generator=g).tolist()
    completions = [Completion(torch.randint(5, 60, (n,), generator=g).tolist(), k % 2 == 0, tok.eos_token_id)
                   for k, n in enumerate(lengths)]
    padded, owner = completion_batch(items, completions, tok.pad_token_id)
    shared, owner2 = completion_batch(items, completions, tok.pad_token_id, share=MIN_TOKENS)
    assert padded["input_ids"].shape[0] == 12 and shared["input_ids"].shape[0] == 3 and "segment_ids" in shared
    assert shared["attention_mask"].sum() < 0.6 * padded["attention_mask"].sum()   # each prompt once
    assert torch.equal(owner, owner2) and torch.bincount(owner).tolist() == \
        [len(c.ids) + c.stopped for c in completions]
    weights = torch.linspace(1, 2, len(owner))   # every token its own weight: a wrong order would show
    for parts in (None, FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")):
        grads, values, rows = [], [], []
        for batch in (padded, shared):
            model.zero_grad()
            logp, r = token_logps(model, batch, parts)
            (logp * weights).sum().backward()
            values.append(logp.detach())
            rows.append(r)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert torch.equal(rows[0], owner)   # a padded batch's rows are its completions; a shared one's are not
        assert rows[1].max() == 2
        assert values[1].tolist() == pytest.approx(values[0].tolist(), rel=1e-5, abs=1e-5)
        for n in grads[0]:
            err = float((grads[1][n] - grads[0][n]).abs().max()) / float(grads[0][n].abs().max())
            assert err < 1e-4, n


REWARD_FILE = '''
def reward(prompt, completion, **row):
    return 1.0 if row["answer"] in completion else 0.0
'''


def test_grpo_run_samples_with_the_adapter_and_resumes_to_the_same_losses(tiny_model, tmp_path):
    import shutil

    from loraforge.config import build_config
    from loraforge.train.run import run_training

    rows = [{"prompt": f"What colour is the {t}?", "answer": c} for c, t in zip(COLORS, THINGS)] * 3
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    tree = tiny_config(tiny_model, data, tmp_path / "ref", num_threads=1, epochs=1, batch_size=2, grad_accum=2,
                       learning_rate=2e-2, save_every=2, eval_every=100, keep_last=10)
    tree.update(objective="grpo", grpo={"rewards": [str(tmp_path / "rewards.py"), "normalized_match"],
                                         "group_size": 4, "max_new_tokens": 6, "kl_beta": 0.05})
    ref = run_training(build_config(tree))
    rows_ref = metrics_rows(tmp_path / "ref")
    assert len(rows_ref) == ref.summary["steps"] == 6  # 22 prompts (2 held out): 11 micro-batches of 2, 2 a step
    assert all(0 <= r["reward"] <= 2 and 0 <= r["pass_rate"] <= 1 and r["kl"] >= 0 for r in rows_ref)
    assert any(r["kl"] > 0 for r in rows_ref[1:])  # the adapter moved away from the reference
    rep = ref.summary["grpo"]
    assert rep["base"]["examples"] == rep["tuned"]["examples"] == 2
    ev = json.loads((tmp_path / "ref" / "grpo_eval.json").read_text())
    assert sum(ev["tuned_passes"]) / 2 == rep["tuned"]["pass_rate"]

    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", run, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != "step-00000002":
            shutil.rmtree(ckpt)
    tree["output_dir"] = str(run)
    run_training(build_config(tree), resume=True)
    assert_same_curve(metrics_rows(run), rows_ref)


def test_reward_builtins_and_user_file(tmp_path):
    from loraforge.train.rewards import load_rewards, score

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}))
    exact, norm, num, rx, js = load_rewards(["exact_match", "normalized_match", "numeric", "regex", "json_schema"],
                                            pattern=r"[a-z]+", schema_file=str(schema))
    assert exact("q", " blue ", answer="blue") == 1 and exact("q", "Blue", answer="blue") == 0
    assert norm("q", "Blue.", answer="blue") == 1
    assert num("q", "so it is 1,234.0 in total", answer="1234") == 1 and num("q", "no number", answer="3") == 0
    assert rx("q", "abc") == 1 and rx("q", "abc1") == 0
    assert js("q", '{"a": 1}') == 1 and js("q", '{"b": 1}') == 0 and js("q", "not json") == 0
    (tmp_path / "r.py").write_text("def mine(prompt, completion, **row):\n    return len(completion) / row['n']\n")
    (fn,) = load_rewards([f"{tmp_path / 'r.py'}:mine"])
    assert score([fn, exact], "q", "four", {"n": 8, "answer": "four"}) == 1.5
    with pytest.raises(LoraforgeError, match="raised KeyError"):
        score([fn], "q", "x", {}, "f.jsonl:3")
    with pytest.raises(LoraforgeError, match="unknown reward 'exactly'"):
        load_rewards(["exactly"])
    with pytest.raises(LoraforgeError, match="no function 'reward'"):
        load_rewards([str(tmp_path / "r.py")])


HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: I won't help.",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."}


def test_pair_formats_read_to_prompt_and_two_completions(tmp_path):
    from loraforge.data.preference import read_pairs

    msgs = [{"role": "user", "content": "Q?"}]
    rows = [HH,
            {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
            {"messages": msgs, "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": {"role": "assistant", "content": "no"}},
            {"chosen": msgs + [{"role": "assistant", "content": "yes"}],
             "rejected": msgs + [{"role": "assistant", "content": "no"}]}]
    hh, plain, listed, implicit = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows), system="Be kind.")
    assert [t["role"] for t in hh.prompt] == ["system", "user", "assistant", "user"]
    assert hh.prompt[-1]["content"] == "How do I pick a lock?"
    assert hh.chosen == [{"role": "assistant", "content": "I won't help."}]
    assert hh.rejected == [{"role": "assistant", "content": "Use a pin."}] and hh.source.endswith("p.jsonl:1")
    for p in (plain, listed, implicit):
        assert p.prompt == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q?"}]
        assert p.chosen == [{"role": "assistant", "content": "yes"}]
        assert p.rejected == [{"role": "assistant", "content": "no"}]

    kto = read_pairs(write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Q?", "completion": "yes", "label": True},
                                                        {"prompt": "Q?", "completion": "no", "label": "false"}]),
                     unpaired=True)
    assert [k.desirable for k in kto] == [True, False]


def test_pair_tokens_mask_the_prompt_and_cut_long_prompts_from_the_left(tiny_model):
    from transformers import AutoTokenizer

    from loraforge.data.preference import Pair, tokenize_completion, tokenize_preferences
    from loraforge.data.templates import IGNORE_INDEX

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [{"role": "user", "content": "What colour is the sky? " * 6}]
    t, cut = tokenize_completion(tok, prompt, [{"role": "assistant", "content": "The sky is blue."}], "x:1", 1000)
    scored = tok.decode([i for i, y in zip(t.input_ids, t.labels) if y != IGNORE_INDEX])
    assert cut == 0 and scored == "The sky is blue.<|im_end|>"
    short, cut = tokenize_completion(tok, prompt, [{"role": "assistant", "content": "The sky is blue."}], "x:1", 10)
    assert cut > 0 and short.input_ids == t.input_ids[cut:] and short.labels == t.labels[cut:]
    assert sum(y == IGNORE_INDEX for y in short.labels[:-t.n_loss_tokens - 1]) == 10  # the prompt's last 10
    pair = Pair(prompt, [{"role": "assistant", "content": "The sky is blue."}],
                [{"role": "assistant", "content": "The sky is green and blue and red and grey. " * 4}], "x:2")
    fits = Pair(prompt, pair.chosen, [{"role": "assistant", "content": "Green."}], "x:3")
    kept, report = tokenize_preferences(tok, [pair, fits], 64, 10)
    assert [k.source for k in kept] == ["x:3"] and report.too_long == ["x:2"] and report.prompts_cut == 1
    assert report.to_dict("train")["train_examples"] == 1
    with pytest.raises(LoraforgeError, match="no example of the data fits max_seq_length=20"):
        tokenize_preferences(tok, [pair], 20, 10)


def test_validate_reports_pair_problems_with_line_numbers(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from loraforge.cli import main
    from loraforge.data.preference import validate_preferences
    from loraforge.data.validate import summary_counts

    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no"},
            {"prompt": "Q?", "chosen": "same", "rejected": "same"},
            {"prompt": "Q?", "chosen": "", "rejected": "no"},
            {"prompt": "Q?", "chosen": "yes " * 80, "rejected": "no"},
            {"prompt": "Q?", "chosen": "yes"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = validate_preferences(path, AutoTokenizer.from_pretrained(tiny_model), max_seq_length=64)
    assert report.records == 5 and report.valid == 1
    assert summary_counts(report) == {"identical_sides": 1, "empty_side": 1, "too_long": 1, "missing_field": 1}
    assert report.groups["identical_sides"].examples[0].startswith(f"{path}:2: ")
    assert report.groups["empty_side"].examples[0].startswith(f"{path}:3: 'chosen' has no assistant text")
    assert report.groups["too_long"].examples[0].startswith(f"{path}:4: prompt + chosen:")
    assert main(["data", "validate", str(path), "--json"]) == 0


def test_objective_config_and_its_errors():
    from loraforge.config import load_config

    cfg = load_config(overrides=["objective=simpo", "preference.simpo_gamma=1.0", "grpo.group_size=4"])
    assert cfg.objective == "simpo" and cfg.preference.simpo_gamma == 1.0 and cfg.grpo.group_size == 4
    with pytest.raises(LoraforgeError, match="'objective'.*'sft'.*'grpo'"):
        load_config(overrides=["objective=ppo"])
    with pytest.raises(LoraforgeError, match="data.packing is for objective sft only"):
        load_config(overrides=["objective=dpo", "data.packing=true"])
    with pytest.raises(LoraforgeError, match="Did you mean 'grpo.group_size'"):
        load_config(overrides=["grpo.group_sizes=4"])
