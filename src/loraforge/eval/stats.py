"""Uncertainty and significance for per-example scores (numpy; scipy is used when installed).

    from loraforge.eval.stats import bootstrap_ci, paired_test
    low, high = bootstrap_ci(result.per_example)                  # 95% percentile bootstrap CI of the mean
    cmp = paired_test(tuned.per_example, base.per_example)       # same prompts, same order
    cmp.diff, cmp.ci, cmp.p_bootstrap, cmp.p_mcnemar

`paired_test` resamples prompts (not models), so it accounts for both models seeing the same
questions. When both score lists are 0/1 it also gives the exact McNemar test on the discordant
pairs. Everything is deterministic given `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loraforge.errors import LoraforgeError

DEFAULT_SEED = 0
_MAX_ELEMENTS = 1 << 22  # resampled indices held at once; bounds memory for large eval sets


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise LoraforgeError(f"{name}: need a non-empty flat list of per-example scores")
    if not np.isfinite(arr).all():
        raise LoraforgeError(f"{name}: per-example scores contain NaN or inf", hint="drop or fix those examples")
    return arr


def _check_settings(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise LoraforgeError(
            f"bootstrap needs n_resamples >= 1 and 0 < confidence < 1 (got {n_resamples}, {confidence})"
        )


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` resamples of x with replacement, computed in vectorised chunks."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_ELEMENTS // x.size)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return means


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    per_example: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95, seed: int = DEFAULT_SEED
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `per_example`."""
    x = _scores(per_example, "bootstrap_ci")
    _check_settings(n_resamples, confidence)
    return _percentile_interval(_bootstrap_means(x, n_resamples, seed), confidence)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    `a_only`: examples model A got right and B wrong; `b_only`: the reverse. Under the null each
    discordant pair is a fair coin, so p = P(Binomial(n, 1/2) as extreme as observed).
    """
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be non-negative")
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    try:
        from scipy.stats import binomtest
    except ImportError:
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / float(2**n))
    return float(binomtest(k, n, 0.5).pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """Model A vs model B on the same examples; `diff` = mean_a - mean_b."""

    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci: tuple[float, float]  # bootstrap CI of diff
    p_bootstrap: float  # two-sided paired bootstrap p-value for diff == 0
    p_mcnemar: float | None  # exact McNemar, only when both score lists are 0/1
    discordant: tuple[int, int] | None  # (A right & B wrong, B right & A wrong), binary scores only


def paired_test(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> PairedComparison:
    """Paired bootstrap (and, for binary scores, exact McNemar) test of A vs B on the same prompts.

    The bootstrap p-value is the share of resampled mean differences at least as far from the
    observed difference as the observed difference is from zero (the shifted null of Koehn 2004 /
    Berg-Kirkpatrick et al. 2012), with add-one smoothing so it is never exactly zero.
    """
    a, b = _scores(scores_a, "paired_test (A)"), _scores(scores_b, "paired_test (B)")
    if a.size != b.size:
        raise LoraforgeError(
            f"paired_test: {a.size} scores for A but {b.size} for B",
            hint="score both models on the same prompts, in the same order",
        )
    _check_settings(n_resamples, confidence)
    d = a - b
    observed = float(d.mean())
    means = _bootstrap_means(d, n_resamples, seed)
    extreme = int(np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12))
    p_mcnemar, discordant = None, None
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        discordant = (int(np.count_nonzero(d > 0)), int(np.count_nonzero(d < 0)))
        p_mcnemar = mcnemar_exact(*discordant)
    return PairedComparison(
        n=int(a.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        diff=observed,
        ci=_percentile_interval(means, confidence),
        p_bootstrap=(extreme + 1) / (n_resamples + 1),
        p_mcnemar=p_mcnemar,
        discordant=discordant,
    )


def bootstrap_micro_f1_ci(
    counts: Sequence[Sequence[int]], n_resamples: int = 1000, confidence: float = 0.95, seed: int = DEFAULT_SEED
) -> tuple[float, float]:
    """Percentile bootstrap CI of a micro F1 = 2 TP / (2 TP + FP + FN) from per-example [tp, fp, fn] counts:
    examples are resampled and the F1 recomputed from the summed counts (not a mean of per-example F1s)."""
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] == 0:
        raise LoraforgeError("bootstrap_micro_f1_ci: need one [tp, fp, fn] row per example")
    _check_settings(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    f1 = np.empty(n_resamples)
    rows = max(1, _MAX_ELEMENTS // c.shape[0])
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        tp, fp, fn = c[rng.integers(0, c.shape[0], size=(stop - start, c.shape[0]))].sum(axis=1).T
        denom = 2 * tp + fp + fn
        f1[start:stop] = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    return _percentile_interval(f1, confidence)
