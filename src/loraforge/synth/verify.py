"""Verify generated examples before anything trains on them; every reject keeps its reason.

Checks, in this order (the first that fails names the reject):
  request_failed       the request failed for good after the client's retries (a rerun asks again)
  truncated            the endpoint stopped at max_tokens (finish_reason "length")
  not_json / schema_invalid   output.format json: the answer parses and satisfies the JSON Schema
  <kind from checks.py> the record checks `loraforge data validate` runs (empty turns, roles, ...)
  too_short / too_long / prompt_too_short   character bounds
  refusal              the answer refuses ("As an AI ...", "I can't help with ...")
  test_contamination   exact / near (MinHash) / semantic copy of a record of verify.test
  train_overlap        the same against verify.train
  duplicate            exact / near / semantic copy of an earlier kept example of this set
  judge_low / judge_error   the optional LLM judge scored it under the threshold, or could not
Exact and near copies use data/dedup.py (normalised text hash, MinHash LSH), semantic ones
data/semantic.py; records are judged in index order and the first of a cluster is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from loraforge.data.checks import first_error
from loraforge.data.dedup import NearIndex, normalise_text, similarity_text
from loraforge.data.formats import Example, ReadOptions, normalise
from loraforge.data.semantic import load_embedder, semantic_duplicates
from loraforge.data.validate import Tally, iter_valid
from loraforge.errors import LoraforgeError
from loraforge.synth.generate import Outcome
from loraforge.synth.prompts import TEMPLATE_HASH, parse_json_answer
from loraforge.synth.spec import Spec, Verify

REFUSALS = (
    r"\bas an ai(?: language model| assistant)?\b",
    r"\bi(?: am|'m) (?:sorry|afraid),? but\b",
    r"\bi (?:can(?:no|')t|cannot|am unable to|'m unable to|won't|will not) (?:help|assist|provide|comply"
    r"|do that|fulfil|fulfill|answer)",
    r"\bi'?m not able to (?:help|assist|provide)",
    r"\bagainst (?:my|the) (?:guidelines|policy|policies|programming)\b",
)


@dataclass
class Candidate:
    index: int
    record: dict | None            # the output record (None when there is none to write)
    provenance: dict
    reason: str | None = None      # set when rejected
    detail: str = ""
    compare: str = ""              # the text dedup and contamination compare
    judge_score: float | None = None


@dataclass
class Verdicts:
    kept: list[Candidate] = field(default_factory=list)
    rejected: list[Candidate] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    references: dict = field(default_factory=dict)        # "train"/"test" -> records indexed
    judge_scores: list[float] = field(default_factory=list)

    def reject(self, c: Candidate, reason: str, detail: str = "") -> None:
        c.reason, c.detail = reason, detail
        self.reasons[reason] += 1


def provenance(spec: Spec, o: Outcome) -> dict:
    last = o.entries[-1] if o.entries else {}
    return {"key": last.get("key"), "model": last.get("model") or spec.endpoint.model, "template": TEMPLATE_HASH,
            "seed": last.get("seed"), "time": last.get("time"), "spec": spec.generation_hash(), "mode": spec.mode,
            "index": o.item.index, **o.item.slot.to_dict(), **({"source": o.item.source} if o.item.source else {})}


def compare_text(messages: list[dict], how: str) -> str:
    if how == "prompt":
        return "\n".join(t["content"] for t in messages if t["role"] == "user")
    return similarity_text(Example(messages, ""))


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(normalise_text(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def build(spec: Spec, o: Outcome, v: Verdicts, validator) -> Candidate:
    """The candidate record of one outcome, rejected already when a per-record check fails."""
    c = Candidate(o.item.index, None, provenance(spec, o))
    if o.failed:
        v.reject(c, "request_failed", f"{o.failed[0]}: {o.failed[1]}")
        return c
    answer = o.answer or ""
    if o.truncated:
        v.reject(c, "truncated", "the endpoint stopped at endpoint.max_tokens (finish_reason 'length')")
    elif spec.output.format == "json":
        value, why = parse_json_answer(answer)
        if why:
            v.reject(c, "not_json", why)
        else:
            errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
            if errors:
                where = "/".join(map(str, errors[0].path)) or "(top)"
                v.reject(c, "schema_invalid", f"at {where}: {errors[0].message}"[:300])
            answer = json.dumps(value, ensure_ascii=False)
    messages = ([{"role": "system", "content": spec.output.system_prompt}] if spec.output.system_prompt else [])
    messages += [{"role": "user", "content": o.prompt or ""}, {"role": "assistant", "content": answer}]
    c.record = {"messages": messages}
    label = o.item.label if spec.mode == "rewrite" and spec.keep_answer else None
    if spec.answer == "topic" or label is not None:
        c.record["label"] = label or o.item.slot.topic
    c.record["provenance"] = c.provenance
    c.compare = compare_text(messages, spec.verify.compare)
    if c.reason:
        return c
    where = f"item {o.item.index}"
    _, problems = normalise(c.record, "messages", where)
    err = first_error(problems)
    for p in problems:
        if p is not err and p.severity == "warning":
            v.warnings[p.kind] += 1
    if err is not None:
        v.reject(c, err.kind, err.message)
    return c


def length_and_refusal(c: Candidate, vs: Verify, refusal: re.Pattern | None, v: Verdicts) -> None:
    answer, prompt = c.record["messages"][-1]["content"], c.record["messages"][-2]["content"]
    if len(answer.strip()) < vs.min_chars:
        v.reject(c, "too_short", f"answer has {len(answer.strip())} characters, under verify.min_chars={vs.min_chars}")
    elif len(answer) > vs.max_chars:
        v.reject(c, "too_long", f"answer has {len(answer)} characters, over verify.max_chars={vs.max_chars}")
    elif len(prompt.strip()) < vs.min_prompt_chars:
        v.reject(c, "prompt_too_short", f"user message has {len(prompt.strip())} characters, under "
                 f"verify.min_prompt_chars={vs.min_prompt_chars}")
    elif refusal is not None and (m := refusal.search(answer)):
        v.reject(c, "refusal", f"the answer refuses: {m.group(0)!r}")


def reference_texts(paths: list[str], how: str) -> list[tuple[str, str]]:
    """(where, compare text) of every valid record of the user's files."""
    out = []
    for path in paths:
        for ex in iter_valid(path, ReadOptions(), Tally(str(path)), None):
            out.append((ex.source, compare_text(ex.messages, how)))
    return out


