"""Semantic contamination and dedup (an embedder injected), length bounds, and the diversity summary's numbers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("httpx2")

sys.path.insert(0, str(Path(__file__).parent))
from stub import StubServer, default_reply, key_index  # noqa: E402

from loraforge.synth import diversity  # noqa: E402
from loraforge.synth.run import synth  # noqa: E402
from loraforge.synth.spec import build_spec  # noqa: E402

CONCEPTS = [("declined", "refused", "rejected", "bounced"), ("card",), ("supermarket", "shop", "store", "grocer"),
            ("loan", "mortgage"), ("pin", "code"), ("travel", "abroad", "holiday")]


def concept_embed(texts: list[str]) -> np.ndarray:
    """A stand-in sentence embedder: which concepts a text mentions (paraphrases land together)."""
    out = np.zeros((len(texts), len(CONCEPTS) + 1), dtype=np.float32)
    for r, t in enumerate(texts):
        words = re.findall(r"\w+", t.lower())
        for c, group in enumerate(CONCEPTS):
            out[r, c] = float(any(w in group for w in words))
        out[r, -1] = 0.1
    return out


def test_semantic_contamination_and_duplicates_caught_where_minhash_is_blind(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"messages": [{"role": "user", "content": "Why was my card declined at the "
                                              "supermarket?"}, {"role": "assistant", "content": "..."}]}) + "\n")
    prompts = {0: "The grocer's shop bounced my card, how come?",  # a paraphrase of the test question
               1: "Can I get a mortgage loan?", 2: "How would one obtain a loan for a house?",  # 2 paraphrases 1
               3: "What is my PIN code for travel abroad?", 4: "Tell me about a holiday."}

    def reply(req, key):
        kind, i = key_index(key)
        return (prompts[i], "stop") if kind == "q" else default_reply(req, key)

    with StubServer(reply=reply) as stub:
        spec = build_spec({"endpoint": {"base_url": stub.url, "model": "stub"}, "task": "Bank questions.",
                           "count": 5, "verify": {"test": [str(test)], "semantic": True, "semantic_threshold": 0.9,
                                                  "near_threshold": 0.8}})
        report = synth(spec, tmp_path / "out.jsonl", embed=concept_embed)
    assert report["reasons"] == {"test_contamination": 1, "duplicate": 1}
    rej = {r["index"]: r for r in map(json.loads, (tmp_path / "out.rejects.jsonl").read_text().splitlines())}
    assert rej[0]["reason"] == "test_contamination" and "semantic copy" in rej[0]["detail"]
    assert rej[2]["reason"] == "duplicate" and "of item 1" in rej[2]["detail"]
    emb = report["diversity"]["embedding"]
    assert emb["n"] == 3 and -1 <= emb["mean_cosine"] < emb["mean_nearest_cosine"] <= 1


def test_length_bounds_and_custom_refusal_patterns(tmp_path):
    answers = {0: "ok", 1: "x" * 50, 2: "Unfortunately our policy forbids that.", 3: "A fine, useful answer."}

    def reply(req, key):
        kind, i = key_index(key)
        return (answers[i], "stop") if kind == "a" else default_reply(req, key)

    with StubServer(reply=reply) as stub:
        spec = build_spec({"endpoint": {"base_url": stub.url, "model": "stub"}, "task": "t", "mode": "distill",
                           "prompts": ["hi there, one", "hi there, two", "hi there, three", "no"],
                           "verify": {"min_chars": 3, "max_chars": 40, "refusal_patterns": [r"policy forbids"]}})
        report = synth(spec, tmp_path / "out.jsonl", embeddings=False)
    assert report["reasons"] == {"too_short": 1, "too_long": 1, "refusal": 1, "prompt_too_short": 1}
    assert report["kept"] == 0


def test_diversity_numbers():
    d = diversity.ngram_summary(["a b c", "a b d", "x y z w", "x y z w"])
    assert d["distinct_1"] == pytest.approx(8 / 14, abs=1e-4)
    assert d["distinct_2"] == pytest.approx(6 / 10, abs=1e-4)
    assert d["openings"] == [{"opening": "x y z", "share": 0.5}]
    assert d["top_ngrams"] == [{"ngram": "x y z w", "share": 0.5}]
    cov = diversity.coverage([{"topic": "a"}, {"topic": "a"}, {"topic": "b"}], [{"topic": "a"}])
    assert cov == {"topic": {"values": {"a": {"asked": 2, "kept": 1}, "b": {"asked": 1, "kept": 0}},
                             "empty": ["b"], "covered": 0.5}}
