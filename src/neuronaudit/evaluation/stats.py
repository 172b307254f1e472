"""Every statistical test and interval of the package, on scipy where scipy has it."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from scipy.stats import norm

from neuronaudit.errors import NeuronAuditError

log = logging.getLogger("neuronaudit")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (``(nan, nan)`` when ``n = 0``)."""

    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise NeuronAuditError(f"count {k!r} is not between 0 and n = {n}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_ci(values: Sequence[float], statistic=np.mean, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the values (``nan`` if fewer than 2)."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    res = stats.bootstrap((values,), statistic, n_resamples=n_boot, confidence_level=level,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)



def paired_ratio_ci(numerator: Sequence[float], denominator: Sequence[float], n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Mean of the per-item ratios ``numerator / denominator`` with a paired percentile bootstrap
    CI: items (the pairs) are resampled, never the two sides separately."""
    if n_boot < 1000:
        raise NeuronAuditError(f"n_boot {n_boot!r} is below the 1000 resamples the study requires")
    ratio = np.asarray(numerator, float) / np.asarray(denominator, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ratio), size=(n_boot, len(ratio)))
    boot = ratio[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return {"mean": float(ratio.mean()), "ci_low": float(np.quantile(boot, alpha)),
            "ci_high": float(np.quantile(boot, 1 - alpha)), "n_boot": n_boot, "seed": seed}
