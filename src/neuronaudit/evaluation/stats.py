"""Every statistical test and interval of the package, on scipy.

* intervals of a proportion: Wilson (:func:`wilson_interval`, ``binomtest(...).proportion_ci``);
* bootstrap CIs (``scipy.stats.bootstrap``, percentile method, seeded): of a statistic of one
  sample (:func:`bootstrap_ci`), of a statistic of paired samples resampled together
  (:func:`paired_bootstrap_ci`, e.g. Spearman ρ over neurons, a per-text ratio), and of the mean of
  per-unit vectors resampled by unit (:func:`unit_bootstrap_means`, e.g. rollout-type fractions
  with the prompt as the unit), of a mean with whole clusters resampled
  (:func:`cluster_bootstrap_mean`, e.g. both dose signs of a neuron together), and of Spearman ρ
  with whole clusters resampled (:func:`cluster_bootstrap_spearman`);
* Spearman ρ with a permutation p-value and a paired BCa CI (:func:`spearman_permutation_bca`),
  degenerate resamples counted;
* exact McNemar test of two classifiers judged on the same items (:func:`mcnemar_exact`),
  one-sided exact binomial test against a known rate (:func:`binomial_greater`), and a
  permutation test of a difference in means (:func:`permutation_mean_difference`);
* the screen's bootstrap of δ for every neuron at once (:func:`bootstrap_count_matrices`,
  :func:`mean_difference_ci`): one set of resampled prompt indices is shared by every neuron, so
  a replicate's means of a whole layer are one matrix product (hand-vectorised: scipy's bootstrap
  would draw each neuron's resamples separately and cost ``n_neurons`` times more).
* the bootstrap over prompts of a first crossing on a dose grid (:func:`crossing_bootstrap`), also
  hand-vectorised: a resample without a crossing counts as beyond the grid, which scipy's
  percentile bounds cannot represent; with each prompt's x = 0 outcome it resamples the window's
  trigger rule (the share must reach the level and its Wilson lower bound beat the resample's own
  x = 0 share); on a grid where some points were not rolled out (the adaptive dose search),
  :func:`crossing_bootstrap_bounds` gives an interval that contains the full grid's.

Every resampling function takes ``n_boot`` and ``seed`` and refuses fewer than
:data:`MIN_RESAMPLES` resamples where a figure is reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from neuronaudit.errors import NeuronAuditError

#: The fewest bootstrap resamples behind a reported interval.
MIN_RESAMPLES = 1000


def _check_resamples(n_boot: int) -> None:
    if n_boot < MIN_RESAMPLES:
        raise NeuronAuditError(f"n_boot {n_boot!r} is below the {MIN_RESAMPLES} resamples the study requires")


def _percentile(data: tuple, statistic: Callable, n_boot: int, seed: int, level: float, paired: bool = False,
                vectorized: bool | None = None):
    return stats.bootstrap(
        data, statistic, n_resamples=n_boot, confidence_level=level, method="percentile", paired=paired,
        vectorized=vectorized, random_state=np.random.default_rng(seed),
    ).confidence_interval


# --- proportions -----------------------------------------------------------------------------


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (``(nan, nan)`` when ``n = 0``)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise NeuronAuditError(f"count {k!r} is not between 0 and n = {n}")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def binomial_greater(k: int, n: int, rate: float) -> float:
    """One-sided exact binomial p-value of ``k`` successes in ``n`` against a known ``rate``."""
    if n <= 0:
        return math.nan
    return float(stats.binomtest(int(k), int(n), p=min(max(rate, 0.0), 1 - 1e-12), alternative="greater").pvalue)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of classifiers A and B judged on the same items."""

    only_a_right: int  # discordant items A gets right and B wrong
    only_b_right: int
    p_value: float  # two-sided exact binomial test of the discordant split against 1/2

    @property
    def n_discordant(self) -> int:
        return self.only_a_right + self.only_b_right


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """Exact McNemar test: only the discordant items count; with none, the p-value is 1."""
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape:
        raise NeuronAuditError(f"McNemar needs paired outcomes, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_a, n, 0.5, alternative="two-sided").pvalue)
    return McNemar(only_a, only_b, p)


def permutation_mean_difference(x: Sequence[float], y: Sequence[float], n_resamples: int = 9999, seed: int = 0,
                                alternative: str = "two-sided") -> tuple[float, float]:
    """``(mean(x) − mean(y), p-value)`` of a permutation test of independent samples."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 1 or len(y) < 1:
        return (math.nan, math.nan)
    res = stats.permutation_test(
        (x, y), lambda a, b, axis: np.mean(a, axis=axis) - np.mean(b, axis=axis), vectorized=True,
        n_resamples=n_resamples, alternative=alternative, random_state=np.random.default_rng(seed),
    )
    return float(res.statistic), float(res.pvalue)


# --- bootstrap -------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], statistic=np.mean, n_boot: int = MIN_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the values (NaNs dropped; ``nan`` if fewer
    than 2 remain)."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return math.nan, math.nan
    ci = _percentile((values,), statistic, n_boot, seed, level)
    return float(ci.low), float(ci.high)


def paired_bootstrap_ci(x: Sequence[float], y: Sequence[float], statistic: Callable, n_boot: int = MIN_RESAMPLES,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(x, y)`` with the pairs resampled together.

    Resamples on which the statistic is undefined (NaN, e.g. Spearman ρ of a resample whose values
    are all equal) are dropped from the percentiles; the interval is NaN only when every resample
    is undefined. (scipy's own bounds would be NaN as soon as one resample is.)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) != len(y):
        raise NeuronAuditError(f"paired samples have different lengths ({len(x)} and {len(y)})")
    if len(x) < 3:
        return math.nan, math.nan
    with warnings.catch_warnings():  # undefined resamples are dropped below, not reported as NaN bounds
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((x, y), statistic, n_resamples=n_boot, method="percentile", paired=True,
                              vectorized=False, random_state=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.quantile(dist, alpha)), float(np.quantile(dist, 1 - alpha))


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = MIN_RESAMPLES, seed: int = 0,
                level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Spearman ρ of paired values and its paired percentile bootstrap CI (NaN when a side is
    constant or fewer than 3 pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, (math.nan, math.nan)

    def rho(a, b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return math.nan
        return stats.spearmanr(a, b).statistic

    return float(rho(x, y)), paired_bootstrap_ci(x, y, rho, n_boot, seed, level)


def paired_ratio_ci(numerator: Sequence[float], denominator: Sequence[float], n_boot: int = MIN_RESAMPLES,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the per-item ratios ``numerator / denominator`` with a percentile bootstrap CI over
    items: each resample takes whole pairs, never the two sides separately."""
    _check_resamples(n_boot)
    ratio = np.asarray(numerator, float) / np.asarray(denominator, float)
    lo, hi = bootstrap_ci(ratio, np.mean, n_boot, seed, level)
    return {"mean": float(ratio.mean()), "ci_low": lo, "ci_high": hi, "n": int(ratio.size), "n_boot": n_boot,
            "seed": seed}


def cluster_bootstrap_mean(values: Sequence[float], clusters: Sequence, n_boot: int = MIN_RESAMPLES,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, ci_low, ci_high)`` of ``values`` with a percentile bootstrap that resamples whole
    clusters (e.g. both dose signs of a neuron together): each resample draws clusters with
    replacement and takes every value of each drawn cluster. NaN values are an error: a caller
    decides how a missing case counts before it reaches a mean."""
    values = np.asarray(values, float)
    if np.isnan(values).any():
        raise NeuronAuditError("cluster bootstrap got NaN values; decide how missing cases count first")
    if values.size == 0:
        return math.nan, math.nan, math.nan
    labels, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(labels))
    sizes = np.bincount(inverse, minlength=len(labels)).astype(float)
    point = float(values.mean())
    if len(labels) < 2:
        return point, point, point

    def mean_of_clusters(idx, axis=-1):
        idx = np.asarray(idx, int)
        return sums[idx].sum(axis=axis) / sizes[idx].sum(axis=axis)

    ci = _percentile((np.arange(len(labels)),), mean_of_clusters, n_boot, seed, level, vectorized=True)
    return point, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class ClusterSpearman:
    """Spearman ρ of ``n_pairs`` pairs in ``n_clusters`` clusters with a percentile bootstrap CI that
    resamples whole clusters; ``n_degenerate_resamples`` counts the resamples on which ρ is
    undefined (a side constant), left out of the percentiles, never out of this count."""

    rho: float
    ci_low: float
    ci_high: float
    n_pairs: int
    n_clusters: int
    n_degenerate_resamples: int


def _spearman_or_nan(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def cluster_bootstrap_spearman(x: Sequence[float], y: Sequence[float], clusters: Sequence,
                               n_boot: int = MIN_RESAMPLES, seed: int = 0, level: float = 0.95) -> ClusterSpearman:
    """Spearman ρ of paired values with a percentile bootstrap CI that resamples whole clusters
    (``scipy.stats.bootstrap`` over the cluster labels: each resample draws clusters with
    replacement and takes every pair of each drawn cluster, e.g. both dose signs of a neuron).
    Non-finite pairs are dropped first. ρ and the CI are NaN with fewer than 3 pairs or a constant
    side; the CI is NaN with fewer than 2 clusters or when no resample defines ρ."""
    _check_resamples(n_boot)
    x, y = np.asarray(x, float), np.asarray(y, float)
    labels = np.asarray([str(c) for c in clusters])
    if not (len(x) == len(y) == len(labels)):
        raise NeuronAuditError(f"paired samples and clusters have different lengths ({len(x)}, {len(y)}, "
                               f"{len(labels)})")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, labels = x[ok], y[ok], labels[ok]
    names, inverse = np.unique(labels, return_inverse=True)
    n, k = int(len(x)), int(len(names))
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return ClusterSpearman(math.nan, math.nan, math.nan, n, k, 0)
    rho = _spearman_or_nan(x, y)
    if k < 2:
        return ClusterSpearman(rho, math.nan, math.nan, n, k, 0)
    members = [np.flatnonzero(inverse == c) for c in range(k)]

    def statistic(drawn):
        rows = np.concatenate([members[int(c)] for c in drawn])
        return _spearman_or_nan(x[rows], y[rows])

    with warnings.catch_warnings():  # undefined resamples are counted and dropped below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(k),), statistic, n_resamples=n_boot, method="percentile",
                              vectorized=False, random_state=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, float)
    defined = dist[np.isfinite(dist)]
    if defined.size == 0:
        return ClusterSpearman(rho, math.nan, math.nan, n, k, int(dist.size))
    alpha = (1 - level) / 2
    return ClusterSpearman(rho, float(np.quantile(defined, alpha)), float(np.quantile(defined, 1 - alpha)), n, k,
                           int(dist.size - defined.size))


def _resampled_crossings(hits: np.ndarray, x: np.ndarray, level: float, n_boot: int, seed: int,
                         baseline: Sequence[float] | None, baseline_confidence: float) -> np.ndarray:
    """Each resample's first crossing (``inf`` if none): the prompts (rows of ``hits``, and the
    same rows of ``baseline``) drawn with replacement, ``[n_boot]``."""
    n = hits.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    drawn = hits[idx]  # [n_boot, n, n_x]
    reached = drawn.mean(axis=1) >= level
    if baseline is not None:
        base = np.asarray(baseline, float)
        if base.shape != (n,):
            raise NeuronAuditError(f"the baseline has {base.shape} outcomes for {n} prompts")
        # the trigger rule: the Wilson lower bound of the count must beat the resample's own x = 0 share
        lower = np.array([wilson_interval(k, n, baseline_confidence)[0] for k in range(n + 1)])
        counts = np.rint(drawn.sum(axis=1)).astype(int)
        reached &= lower[counts] > base[idx].mean(axis=1)[:, None]
    return np.where(reached.any(axis=1), x[np.argmax(reached, axis=1)], np.inf)


def crossing_bootstrap(hits: np.ndarray, x: Sequence[float], level: float = 0.5, n_boot: int = MIN_RESAMPLES,
                       seed: int = 0, confidence: float = 0.95, baseline: Sequence[float] | None = None,
                       baseline_confidence: float = 0.95) -> tuple[float, float, float]:
    """Percentile CI of a first crossing over prompts.

    ``hits [n_prompts, n_x]`` holds 0/1 outcomes of every prompt at every grid point ``x``
    (ascending |x|). The crossing is the smallest ``x`` whose fraction of prompts reaches
    ``level``; with ``baseline`` (each prompt's 0/1 outcome at x = 0, same rows) it must also have
    the lower bound of its Wilson interval (at ``baseline_confidence``) above the x = 0 share of the
    same resample: the window's trigger rule. Prompts are resampled with replacement; a resample
    without a crossing counts as beyond the grid (``inf``), so the upper bound is ``inf`` when more
    than ``(1 − confidence)/2`` of the resamples never cross. Returns ``(share of resamples that
    cross, ci_low, ci_high)``.
    """
    hits = np.asarray(hits, float)
    x = np.asarray(x, float)
    if hits.shape[0] == 0:
        return math.nan, math.nan, math.nan
    _check_resamples(n_boot)
    first = _resampled_crossings(hits, x, level, n_boot, seed, baseline, baseline_confidence)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(first, [alpha, 1 - alpha], method="inverted_cdf")
    return float(np.isfinite(first).mean()), float(lo), float(hi)


@dataclass(frozen=True)
class CrossingBounds:
    """Bootstrap over prompts of a first crossing when some grid points were not rolled out.

    ``ci_low``/``ci_high`` contain the percentile interval the full grid would give; ``share_low``
    and ``share_high`` bound its share of resamples that cross inside the grid. ``exact`` when
    every resample's crossing is decided by the rolled-out points (then low = high and the figures
    are the full grid's)."""

    share_low: float
    share_high: float
    ci_low: float
    ci_high: float
    exact: bool


def crossing_bootstrap_bounds(hits: np.ndarray, x: Sequence[float], unvisited: Sequence[float] = (),
                              level: float = 0.5, n_boot: int = MIN_RESAMPLES, seed: int = 0,
                              confidence: float = 0.95, baseline: Sequence[float] | None = None,
                              baseline_confidence: float = 0.95) -> CrossingBounds:
    """:func:`crossing_bootstrap` on the rolled-out grid points ``x`` (columns of ``hits``, ascending)
    when the grid points ``unvisited`` were not rolled out (``baseline``: the trigger rule, as
    there).

    The same resamples as :func:`crossing_bootstrap` (same seed, same draws). A resample's full-grid
    crossing lies between a lower bound (its first rolled-out crossing, or the smallest unrolled
    point if that is lower: any unrolled point might cross) and an upper bound (its first rolled-out
    crossing, ``inf`` if none). Quantiles are monotone, so the lower quantile of the lower bounds and
    the upper quantile of the upper bounds contain the full grid's percentile interval. With nothing
    unvisited the result equals :func:`crossing_bootstrap`'s, ``exact=True``."""
    hits = np.asarray(hits, float)
    x = np.asarray(x, float)
    if hits.shape[0] == 0:
        return CrossingBounds(math.nan, math.nan, math.nan, math.nan, False)
    _check_resamples(n_boot)
    upper = _resampled_crossings(hits, x, level, n_boot, seed, baseline, baseline_confidence)
    gap = float(np.min(unvisited)) if len(unvisited) else np.inf
    lower = np.minimum(upper, gap)
    alpha = (1 - confidence) / 2
    lo = np.quantile(lower, alpha, method="inverted_cdf")
    hi = np.quantile(upper, 1 - alpha, method="inverted_cdf")
    return CrossingBounds(float(np.isfinite(upper).mean()), float(np.isfinite(lower).mean()), float(lo), float(hi),
                          bool(np.array_equal(lower, upper)))


def unit_bootstrap_means(per_unit: np.ndarray, n_boot: int = MIN_RESAMPLES, seed: int = 0,
                         level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, ci_low, ci_high)`` per column of ``per_unit [n_units, k]``, resampling units (rows).

    With a single unit the interval is the point itself. The bounds never exclude the point
    (a percentile interval can, when the resampling distribution is skewed at a boundary).
    """
    _check_resamples(n_boot)
    per_unit = np.asarray(per_unit, float)
    point = per_unit.mean(axis=0)
    if per_unit.shape[0] < 2:
        return point, point.copy(), point.copy()
    ci = _percentile((per_unit,), lambda d, axis: np.mean(d, axis=axis), n_boot, seed, level, vectorized=True)
    lo = np.where(np.isnan(ci.low), point, ci.low)
    hi = np.where(np.isnan(ci.high), point, ci.high)
    return point, np.minimum(lo, point), np.maximum(hi, point)


# --- the screen's bootstrap over every neuron ------------------------------------------------


def bootstrap_indices(n_pos: int, n_neg: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Resampled prompt indices ``([n_boot, n_pos], [n_boot, n_neg])``, drawn once per replicate."""
    if n_boot < 1:
        raise NeuronAuditError(f"n_boot {n_boot!r} must be at least 1")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_pos, size=(n_boot, n_pos)), rng.integers(0, n_neg, size=(n_boot, n_neg))


