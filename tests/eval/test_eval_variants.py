"""`loraforge eval --serve-as`: the tiny run's adapter evaluated as served (base + adapter, merged bf16,
GGUF f16 / q8_0 / q4_k_m through llama.cpp) on the same prompts, one row each with interval, paired test
and agreement against the adapter; nf4 on the CPU is one clear error; and a published reference result
shown beside ours."""

from __future__ import annotations

import json

import pytest
from conftest import chat_rows, write_jsonl

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.eval.run import evaluate_run, parse_reference

pytest.importorskip("llama_cpp")

KINDS = ["adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("variants") / "test.jsonl", chat_rows(8))


@pytest.fixture(scope="module")
def result(tiny_run, test_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev")
    r = evaluate_run(tiny_run, test=test_file, serve_as="merged,gguf-f16,gguf-q8_0,gguf-q4_k_m", run_base=False,
                     regression=False, metric="rouge_l", out=out, log=lambda m: None)
    return r, out


def test_one_row_per_variant_against_the_adapter(result):
    r, out = result
    assert r.errors == [] and list(r.variants) == KINDS
    var = r.variants
    adapter = var["adapter"]
    assert adapter.answers == [e["answers"]["finetuned"] for e in r.examples]   # adapter = the fine-tuned row
    assert adapter.agreement == 1.0 and adapter.vs_adapter is None
    for kind in KINDS[1:]:
        v = var[kind]
        same = sum(a == b for a, b in zip(v.answers, adapter.answers))
        assert v.agreement == pytest.approx(same / 8)
        assert v.ci[0] <= v.value <= v.ci[1] and 0 <= v.stop_rate <= 1
        c = v.vs_adapter
        assert c["n"] == 8 and c["diff"] == pytest.approx(v.value - adapter.value)
        assert c["ci"][0] <= c["diff"] <= c["ci"][1] + 1e-12
    # ROUGE-L against the references moves with the answers: a variant's score differs where its answers do
    for kind in KINDS[1:]:
        v = var[kind]
        diffs = [a != b for a, b in zip(v.answers, adapter.answers)]
        if not any(diffs):
            assert v.value == adapter.value and v.vs_adapter["p_bootstrap"] == 1.0
    assert var["gguf-q4_k_m"].vs_adapter["diff"] != 0.0
    # f16 GGUF in llama.cpp follows the float32 adapter closely on the tiny model (same template, greedy)
    assert var["gguf-f16"].agreement >= 0.75
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for kind in KINDS[1:]:
        got = {x["index"]: x["answer"] for x in rows if x["model"] == f"serve-as:{kind}"}
        assert got == dict(enumerate(var[kind].answers))
    assert (out / "serve-as" / "gguf-q8_0" / "Modelfile").is_file()
    html = (out / "report.html").read_text()
    assert "id='variants-table'" in html and all(f"<td>{k}</td>" in html for k in KINDS)


def test_resumed_variants_are_not_exported_again(tiny_run, test_file, result):
    import shutil

    r, out = result
    shutil.rmtree(out / "serve-as")
    again = evaluate_run(tiny_run, test=test_file, serve_as="gguf-q8_0", run_base=False, regression=False,
                         metric="rouge_l", out=out, resume=True, log=lambda m: None)
    assert again.resumed_rows == 16 and not (out / "serve-as").exists()
    assert again.variants["gguf-q8_0"] == r.variants["gguf-q8_0"]


def test_nf4_on_cpu_and_unknown_variants_are_one_error(tiny_run, test_file, tmp_path, capsys):
    with pytest.raises(LoraforgeError, match="needs CUDA \\+ bitsandbytes"):
        evaluate_run(tiny_run, test=test_file, serve_as="nf4", out=tmp_path / "a", log=lambda m: None)
    assert not (tmp_path / "a").exists()
    code = main(["eval", str(tiny_run), "--test", str(test_file), "--serve-as", "merged,fp8", "--out",
                 str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "fp8" in err and "gguf-q8_0" in err and "Traceback" not in err


def test_reference_row_beside_ours(tiny_run, test_file, tmp_path, capsys):
    ref = "Casanueva et al. 2020 best classifiers (full data): 93.0%"
    out = tmp_path / "ref"
    assert main(["eval", str(tiny_run), "--test", str(test_file), "--limit", "2", "--no-base", "--no-regression",
                 "--reference", ref, "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["reference"] == {"text": ref, "value": pytest.approx(0.93)}
    html = (out / "report.html").read_text()
    table = html[html.index("id='metric-table'"):]
    table = table[:table.index("</table>")]
    assert "fine-tuned" in table and f"reference: {ref}" in table and "0.930" in table


def test_parse_reference():
    assert parse_reference("Paper X: 93.0%", "accuracy")["value"] == pytest.approx(0.93)
    assert parse_reference("Paper Y (2021): 0.871 macro-F1", "macro_f1")["value"] == pytest.approx(0.871)
    assert parse_reference("Paper Z: BLEU 27.3", "bleu")["value"] == pytest.approx(27.3)
    assert parse_reference("a strong baseline", "accuracy") == {"text": "a strong baseline", "value": None}
    assert parse_reference(None, "accuracy") is None


def test_quickstart_passes_the_banking77_reference():
    from loraforge import quickstart

    assert parse_reference(quickstart.REFERENCE, "exact_match")["value"] == pytest.approx(0.93)
    assert "Casanueva" in quickstart.REFERENCE
