"""Bootstrap intervals and paired tests: known values, determinism, and behaviour with sample size."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from loraforge.errors import LoraforgeError
from loraforge.eval import stats
from loraforge.eval.stats import bootstrap_ci, mcnemar_exact, paired_test


def _binary(n: int, p: float, seed: int) -> list[float]:
    return (np.random.default_rng(seed).random(n) < p).astype(float).tolist()


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n() -> None:
    small, large = _binary(50, 0.7, 1), _binary(2000, 0.7, 2)
    low_s, high_s = bootstrap_ci(small)
    low_l, high_l = bootstrap_ci(large)
    assert low_s <= np.mean(small) <= high_s
    assert low_l <= np.mean(large) <= high_l
    assert high_l - low_l < (high_s - low_s) / 3  # width ~ 1/sqrt(n): ratio ~ 6
    assert 0.6 < low_l < 0.7 < high_l < 0.75


def test_bootstrap_ci_is_deterministic_and_seed_dependent() -> None:
    data = np.random.default_rng(3).random(100).tolist()  # continuous: quantiles move with the seed
    assert bootstrap_ci(data, seed=7) == bootstrap_ci(data, seed=7)
    assert bootstrap_ci(data, seed=7) != bootstrap_ci(data, seed=8)


def test_bootstrap_ci_constant_scores_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    data = _binary(100, 0.5, 4)
    whole = bootstrap_ci(data, n_resamples=50)
    monkeypatch.setattr(stats, "_MAX_ELEMENTS", 700)  # 7 resamples per chunk: same random stream
    assert bootstrap_ci(data, n_resamples=50) == whole


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(LoraforgeError):
        bootstrap_ci([])
    with pytest.raises(LoraforgeError):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(LoraforgeError):
        bootstrap_ci([1.0], confidence=1.5)


def test_mcnemar_exact_on_a_known_table() -> None:
    # discordant 2 vs 8: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_without_scipy_uses_the_exact_binomial(monkeypatch: pytest.MonkeyPatch) -> None:
    with_scipy = [mcnemar_exact(a, b) for a, b in [(2, 8), (0, 12), (30, 47), (5, 5)]]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    without = [mcnemar_exact(a, b) for a, b in [(2, 8), (0, 12), (30, 47), (5, 5)]]
    assert without == pytest.approx(with_scipy)
    assert without[1] == pytest.approx(2 / 2**12)


def test_paired_test_binary_scores() -> None:
    # 20 prompts: both right on 8, A only on 8, B only on 2, both wrong on 2
    a = [1.0] * 8 + [1.0] * 8 + [0.0] * 2 + [0.0] * 2
    b = [1.0] * 8 + [0.0] * 8 + [1.0] * 2 + [0.0] * 2
    result = paired_test(a, b, seed=0)
    assert result.n == 20 and result.mean_a == 0.8 and result.mean_b == 0.5
    assert result.diff == pytest.approx(0.3)
    assert result.discordant == (8, 2)
    assert result.p_mcnemar == pytest.approx(112 / 1024)
    assert result.ci[0] <= 0.3 <= result.ci[1]
    assert 0.0 < result.p_bootstrap < 0.1
    assert paired_test(a, b, seed=0) == result


def test_paired_test_identical_and_continuous_scores() -> None:
    same = _binary(40, 0.5, 5)
    tie = paired_test(same, same)
    assert tie.diff == 0.0 and tie.p_bootstrap == 1.0 and tie.p_mcnemar == 1.0
    rng = np.random.default_rng(6)
    base = rng.random(300)
    better = paired_test((base + 0.2).tolist(), base.tolist())
    assert better.p_mcnemar is None and better.discordant is None
    assert better.p_bootstrap == pytest.approx(1 / 1001)  # every resample has diff 0.2 exactly
    with pytest.raises(LoraforgeError, match="same prompts"):
        paired_test([1.0, 0.0], [1.0])
