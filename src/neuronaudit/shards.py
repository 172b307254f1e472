"""Collection split into shards of prompts, and the shards joined into the tables one job writes;
the counts of the control window's sweep jobs (:func:`sweep_shard_count`), of the CNA stage's
part jobs (:func:`cna_shard_count`) and of the keystone stage's (:func:`keystone_shard_count`),
which the workflow reads from the config alone.

``collect.shard_size: n`` makes collection one job per ``n`` prompts of a set (shard ``k`` takes
rows ``k·n … (k+1)·n − 1`` of the set's collected split, in table order); :func:`merge_stats`
and :func:`merge_last_token` join the shards' tables. Statistics combine exactly in exact
arithmetic (counts add; means, mean |a| and the positive fraction are count-weighted; the
unbiased variance is rebuilt from each shard's sum of squares; max |a| is the largest), so the
joined table equals the unsharded one within float tolerance; last-token rows keep the prompt
order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import NEURON_STATS_SCHEMA


def n_shards(n_prompts: int, shard_size: int) -> int:
    """Shards of ``shard_size`` prompts for ``n_prompts`` (at least one)."""
    if shard_size < 1:
        raise NeuronAuditError(f"collect.shard_size {shard_size!r} must be at least 1 to shard")
    return max(1, math.ceil(n_prompts / shard_size))


def sweep_shard_count(n_candidates: int, n_random: int, n_behaviours: int, shard_size: int) -> int:
    """Sweep jobs per behaviour with ``window.shard_size`` candidates each (0: none, the window job
    sweeps): enough for the most candidates a behaviour can get (``n_candidates`` screened and its
    share of the ``n_random`` controls, which go to the behaviours in turn)."""
    if shard_size < 0 or isinstance(shard_size, bool):
        raise NeuronAuditError(f"window.shard_size {shard_size!r} must be 0 (no sweep jobs) or a positive number "
                               f"of candidates per job")
    if shard_size == 0:
        return 0
    most = n_candidates + math.ceil(n_random / max(n_behaviours, 1))
    return max(1, math.ceil(most / shard_size))


def cna_shard_count(factors: Sequence[float], caa_layers: Sequence[float], caa_alphas: Sequence[float],
                    shard_size: int) -> int:
    """cna_part jobs of ``cna.shard_size`` interventions each (0: none, the cna job measures every
    intervention): enough for the most interventions the settings can make (none; the circuit,
    each sign half of it and the random circuit at every factor; CAA at every entry of
    ``caa_layers`` and non-zero α). Whether the circuit has both signs is known once the screen has
    run, and two entries of ``caa_layers`` may name one layer of the model, so this is an upper
    bound: the jobs past the last intervention write empty tables."""
    if shard_size < 0 or isinstance(shard_size, bool):
        raise NeuronAuditError(f"cna.shard_size {shard_size!r} must be 0 (one job) or a positive number of "
                               f"interventions per job")
    if shard_size == 0:
        return 0
    most = 1 + 4 * len(factors) + len(caa_layers) * sum(1 for a in caa_alphas if float(a) != 0.0)
    return math.ceil(most / shard_size)


def k_values(k_max: int) -> list[int]:
    """The k of the keystone ablation curve: powers of two up to ``k_max``, and ``k_max`` itself."""
    if k_max < 1:
        raise NeuronAuditError(f"keystone.k_max {k_max!r} must be at least 1")
    return sorted({2**i for i in range(int(math.log2(k_max)) + 1)} | {int(k_max)})


def keystone_shard_count(k_max: int, n_random: int, shard_size: int) -> int:
    """keystone_part jobs of ``keystone.shard_size`` ablation conditions each (0: none, the keystone
    job measures every condition): enough for the most conditions the settings can make (the
    baseline; at every k the keystone set, the keystone set without super-weight-like outliers and
    ``n_random`` random sets). The sets without outliers are measured only when the top ``k_max``
    holds an outlier, known once the statistics are collected, so this is an upper bound: the jobs
    past the last condition write empty tables."""
    if shard_size < 0 or isinstance(shard_size, bool):
        raise NeuronAuditError(f"keystone.shard_size {shard_size!r} must be 0 (one job) or a positive number of "
                               f"ablation conditions per job")
    if shard_size == 0:
        return 0
    most = 1 + len(k_values(k_max)) * (2 + int(n_random))
    return math.ceil(most / shard_size)


def shard_rows(n_prompts: int, shard_size: int, shard: int) -> range:
    """Row positions of one shard."""
    count = n_shards(n_prompts, shard_size)
    if not 0 <= shard < count:
        raise NeuronAuditError(f"shard {shard} out of range: {n_prompts} prompts make {count} shards of {shard_size}")
    return range(shard * shard_size, min(n_prompts, (shard + 1) * shard_size))


def merge_stats(tables: Sequence[pa.Table]) -> pa.Table:
    """Join per-shard neuron statistics (:data:`~neuronaudit.io.NEURON_STATS_SCHEMA`)."""
    if not tables:
        raise NeuronAuditError("no shard tables to merge")
    frames = [t.select(NEURON_STATS_SCHEMA.names).to_pandas().sort_values(["layer", "neuron"]).reset_index(drop=True)
              for t in tables]
    keys = frames[0][["layer", "neuron"]]
    for f in frames[1:]:
        if not f[["layer", "neuron"]].equals(keys):
            raise NeuronAuditError("shard tables cover different (layer, neuron) rows")
    n = np.stack([f["count"].to_numpy(np.float64) for f in frames])
    mean = np.stack([f["mean"].to_numpy() for f in frames])
    std = np.stack([f["std"].to_numpy() for f in frames])
    total = n.sum(0)
    safe = np.maximum(total, 1)
    merged_mean = (n * mean).sum(0) / safe
    sumsq = ((n - 1).clip(min=0) * std**2 + n * mean**2).sum(0)
    var = np.clip((sumsq - total * merged_mean**2) / np.maximum(total - 1, 1), 0, None)

    def weighted(column: str) -> np.ndarray:
        return (n * np.stack([f[column].to_numpy() for f in frames])).sum(0) / safe

    return pa.Table.from_pydict({
        "layer": keys["layer"].to_numpy().astype("int32"), "neuron": keys["neuron"].to_numpy().astype("int32"),
        "count": total.astype(np.int64), "mean": merged_mean, "std": np.sqrt(var),
        "mean_abs": weighted("mean_abs"),
        "max_abs": np.stack([f["max_abs"].to_numpy() for f in frames]).max(0),
        "frac_positive": weighted("frac_positive"),
    }, schema=NEURON_STATS_SCHEMA)


def merge_last_token(tables: Sequence[pa.Table]) -> pa.Table:
    """Join per-shard last-token tables, shard after shard (the prompts' table order)."""
    if not tables:
        raise NeuronAuditError("no shard tables to merge")
    schema = tables[0].schema.remove_metadata()
    return pa.concat_tables([t.replace_schema_metadata(None).cast(schema) for t in tables])
