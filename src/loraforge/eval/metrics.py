"""Scoring model answers: per-example scorers and their aggregates, chosen by name.

    from loraforge.eval.metrics import score
    result = score("macro_f1", predictions, references, labels=categories)
    result.value, result.per_example, result.details

Metrics (`available_metrics()` lists them):
  exact_match        equal after stripping surrounding whitespace
  normalized_match   equal after SQuAD normalisation (lowercase; no punctuation, articles, extra spaces)
  accuracy, macro_f1 classification against `labels=[...]`; answers outside it are wrong
  json_valid         the answer parses as JSON (a surrounding ``` fence is allowed)
  json_schema        the answer complies with `schema={...}` (jsonschema)
  field_f1           per-field precision/recall/F1 of a JSON object against a reference object
  slot_f1            micro F1 of (slot, value) pairs of JSON objects (value: the micro F1; SNIPS, ATIS)
  regex              the stripped answer fully matches `pattern=...` (`full=False`: search)
  rouge_l            ROUGE-L F-measure (rouge-score; its tokenizer keeps only ASCII letters and digits)
  bleu               corpus BLEU, 0-100 as sacrebleu reports it; per-example is sentence BLEU
A reference may be a list of alternatives where that makes sense (match, ROUGE, BLEU).

An answer that cannot be scored (not JSON, outside the label set) is a per-example failure listed
in `details["failures"]` with a reason, never an exception. A mistake in the request (unknown
metric, missing label set, invalid schema or regex) is one `LoraforgeError`. For corpus-level
metrics (macro_f1, bleu) `per_example` holds per-example correctness / sentence scores, the
quantities a bootstrap over examples can resample. `perplexity()` turns held-out loss into
perplexity. The optional packages come with `pip install 'loraforge[eval]'`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from loraforge.errors import LoraforgeError


@dataclass(frozen=True)
class MetricResult:
    """One metric over a set of answers: the aggregate and the per-example scores behind it."""

    name: str
    value: float
    per_example: list[float]
    details: dict[str, Any] = field(default_factory=dict)


class _Scored(NamedTuple):
    per_example: list[float]
    details: dict[str, Any]
    value: float | None = None  # None: the mean of per_example


_Metric = Callable[..., _Scored]
_REGISTRY: dict[str, _Metric] = {}


def _metric(name: str) -> Callable[[_Metric], _Metric]:
    def register(fn: _Metric) -> _Metric:
        _REGISTRY[name] = fn
        return fn

    return register


def available_metrics() -> list[str]:
    """Names accepted by `score`."""
    return sorted(_REGISTRY)


def score(
    metric_name: str, predictions: Sequence[str], references: Sequence[Any] | None = None, **opts: Any
) -> MetricResult:
    """Score `predictions` (model answers) against `references` with the metric named `metric_name`."""
    fn = _REGISTRY.get(metric_name)
    if fn is None:
        raise LoraforgeError(f"unknown metric {metric_name!r}", hint=f"use one of {available_metrics()}")
    preds = list(predictions)
    refs = None if references is None else list(references)
    if not preds:
        raise LoraforgeError(f"{metric_name}: no predictions to score", hint="generate answers first")
    if refs is not None and len(refs) != len(preds):
        raise LoraforgeError(
            f"{metric_name}: {len(preds)} predictions but {len(refs)} references",
            hint="pass one reference (or one list of alternatives) per prediction",
        )
    try:
        inspect.signature(fn).bind(preds, refs, **opts)
    except TypeError as e:
        raise LoraforgeError(f"{metric_name}: {e}", hint="check the metric's options") from None
    per_example, details, value = fn(preds, refs, **opts)
    mean = sum(per_example) / len(per_example)
    return MetricResult(metric_name, mean if value is None else value, per_example, details)


# --- shared helpers ------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_PUNCT = str.maketrans("", "", string.punctuation)
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_NO_PUNCT))
    return " ".join(text.split())


def parse_json(text: str) -> tuple[Any, str | None]:
    """Parse an answer as JSON; returns (value, None) or (None, reason). A ``` fence is allowed."""
    body = text.strip()
    if fenced := _FENCE.match(body):
        body = fenced.group(1).strip()
    if not body:
        return None, "empty answer"
    try:
        return json.loads(body), None
    except json.JSONDecodeError as e:
        return None, f"not JSON: {e.msg} (line {e.lineno}, column {e.colno})"


def _alternatives(reference: Any) -> list[str]:
    return [str(r) for r in reference] if isinstance(reference, (list, tuple)) else [str(reference)]


def _need_refs(name: str, references: list[Any] | None) -> list[Any]:
    if references is None:
        raise LoraforgeError(f"{name} needs references", hint="pass one reference per prediction")
    return references


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoraforgeError(
            f"this metric needs the `{package}` package, which is not installed",
            hint="pip install 'loraforge[eval]'",
        ) from None


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _fail(failures: list[dict[str, Any]], index: int, reason: str) -> float:
    failures.append({"index": index, "reason": reason})
    return 0.0


# --- string match ---------------------------------------------------------------------------------


def _match(predictions: list[str], references: list[Any], norm: Callable[[str], str]) -> _Scored:
    pairs = zip(predictions, references, strict=True)
    per = [float(any(norm(p) == norm(r) for r in _alternatives(ref))) for p, ref in pairs]
    return _Scored(per, {})


@_metric("exact_match")
def _exact_match(predictions: list[str], references: list[Any] | None) -> _Scored:
    return _match(predictions, _need_refs("exact_match", references), str.strip)


@_metric("normalized_match")
def _normalized_match(predictions: list[str], references: list[Any] | None) -> _Scored:
    return _match(predictions, _need_refs("normalized_match", references), normalize_answer)


# --- classification -------------------------------------------------------------------------------


def _classify(
    name: str, predictions: list[str], references: list[Any] | None, labels: Sequence[str] | None
) -> tuple[list[str], list[str], _Scored]:
    refs = [str(r).strip() for r in _need_refs(name, references)]
    if not labels:
        raise LoraforgeError(f"{name} needs the label set", hint="pass labels=[...] (the dataset's classes)")
    label_set = set(labels)
    unknown = sorted({r for r in refs if r not in label_set})
    if unknown:
        raise LoraforgeError(
            f"{name}: {len(unknown)} reference label(s) are not in the label set, e.g. {unknown[:3]}",
            hint="pass the full label set, or fix the references",
        )
    preds = [p.strip() for p in predictions]
    failures: list[dict[str, Any]] = []
    per = []
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        per.append(float(p == r) if p in label_set else _fail(failures, i, f"out of label set: {p[:80]!r}"))
    return preds, refs, _Scored(per, {"out_of_label_set": len(failures), "failures": failures})


@_metric("accuracy")
def _accuracy(predictions: list[str], references: list[Any] | None, labels: Sequence[str] | None = None) -> _Scored:
    return _classify("accuracy", predictions, references, labels)[2]


@_metric("macro_f1")
def _macro_f1(predictions: list[str], references: list[Any] | None, labels: Sequence[str] | None = None) -> _Scored:
    """Mean F1 over the classes that occur in the references or (inside the label set) predictions."""
    preds, refs, scored = _classify("macro_f1", predictions, references, labels)
    seen = set(refs) | set(preds)
    per_class = {}
    pairs = list(zip(preds, refs, strict=True))
    for c in (c for c in dict.fromkeys(labels or []) if c in seen):
        tp = sum(p == r == c for p, r in pairs)
        fp = sum(p == c != r for p, r in pairs)
        fn = sum(r == c != p for p, r in pairs)
        per_class[c] = _prf(tp, fp, fn) | {"support": tp + fn}
    value = sum(m["f1"] for m in per_class.values()) / len(per_class)
    return _Scored(scored.per_example, scored.details | {"per_class": per_class}, value)


# --- JSON and format ------------------------------------------------------------------------------


@_metric("json_valid")
def _json_valid(predictions: list[str], references: list[Any] | None = None) -> _Scored:
    failures: list[dict[str, Any]] = []
    per = []
    for i, p in enumerate(predictions):
        reason = parse_json(p)[1]
        per.append(1.0 if reason is None else _fail(failures, i, reason))
    return _Scored(per, {"failures": failures})


@_metric("json_schema")
def _json_schema(
    predictions: list[str], references: list[Any] | None = None, schema: dict[str, Any] | bool | None = None
) -> _Scored:
    jsonschema = _require("jsonschema", "jsonschema")
    if schema is None or not isinstance(schema, (dict, bool)):
        raise LoraforgeError("json_schema needs schema={...}", hint="pass a JSON Schema as a dict")
    validator_cls = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise LoraforgeError(f"invalid JSON schema: {e.message}", hint="fix the schema document") from None
    validator = validator_cls(schema)
    failures: list[dict[str, Any]] = []
    per = []
    for i, p in enumerate(predictions):
        value, reason = parse_json(p)
        if reason is None and (error := jsonschema.exceptions.best_match(validator.iter_errors(value))):
            reason = f"schema: {error.message} at {error.json_path}"
        per.append(1.0 if reason is None else _fail(failures, i, reason))
    return _Scored(per, {"failures": failures})


def flatten_fields(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become dotted paths: {"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            out.update(flatten_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_value(a: Any, b: Any, normalize: bool) -> bool:
    if normalize and isinstance(a, str) and isinstance(b, str):
        return normalize_answer(a) == normalize_answer(b)
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _reference_object(index: int, reference: Any) -> dict[str, Any]:
    value, reason = parse_json(reference) if isinstance(reference, str) else (reference, None)
    if reason is not None or not isinstance(value, dict):
        raise LoraforgeError(
            f"field_f1: reference {index} is not a JSON object ({reason or type(value).__name__})",
            hint="references must be dicts or JSON object strings",
        )
    return flatten_fields(value)


@_metric("field_f1")
def _field_f1(predictions: list[str], references: list[Any] | None, normalize: bool = False) -> _Scored:
    """Per example: F1 of correct fields. Details: micro P/R/F1 and P/R/F1 per (dotted) field."""
    refs = [_reference_object(i, r) for i, r in enumerate(_need_refs("field_f1", references))]
    failures: list[dict[str, Any]] = []
    counts: dict[str, list[int]] = {}  # field -> [tp, fp, fn]
    per = []
    for i, (p, ref) in enumerate(zip(predictions, refs, strict=True)):
        value, reason = parse_json(p)
        if reason is None and not isinstance(value, dict):
            reason = f"expected a JSON object, got {type(value).__name__}"
        pred = flatten_fields(value) if reason is None else {}
        correct = {k for k in pred.keys() & ref.keys() if _same_value(pred[k], ref[k], normalize)}
        for k in pred.keys() | ref.keys():
            c = counts.setdefault(k, [0, 0, 0])
            c[0] += k in correct
            c[1] += k in pred and k not in correct
            c[2] += k in ref and k not in correct
        f1 = 2 * len(correct) / (len(pred) + len(ref)) if pred or ref else 1.0
        per.append(f1 if reason is None else _fail(failures, i, reason))
    micro = _prf(*(sum(c[j] for c in counts.values()) for j in range(3)))
    per_field = {k: _prf(*c) | {"support": c[0] + c[2]} for k, c in sorted(counts.items())}
    return _Scored(per, {"micro": micro, "per_field": per_field, "failures": failures})


def _slot_pairs(obj: dict[str, Any]) -> Counter:
    """(field, value) pairs of a flattened object; a list value gives one pair per item (repeated slots)."""
    pairs: Counter = Counter()
    for k, v in obj.items():
        for item in v if isinstance(v, list) else [v]:
            pairs[(k, item.strip() if isinstance(item, str) else json.dumps(item, sort_keys=True))] += 1
    return pairs


@_metric("slot_f1")
def _slot_f1(predictions: list[str], references: list[Any] | None) -> _Scored:
    """Micro F1 over (slot, value) pairs, as slot-filling benchmarks (SNIPS, ATIS) report it: a predicted
    pair is right only with the exact text. Per example: its own F1. Details: micro P/R/F1, per slot,
    and per-example [tp, fp, fn] counts (`counts`), from which a bootstrap recomputes the micro F1."""
    refs = [_slot_pairs(_reference_object(i, r)) for i, r in enumerate(_need_refs("slot_f1", references))]
    failures: list[dict[str, Any]] = []
    counts, per, per_slot = [], [], {}
    for i, (p, ref) in enumerate(zip(predictions, refs, strict=True)):
        value, reason = parse_json(p)
        if reason is None and not isinstance(value, dict):
            reason = f"expected a JSON object, got {type(value).__name__}"
        pred = _slot_pairs(flatten_fields(value)) if reason is None else Counter()
        hit = pred & ref
        tp, fp, fn = sum(hit.values()), sum((pred - ref).values()), sum((ref - pred).values())
        counts.append([tp, fp, fn])
        for j, part in enumerate((hit, pred - ref, ref - pred)):
            for (slot, _), n in part.items():
                per_slot.setdefault(slot, [0, 0, 0])[j] += n
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        per.append(f1 if reason is None else _fail(failures, i, reason))
    micro = _prf(*(sum(c[j] for c in counts) for j in range(3)))
    per_field = {k: _prf(*c) | {"support": c[0] + c[2]} for k, c in sorted(per_slot.items())}
    return _Scored(per, {"micro": micro, "per_field": per_field, "counts": counts, "failures": failures},
                   micro["f1"])


@_metric("regex")
def _regex(
    predictions: list[str], references: list[Any] | None = None, pattern: str | None = None, full: bool = True
) -> _Scored:
    if not pattern:
        raise LoraforgeError("regex needs pattern=...", hint="pass the format the answer must match")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise LoraforgeError(f"invalid regex {pattern!r}: {e}", hint="fix the pattern") from None
    match = compiled.fullmatch if full else compiled.search
    return _Scored([float(match(p.strip()) is not None) for p in predictions], {"pattern": pattern})


# --- overlap metrics (optional packages) ----------------------------------------------------------


@_metric("rouge_l")
def _rouge_l(predictions: list[str], references: list[Any] | None, use_stemmer: bool = False) -> _Scored:
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    refs = _need_refs("rouge_l", references)
    per = [scorer.score_multi(_alternatives(r), p)["rougeL"].fmeasure for p, r in zip(predictions, refs, strict=True)]
    return _Scored(per, {})


@_metric("bleu")
def _bleu(predictions: list[str], references: list[Any] | None, tokenize: str = "13a") -> _Scored:
    metrics = _require("sacrebleu.metrics", "sacrebleu")
    refs = [_alternatives(r) for r in _need_refs("bleu", references)]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
    corpus = metrics.BLEU(tokenize=tokenize).corpus_score(predictions, streams)
    sentence = metrics.BLEU(tokenize=tokenize, effective_order=True)
    per = [sentence.sentence_score(p, r).score for p, r in zip(predictions, refs, strict=True)]
    details = {"precisions": list(corpus.precisions), "bp": corpus.bp, "signature": str(corpus)}
    return _Scored(per, details, corpus.score)


# --- held-out loss --------------------------------------------------------------------------------


def perplexity(losses: float | Sequence[float], token_counts: Sequence[int] | None = None) -> float:
    """exp(mean token negative log-likelihood, natural log).

    Pass one already-averaged loss, or per-batch mean losses with the number of target tokens in
    each batch (`token_counts`) so that batches weigh by their tokens. Overflow gives inf.
    """
    values = [float(losses)] if isinstance(losses, (int, float)) else [float(x) for x in losses]
    weights = [1] * len(values) if token_counts is None else list(token_counts)
    if not values or len(weights) != len(values) or sum(weights) <= 0 or min(weights) < 0:
        raise LoraforgeError(
            f"perplexity needs losses with matching non-negative token counts ({len(values)} vs {len(weights)})",
            hint="pass one token count per loss, with at least one token in total",
        )
    mean = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf
