"""Structured decoding (eval.structured): whatever the weights, only a label of the set or JSON that satisfies
the schema comes out: a random tiny model on many prompts in batches, eval's constrained pass beside the plain
one, `generate --labels/--schema`, and the embedded model's real tokenizer walked with random logits."""

import json
import random

import pytest
from conftest import COLORS, THINGS, chat_rows, copy_run, write_jsonl

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from loraforge.cli import main  # noqa: E402
from loraforge.config import build_config  # noqa: E402
from loraforge.errors import LoraforgeError  # noqa: E402
from loraforge.eval.generate import generate_batch, stop_token_ids  # noqa: E402
from loraforge.eval.run import evaluate_run  # noqa: E402
from loraforge.eval.structured import Structure, compile_structure, eval_structure, mask_logits  # noqa: E402

# labels that share prefixes, hold quotes, a backslash, spaces and non-ASCII text
LABELS = ("card", "card_arrival", 'say "hi"', "back\\slash", "two words", "café ☕", "x")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour"],
          "properties": {"colour": {"enum": list(COLORS)}, "thing": {"type": "string", "maxLength": 5},
                         "n": {"type": "integer", "minimum": -3, "maximum": 40},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return model, tok


def _prompts(n: int) -> list[list[dict]]:
    rng = random.Random(0)
    return [[{"role": "user", "content": " ".join(rng.choices(THINGS + COLORS, k=rng.randint(1, 9)))}]
            for _ in range(n)]


def test_random_model_answers_only_labels(tiny):
    model, tok = tiny
    grammar = compile_structure(tok, Structure(labels=LABELS), stop_token_ids(tok, model))
    plain = generate_batch(model, tok, _prompts(6), max_new_tokens=12)
    assert not any(g.text in LABELS for g in plain)               # unconstrained, it babbles
    gens = generate_batch(model, tok, _prompts(40), max_new_tokens=24, batch_size=7, grammar=grammar)
    assert all(g.text in LABELS and g.stopped for g in gens), [g.text for g in gens if g.text not in LABELS]


def test_random_model_answers_only_schema_valid_json(tiny):
    model, tok = tiny
    grammar = compile_structure(tok, Structure(schema=SCHEMA), stop_token_ids(tok, model))
    gens = generate_batch(model, tok, _prompts(40), max_new_tokens=80, batch_size=9, grammar=grammar)
    for g in gens:
        assert g.stopped, g.text
        value = json.loads(g.text)
        jsonschema.validate(value, SCHEMA)
        assert g.text == json.dumps(value, ensure_ascii=False)       # json.dumps's own layout: ", " and ": "


def test_mask_leaves_rows_without_a_grammar_alone(tiny):
    import torch

    model, tok = tiny
    grammar = compile_structure(tok, Structure(labels=("x",)), stop_token_ids(tok, model))
    logits = torch.randn(3, model.config.vocab_size)
    before = logits.clone()
    mask_logits(logits, [None, grammar.start(), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]) == "x"[: len(tok.decode([t]))] for t in allowed)


def test_structure_chosen_from_the_eval_section(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")

    def section(**kw):
        return build_config({"eval": kw}).eval

    assert eval_structure(section(metric="accuracy", labels=str(labels)), {})[0] == Structure(labels=("a", "b"))
    assert eval_structure(section(metric="slot_f1"), {})[0] == Structure(schema={"type": "object"})
    assert eval_structure(section(metric="exact_match"), {})[0] is None
    assert eval_structure(section(metric="accuracy", labels=str(labels), constrained="off"), {})[0] is None
    assert build_config({"eval": {"constrained": True}}).eval.constrained == "on"   # YAML's bare `on`
    with pytest.raises(LoraforgeError, match="no structure"):
        eval_structure(section(metric="exact_match", constrained="on"), {})


def test_eval_reports_plain_and_constrained(tiny_run, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", chat_rows(6))
    answers = [r["messages"][-1]["content"] for r in chat_rows(6)]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(dict.fromkeys(answers + [f"The {t} is {c}." for t, c in zip(THINGS, COLORS)])))
    run = copy_run(tiny_run, tmp_path / "run", test=str(data), metric="accuracy", labels=str(labels),
                   max_new_tokens=16, run_base=False, regression=False)
    r = evaluate_run(run, log=lambda m: None)
    assert set(r.models) == {"finetuned", "finetuned_constrained"} and r.errors == []
    tuned, con = r.models["finetuned"], r.models["finetuned_constrained"]
    assert con.details["valid_rate"] == 1.0 and con.details["out_of_label_set"] == 0
    assert tuned.details["valid_rate"] == 1 - tuned.details["out_of_label_set"] / 6
    assert "finetuned_constrained_vs_finetuned" in r.comparisons
    assert r.decoding["constrained"].startswith("one of")
    html = (run / "eval" / "report.html").read_text()
    assert "structured decoding" in html and "100.0%" in html
    off = evaluate_run(run, constrained="off", out=tmp_path / "off", log=lambda m: None)
    assert set(off.models) == {"finetuned"} and off.decoding["constrained"] == "off"


def test_generate_cli_with_labels_and_schema(tiny_run, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("alpha\nbeta gamma\n")
    assert main(["generate", str(tiny_run), "what colour is the sky?", "hi", "--labels", str(labels)]) == 0
    out = capsys.readouterr().out.split("\n")
    assert [ln for ln in out if ln and not ln.startswith(">")] and \
        all(ln in ("alpha", "beta gamma") for ln in out if ln and not ln.startswith(">"))
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["generate", str(tiny_run), "colour?", "--schema", str(schema), "--max-new-tokens", "80"]) == 0
    answer = [ln for ln in capsys.readouterr().out.split("\n") if ln and not ln.startswith(">")][0]
    jsonschema.validate(json.loads(answer), SCHEMA)
    schema.write_text("{not json")
    assert main(["generate", str(tiny_run), "x", "--schema", str(schema)]) == 2
    assert "not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_real_tokenizer_random_logits_only_valid_snips_json():
    """SmolLM2's 49,152-token vocabulary, the shipped SNIPS schema, 20 answers sampled from random logits."""
    import torch

    from loraforge.datasets import __file__ as ds
    from loraforge.model.load import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base("smollm2-135m-instruct"))
    schema = json.loads((__import__("pathlib").Path(ds).parent / "snips2017" / "schema.json").read_text())
    stops = stop_token_ids(tok)
    grammar = compile_structure(tok, Structure(schema=schema), stops)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        state, ids = grammar.start(), []
        for _ in range(120):
            logits = torch.randn(1, len(tok), generator=g) * 3
            logits[0, stops] -= 4                     # let answers run a while before they may end
            mask_logits(logits, [state])
            t = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=g))
            assert state.advance(t)
            if t in stops:
                break
            ids.append(t)
        else:
            continue                                   # cut by the token budget: not an answer
        jsonschema.validate(json.loads(tok.decode(ids)), schema)


def test_too_old_llguidance_is_refused_by_name(monkeypatch):
    """llguidance 1.6.1 takes one end token only (an H100 eval failed inside it); the check names the fix."""
    import importlib.metadata

    from loraforge.eval import structured

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.6.1" if name == "llguidance" else real(name))
    with pytest.raises(LoraforgeError, match=r"llguidance >= 1\.7, found 1\.6\.1"):
        structured._llguidance()
    assert not structured.installed()   # eval.constrained=auto then decodes plainly instead of failing
    assert structured._version("1.10.0rc1") == (1, 10) and structured._version("1.7") >= structured.LLGUIDANCE_MIN
