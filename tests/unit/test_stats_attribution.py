"""Spearman ρ with a permutation p-value and a paired BCa bootstrap CI: the p-value separates a
monotone relation from noise, degenerate resamples are counted, a BCa failure is named."""

import math

import numpy as np
import pytest
from scipy import stats

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import spearman_permutation_bca


def test_rho_matches_scipy_and_the_interval_is_bca():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = x + 0.5 * rng.normal(size=30)
    r = spearman_permutation_bca(x, y, seed=0)
    assert r.rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert r.n == 30 and r.n_degenerate_resamples == 0
    assert r.ci_method == "BCa" and r.ci_fallback_reason is None
    assert r.ci_low < r.rho < r.ci_high
    assert spearman_permutation_bca(x, y, seed=0) == r  # seeded


def test_permutation_p_is_small_for_a_monotone_relation_and_large_for_noise():
    rng = np.random.default_rng(2)
    x = rng.normal(size=25)
    monotone = spearman_permutation_bca(x, np.exp(x) + 1e-3 * rng.normal(size=25), n_permutations=9999, seed=0)
    assert monotone.rho > 0.95 and monotone.p_value < 1e-3
    y = rng.normal(size=25)
    noise = spearman_permutation_bca(x, y, n_permutations=9999, seed=0)
    assert abs(noise.rho) < 0.3 and noise.p_value > 0.1
    assert noise.p_value == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.03)  # the t approximation agrees
    assert noise.n_permutations == 9999


def test_exact_permutation_p_for_few_pairs():
    """n = 5: all 120 orderings are enumerated; only the two extreme ones reach |ρ| = 1."""
    r = spearman_permutation_bca([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], n_permutations=9999)
    assert r.rho == pytest.approx(1.0) and r.p_value == pytest.approx(2 / 120)


def test_degenerate_resamples_are_counted_and_the_fallback_is_named():
    """One nonzero control among 10: a resample that misses it has a constant side. About
    0.9^10 ≈ 35% of resamples are degenerate; they are counted, not hidden."""
    x = np.arange(10.0)
    y = np.zeros(10)
    y[7] = 1.0
    n_boot = 2000
    r = spearman_permutation_bca(x, y, n_boot=n_boot, n_permutations=999, seed=0)
    expected = n_boot * 0.9**10
    assert abs(r.n_degenerate_resamples - expected) < 4 * math.sqrt(n_boot * 0.9**10 * (1 - 0.9**10))
    assert r.ci_method == "percentile"
    assert f"{r.n_degenerate_resamples} of {n_boot} resamples" in r.ci_fallback_reason
    assert -1 <= r.ci_low <= r.ci_high <= 1 and math.isfinite(r.rho)


def test_a_degenerate_bootstrap_distribution_falls_back_and_says_why():
    r = spearman_permutation_bca(np.arange(12.0), np.arange(12.0) ** 2, n_permutations=999)
    assert r.rho == 1.0 and r.ci_method == "percentile" and (r.ci_low, r.ci_high) == (1.0, 1.0)
    assert "same ρ" in r.ci_fallback_reason and r.n_degenerate_resamples == 0


def test_undefined_rho_and_bad_inputs():
    const = spearman_permutation_bca([1, 2, 3, 4], [1, 1, 1, 1])
    assert math.isnan(const.rho) and math.isnan(const.p_value) and const.ci_method == "none"
    assert "constant" in const.ci_fallback_reason and const.n == 4
    few = spearman_permutation_bca([1, 2, np.nan, 4], [1, 2, 3, np.inf])
    assert few.n == 2 and math.isnan(few.rho) and few.ci_method == "none"
    with pytest.raises(NeuronAuditError):
        spearman_permutation_bca([1, 2, 3], [1, 2, 3], n_boot=100)
    with pytest.raises(NeuronAuditError):
        spearman_permutation_bca([1, 2, 3], [1, 2])
    assert set(spearman_permutation_bca([1, 2, 3, 4], [1, 3, 2, 4]).as_dict()) == {
        "rho", "p_value", "ci_low", "ci_high", "n", "n_degenerate_resamples", "ci_method", "ci_fallback_reason",
        "n_boot", "n_permutations", "level"}