def count_matrix(idx: np.ndarray, n: int) -> np.ndarray:
    """Count matrix ``[n_boot, n]``: how often each prompt is drawn in each replicate."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def bootstrap_count_matrices(n_pos: int, n_neg: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The count matrices of :func:`bootstrap_indices` for the two prompt sets."""
    idx_pos, idx_neg = bootstrap_indices(n_pos, n_neg, n_boot, seed)
    return count_matrix(idx_pos, n_pos), count_matrix(idx_neg, n_neg)


def mean_difference_ci(pos: np.ndarray, neg: np.ndarray, counts_pos: np.ndarray, counts_neg: np.ndarray,
                       level: float = 0.95, chunk_elements: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of ``mean(pos) − mean(neg)`` for every column of ``pos [n⁺, N]`` and
    ``neg [n⁻, N]``, the prompts of each set resampled by the shared count matrices. Memory is
    ``n_boot × chunk`` per step."""
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    n_boot, width = counts_pos.shape[0], pos.shape[1]
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    ci_low, ci_high = np.empty(width), np.empty(width)
    step = max(1, chunk_elements // max(1, n_boot))
    for start in range(0, width, step):
        sl = slice(start, min(width, start + step))
        boot = counts_pos @ pos[:, sl] / n_pos - counts_neg @ neg[:, sl] / n_neg  # [n_boot, chunk]
        ci_low[sl], ci_high[sl] = np.percentile(boot, [lo_q, hi_q], axis=0)
    return ci_low, ci_high


# --- Spearman ρ with a permutation p-value and a paired BCa interval ------------------------


@dataclass(frozen=True)
class SpearmanTest:
    """Spearman ρ of ``n`` pairs, its two-sided permutation p-value and a paired bootstrap CI.

    ``n_degenerate_resamples`` counts the bootstrap resamples on which ρ is undefined (a side
    constant); they are left out of a percentile interval, never out of this count. ``ci_method``
    is ``'BCa'``, ``'percentile'`` (BCa could not be computed: ``ci_fallback_reason`` says why)
    or ``'none'`` (no interval: ``ci_fallback_reason`` says why).
    """

    rho: float
    p_value: float
    ci_low: float
    ci_high: float
    n: int
    n_degenerate_resamples: int
    ci_method: str
    ci_fallback_reason: str | None
    n_boot: int
    n_permutations: int
    level: float

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _rank_pearson(ra: np.ndarray, rb: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation of rank arrays along ``axis`` (NaN where a side is constant)."""
    ra = np.moveaxis(np.asarray(ra, float), axis, -1)
    rb = np.moveaxis(np.asarray(rb, float), axis, -1)
    ca = ra - ra.mean(axis=-1, keepdims=True)
    cb = rb - rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ca * ca).sum(-1) * (cb * cb).sum(-1))
    constant = (np.ptp(ra, axis=-1) == 0) | (np.ptp(rb, axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ca * cb).sum(-1) / den
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def _spearman_along(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman ρ along ``axis`` of (batches of) paired samples; NaN where a side is constant."""
    return _rank_pearson(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis=axis)


def spearman_permutation_bca(x: Sequence[float], y: Sequence[float], n_permutations: int = 9999,
                             n_boot: int = MIN_RESAMPLES, seed: int = 0, level: float = 0.95) -> SpearmanTest:
    """Spearman ρ of paired values with a permutation p-value and a paired BCa bootstrap CI.

    Non-finite pairs are dropped first (``n`` counts the rest). The p-value is two-sided, from
    ``scipy.stats.permutation_test`` permuting one side against the other (exact when ``n!`` is
    at most ``n_permutations``). The interval is ``scipy.stats.bootstrap(..., paired=True,
    method='BCa')`` over pairs; when BCa cannot be computed (a resample or a leave-one-out sample
    with a constant side, or every resample equal), the percentile interval of the resamples on
    which ρ is defined is reported instead, with the reason in ``ci_fallback_reason``. Undefined
    resamples are counted in ``n_degenerate_resamples``. With fewer than 3 pairs or a constant
    side, ρ, p and the interval are NaN and ``ci_method`` is ``'none'``.
    """
    _check_resamples(n_boot)
    if n_permutations < 1:
        raise NeuronAuditError(f"n_permutations {n_permutations!r} must be at least 1")
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise NeuronAuditError(f"Spearman ρ needs two paired 1-d samples, got shapes {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(len(x))

    def empty(reason: str) -> SpearmanTest:
        return SpearmanTest(math.nan, math.nan, math.nan, math.nan, n, 0, "none", reason, n_boot, n_permutations,
                            level)

    if n < 3:
        return empty(f"fewer than 3 pairs (n = {n})")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return empty("a side is constant: ρ is undefined")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rho = float(_rank_pearson(rx, ry))
    perm = stats.permutation_test(
        (rx,), lambda a, axis=-1: _rank_pearson(a, ry, axis=axis), permutation_type="pairings", vectorized=True,
        n_resamples=n_permutations, alternative="two-sided", random_state=np.random.default_rng(seed),
    )
    p_value = float(min(1.0, perm.pvalue))
    with warnings.catch_warnings(record=True) as caught, np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("always", stats.DegenerateDataWarning)
        res = stats.bootstrap((x, y), _spearman_along, n_resamples=n_boot, confidence_level=level, method="BCa",
                              paired=True, vectorized=True, batch=min(n_boot, 1000),
                              random_state=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, float)
    defined = dist[np.isfinite(dist)]
    n_degenerate = int(dist.size - defined.size)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(lo) and math.isfinite(hi):
        return SpearmanTest(rho, p_value, lo, hi, n, n_degenerate, "BCa", None, n_boot, n_permutations, level)
    if n_degenerate:
        reason = (f"BCa undefined: {n_degenerate} of {dist.size} resamples have a constant side (ρ undefined); "
                  f"percentile interval of the {defined.size} defined resamples")
    elif np.ptp(defined) == 0:
        reason = "BCa undefined: every resample gives the same ρ (degenerate bootstrap distribution)"
    else:
        detail = next((str(w.message) for w in caught if issubclass(w.category, stats.DegenerateDataWarning)), "")
        reason = ("BCa undefined: the jackknife acceleration is not finite (a leave-one-out sample has a constant "
                  "side)" + (f"; scipy: {detail}" if detail else ""))
    if defined.size == 0:
        return SpearmanTest(rho, p_value, math.nan, math.nan, n, n_degenerate, "none",
                            reason + "; no resample defines ρ", n_boot, n_permutations, level)
    alpha = (1 - level) / 2
    return SpearmanTest(rho, p_value, float(np.quantile(defined, alpha)), float(np.quantile(defined, 1 - alpha)),
                        n, n_degenerate, "percentile", reason, n_boot, n_permutations, level)