def copies(cands: list[Candidate], vs: Verify, v: Verdicts, embed: Callable | None) -> None:
    """Contamination, train overlap and duplicates within the set: exact, near, then semantic."""
    refs = {"test": reference_texts(vs.test, vs.compare), "train": reference_texts(vs.train, vs.compare)}
    v.references = {k: len(r) for k, r in refs.items()}
    reason_of = {"test": "test_contamination", "train": "train_overlap"}
    exact: dict[bytes, tuple[str, str]] = {}
    ref_near = NearIndex(vs.contamination_threshold)
    for name in ("train", "test"):  # test last: a record in both files counts as contamination
        for where, text in refs[name]:
            exact[_text_key(text)] = (name, where)
            ref_near.insert((name, where), ref_near.signature(text))
    own_near = NearIndex(vs.near_threshold) if vs.dedup else None
    survivors = []
    for c in cands:
        key = _text_key(c.compare)
        hit = exact.get(key)
        if hit is not None:
            v.reject(c, reason_of.get(hit[0], "duplicate"), f"exact copy of {hit[1]}")
            continue
        sig = ref_near.signature(c.compare)
        hits = ref_near.query(sig)
        if hits:
            test_hits = [h for h in hits if h[0][0] == "test"]
            (name, where), sim = (test_hits or hits)[0]
            v.reject(c, reason_of[name], f"near copy (MinHash Jaccard {sim:.2f}) of {where}")
            continue
        if own_near is not None:
            own = own_near.query(sig)  # signatures do not depend on the threshold
            if own:
                v.reject(c, "duplicate", f"near copy (MinHash Jaccard {own[0][1]:.2f}) of item {own[0][0]}")
                continue
            own_near.insert(c.index, sig)
            exact[key] = ("set", f"item {c.index}")
        survivors.append(c)
    if vs.semantic and survivors:
        _semantic(survivors, refs, vs, v, embed, reason_of)


def _semantic(cands: list[Candidate], refs: dict, vs: Verify, v: Verdicts, embed: Callable | None,
              reason_of: dict) -> None:
    embed = embed or load_embedder()
    vecs = np.asarray(embed([c.compare for c in cands]), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    alive = np.ones(len(cands), dtype=bool)
    for name in ("test", "train"):
        if not refs[name]:
            continue
        rv = np.asarray(embed([t for _, t in refs[name]]), dtype=np.float32)
        rv /= np.maximum(np.linalg.norm(rv, axis=1, keepdims=True), 1e-12)
        sims = vecs @ rv.T
        for k in np.flatnonzero(alive & (sims.max(axis=1) >= vs.semantic_threshold)):
            j = int(sims[k].argmax())
            v.reject(cands[k], reason_of[name], f"semantic copy (cosine {sims[k, j]:.3f}) of {refs[name][j][0]}")
            alive[k] = False
    if vs.dedup:
        idx = np.flatnonzero(alive)
        dups = semantic_duplicates([cands[k].compare for k in idx], vs.semantic_threshold, lambda _: vecs[idx])
        for k, (j, score) in dups.items():
            v.reject(cands[idx[k]], "duplicate", f"semantic copy (cosine {score:.3f}) of item {cands[idx[j]].index}")


def verify(spec: Spec, outcomes: list[Outcome], *, embed: Callable | None = None,
           judge_step: Callable | None = None) -> Verdicts:
    """Every outcome kept or rejected with a reason (see the module docstring)."""
    vs, v = spec.verify, Verdicts()
    validator = None
    if spec.output.format == "json":
        import jsonschema

        validator = jsonschema.validators.validator_for(spec.output.json_schema)(spec.output.json_schema)
    cands = [build(spec, o, v, validator) for o in outcomes]
    if vs.enabled:
        refusal = None
        if vs.refusals or vs.refusal_patterns:
            try:
                refusal = re.compile("|".join([*(REFUSALS if vs.refusals else ()), *vs.refusal_patterns]),
                                     re.IGNORECASE)
            except re.error as e:
                raise LoraforgeError(f"verify.refusal_patterns has a bad regular expression: {e}") from None
        for c in cands:
            if c.reason is None:
                length_and_refusal(c, vs, refusal, v)
        copies([c for c in cands if c.reason is None], vs, v, embed)
        if vs.judge is not None and judge_step is not None:
            judge_step([c for c in cands if c.reason is None], v)
    for c in cands:
        (v.rejected if c.reason else v.kept).append(c)
    return v

