"""The statistics module against direct computations and known values."""

import math

import numpy as np
import pytest
from scipy import stats

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import (
    binomial_greater,
    bootstrap_ci,
    bootstrap_count_matrices,
    bootstrap_indices,
    cluster_bootstrap_spearman,
    mcnemar_exact,
    mean_difference_ci,
    paired_bootstrap_ci,
    paired_ratio_ci,
    permutation_mean_difference,
    spearman_ci,
    unit_bootstrap_means,
    wilson_interval,
)


def test_wilson_interval_matches_the_closed_form():
    for k, n in [(0, 5), (5, 5), (3, 10), (58, 62), (15, 62)]:
        z = stats.norm.ppf(0.975)
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
        assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(NeuronAuditError, match="not between 0 and n"):
        wilson_interval(6, 5)


def test_mcnemar_counts_only_discordant_items():
    a = [True] * 10 + [True] * 6 + [False] * 1 + [False] * 3
    b = [True] * 10 + [False] * 6 + [True] * 1 + [False] * 3
    res = mcnemar_exact(a, b)
    assert (res.only_a_right, res.only_b_right, res.n_discordant) == (6, 1, 7)
    assert res.p_value == pytest.approx(stats.binomtest(6, 7, 0.5).pvalue)  # 0.125
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    with pytest.raises(NeuronAuditError, match="paired"):
        mcnemar_exact([True], [True, False])


def test_binomial_greater_is_the_exact_one_sided_test():
    assert binomial_greater(14, 15, 0.8) == pytest.approx(stats.binomtest(14, 15, 0.8, alternative="greater").pvalue)
    assert math.isnan(binomial_greater(0, 0, 0.5))


def test_bootstrap_intervals_cover_the_point_and_are_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=40)
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=1)
    assert lo < x.mean() < hi and hi - lo < 1.5
    assert (lo, hi) == bootstrap_ci(x, n_boot=2000, seed=1) != bootstrap_ci(x, n_boot=2000, seed=2)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))


def test_paired_bootstrap_resamples_pairs_together():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50)
    y = x + rng.normal(scale=0.1, size=50)  # strongly paired
    lo, hi = paired_bootstrap_ci(x, y, lambda a, b: np.mean(a - b), n_boot=2000, seed=0)
    # resampling the pairs keeps the tiny spread of the differences; unpaired resampling would not
    assert hi - lo < 0.1
    rho, (rlo, rhi) = spearman_ci(x, y, n_boot=1000, seed=0)
    assert rho > 0.9 and rlo <= rho <= rhi
    assert math.isnan(spearman_ci([1, 1, 1, 1], [1, 2, 3, 4])[0])


def test_paired_ratio_and_unit_means():
    num, den = np.array([2.0, 4.0, 6.0, 8.0]), np.array([1.0, 2.0, 3.0, 4.0])
    r = paired_ratio_ci(num, den, n_boot=1000, seed=0)
    assert r["mean"] == 2.0 and r["ci_low"] == pytest.approx(2.0) and r["ci_high"] == pytest.approx(2.0)
    with pytest.raises(NeuronAuditError, match="below the 1000"):
        paired_ratio_ci(num, den, n_boot=100)
    per_unit = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    point, lo, hi = unit_bootstrap_means(per_unit, n_boot=1000, seed=0)
    np.testing.assert_allclose(point, [0.75, 0.25])
    assert (lo <= point).all() and (point <= hi).all() and lo[0] < 0.75 < hi[0]
    one = unit_bootstrap_means(per_unit[:1], n_boot=1000)
    np.testing.assert_array_equal(one[1], one[0])


def test_permutation_test_finds_a_planted_shift_and_not_noise():
    rng = np.random.default_rng(4)
    diff, p = permutation_mean_difference(rng.normal(1.0, size=30), rng.normal(0.0, size=30), seed=0)
    assert diff > 0.5 and p < 0.01
    _, p_null = permutation_mean_difference(rng.normal(size=30), rng.normal(size=30), seed=0)
    assert p_null > 0.05


def test_vectorised_mean_difference_ci_equals_a_per_neuron_loop():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(size=(12, 7)), rng.normal(size=(9, 7))
    n_boot, seed = 500, 11
    counts = bootstrap_count_matrices(12, 9, n_boot, seed)
    lo, hi = mean_difference_ci(pos, neg, *counts, chunk_elements=1000)  # several chunks
    idx_pos, idx_neg = bootstrap_indices(12, 9, n_boot, seed)
    for j in range(7):
        boot = [pos[idx_pos[b], j].mean() - neg[idx_neg[b], j].mean() for b in range(n_boot)]
        np.testing.assert_allclose([lo[j], hi[j]], np.percentile(boot, [2.5, 97.5]), rtol=1e-10)


def test_cluster_spearman_resamples_whole_clusters():
    """Each neuron contributes two identical (sign) rows: resampling neurons gives the interval of the
    neurons alone (ranks of a duplicated sample are a linear map of the sample's); resampling rows
    treats the copies as independent and gives a narrower, overconfident interval."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=10)
    y = x + rng.normal(scale=1.0, size=10)
    one = cluster_bootstrap_spearman(x, y, [f"n{k}" for k in range(10)], n_boot=2000, seed=0)
    two = cluster_bootstrap_spearman(np.repeat(x, 2), np.repeat(y, 2), [f"n{k}" for k in np.repeat(range(10), 2)],
                                     n_boot=2000, seed=0)
    assert (two.n_pairs, two.n_clusters, one.n_clusters) == (20, 10, 10)
    assert two.rho == pytest.approx(one.rho)
    assert (two.ci_low, two.ci_high) == pytest.approx((one.ci_low, one.ci_high))
    rows = spearman_ci(np.repeat(x, 2), np.repeat(y, 2), n_boot=2000, seed=0)[1]
    assert rows[1] - rows[0] < 0.85 * (two.ci_high - two.ci_low)
    assert two.ci_low <= two.rho <= two.ci_high
    flat = cluster_bootstrap_spearman([1, 1, 1, 1], [1, 2, 3, 4], ["a", "b", "c", "d"])
    assert math.isnan(flat.rho) and math.isnan(flat.ci_low)
