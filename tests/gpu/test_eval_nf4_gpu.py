"""On a CUDA device with bitsandbytes: `loraforge eval --serve-as adapter,merged,nf4` (through evaluate_run,
which the CLI calls) on a tiny run trained on the GPU. One row per variant over every test example, the merged
bf16 model answering as the adapter does, and the nf4 row made by a base whose linear layers really are
bitsandbytes 4-bit NF4. nf4 asked for on the CPU is one LoraforgeError: tests/eval/test_eval_variants.py
checks that in CPU CI, so it is not repeated here."""

import importlib.util
import json

import pytest
import torch

from conftest import chat_rows, tiny_config, write_jsonl
from loraforge.config import build_config, load_config
from loraforge.errors import LoraforgeError
from loraforge.eval import variants
from loraforge.eval.generate import generate_batch
from loraforge.eval.run import evaluate_run
from loraforge.model.load import load_tokenizer, resolve_base
from loraforge.train.run import run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")]

KINDS = ["adapter", "merged", "nf4"]
N = 8            # the eight colour questions of chat_rows, one each


@pytest.fixture(scope="module")
def cuda_run(tiny_model, tmp_path_factory):
    """The tiny run (hidden 64, MLP 128: every linear's in_features a multiple of 64, as bitsandbytes wants),
    trained on the GPU in bf16 until it knows its answers: trained this way on the CPU it reaches loss ~0.02
    with the top two logits >= 4 apart on every greedy step, while merged and unmerged bf16 differ by ~0.1,
    so rounding cannot flip a token."""
    root = tmp_path_factory.mktemp("nf4-run")
    data = write_jsonl(root / "train.jsonl", chat_rows())
    tree = tiny_config(tiny_model, data, root / "run", epochs=20, learning_rate=1e-2, precision="auto",
                       eval_every=10, save_every=50)
    tree["lora"].update(r=16, alpha=32, dropout=0.0)
    res = run_training(build_config(tree))
    assert res.summary["device"] == "cuda" and res.summary["precision"] == "bf16"
    return root / "run"


def test_serve_as_adapter_merged_nf4(cuda_run, tmp_path):
    rows = chat_rows(N)
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "eval"
    r = evaluate_run(cuda_run, test=test, serve_as="adapter,merged,nf4", run_base=False, regression=False,
                     out=out, log=lambda m: None)
    assert r.errors == [], r.errors
    assert r.n == N and list(r.variants) == KINDS
    var = r.variants
    ad = var["adapter"]
    assert ad.answers == [e["answers"]["finetuned"] for e in r.examples]    # adapter = the fine-tuned row
    assert ad.agreement == 1.0 and ad.vs_adapter is None
    assert ad.value >= 0.5, ad.answers                  # the run learnt (exact match on its own questions)
    for kind in KINDS:
        v = var[kind]
        assert len(v.answers) == N
        assert v.ci[0] <= v.value <= v.ci[1] and 0 <= v.stop_rate <= 1
        if kind == "adapter":
            continue
        same = sum(a == b for a, b in zip(v.answers, ad.answers))
        assert v.agreement == pytest.approx(same / N)
        c = v.vs_adapter
        assert c["n"] == N and c["diff"] == pytest.approx(v.value - ad.value)
    assert var["merged"].agreement >= 0.9, (var["merged"].answers, ad.answers)   # 16-bit merge
    nf4 = var["nf4"].agreement
    assert isinstance(nf4, float) and 0.0 <= nf4 <= 1.0

    # every variant's answers were streamed to results.jsonl, and eval.json carries the same rows
    streamed = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for kind in KINDS[1:]:
        got = {x["index"]: x["answer"] for x in streamed if x.get("model") == f"serve-as:{kind}"}
        assert got == dict(enumerate(var[kind].answers))
    saved = json.loads((out / "eval.json").read_text())["variants"]
    assert {k: saved[k]["agreement"] for k in KINDS} == {k: var[k].agreement for k in KINDS}

    # the nf4 variant's model: every decoder linear is a bitsandbytes Linear4bit holding packed NF4 bytes
    import bitsandbytes as bnb

    cfg = load_config(cuda_run / "config.yaml")
    model = variants._nf4_model(cfg, cuda_run)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quant) == 2 * 7                                # 2 layers x q, k, v, o, gate, up, down
    plain = [n for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and ".lora_" not in n and not n.endswith("lm_head")]
    assert plain == []
    for name, m in quant.items():
        w = m.weight
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and w.device.type == "cuda", name
        assert w.numel() * 2 == m.in_features * m.out_features and m.in_features % 64 == 0, name
        assert w.quant_state.quant_type == "nf4" and w.quant_state.nested, name   # NF4, double-quantised
    # ... and it is the model that wrote the nf4 row: the same prompts, batches and decoding give the same answers
    tok = load_tokenizer(resolve_base(cfg.base_model))
    again = generate_batch(model, tok, [row["messages"][:1] for row in rows], max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=cfg.eval.batch_size)
    assert [g.text for g in again] == var["nf4"].answers

    # with CUDA and bitsandbytes present, an evaluation on the CPU device still refuses nf4 with the one error
    with pytest.raises(LoraforgeError, match="needs CUDA \\+ bitsandbytes; this evaluation runs on the CPU"):
        variants.check_kinds("adapter,nf4", "cpu")
