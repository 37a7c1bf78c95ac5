"""How varied the kept examples are: n-gram repetition, topic coverage, embedding spread.

  distinct_n      unique word n-grams / all word n-grams of the user messages (1.0: nothing repeats)
  top_ngrams      the word 4-grams found in most messages, with the share of messages holding each
  openings        the most common first three words (one template repeated shows up here first)
  coverage        per diversity axis (topic, persona, difficulty): asked vs kept, and values left empty
  embedding       mean cosine similarity between messages and to the nearest other one (the
                  `semantic` extra; lower mean = more spread)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
AXES = ("topic", "persona", "difficulty")
SPREAD_SAMPLE = 2000  # messages the embedding spread is measured on (the first ones; n^2 similarities)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[k:k + n]) for k in range(len(words) - n + 1)]


def ngram_summary(texts: list[str], top: int = 10) -> dict:
    words = [_WORD.findall(t.casefold()) for t in texts]
    out: dict = {}
    for n in (1, 2, 3):
        grams = [g for w in words for g in _ngrams(w, n)]
        out[f"distinct_{n}"] = round(len(set(grams)) / len(grams), 4) if grams else None
    held = Counter(g for w in words for g in set(_ngrams(w, 4)))
    out["top_ngrams"] = [{"ngram": " ".join(g), "share": round(c / len(texts), 4)}
                         for g, c in held.most_common(top) if c > 1]
    openings = Counter(" ".join(w[:3]) for w in words if w)
    out["openings"] = [{"opening": o, "share": round(c / len(texts), 4)} for o, c in openings.most_common(top) if c > 1]
    return out


def coverage(asked: list[dict], kept: list[dict]) -> dict:
    """Per axis: {value: {"asked": n, "kept": n}}, and the values none of whose examples survived."""
    out = {}
    for axis in AXES:
        a = Counter(p[axis] for p in asked if axis in p)
        if not a:
            continue
        k = Counter(p[axis] for p in kept if axis in p)
        out[axis] = {"values": {v: {"asked": a[v], "kept": k[v]} for v in sorted(a)},
                     "empty": sorted(v for v in a if not k[v]),
                     "covered": round(sum(1 for v in a if k[v]) / len(a), 4)}
    return out


def embedding_spread(texts: list[str], embed: Callable | None) -> dict | None:
    if len(texts) < 2:
        return None
    texts = texts[:SPREAD_SAMPLE]
    vecs = np.asarray(embed(texts), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sims = vecs @ vecs.T
    n = len(texts)
    np.fill_diagonal(sims, np.nan)
    return {"mean_cosine": round(float(np.nanmean(sims)), 4),
            "mean_nearest_cosine": round(float(np.nanmax(sims, axis=1).mean()), 4), "n": n}


def summary(prompts: list[str], asked: list[dict], kept: list[dict], embed: Callable | None = None) -> dict:
    out = {"examples": len(prompts), **ngram_summary(prompts), "coverage": coverage(asked, kept)}
    out["embedding"] = embedding_spread(prompts, embed) if embed is not None else None
    return out
