"""Contrastive neuron screening (CNA): every neuron's contrast between two prompt sets, and the circuit.

Contrastive Neuron Attribution (Nous Research, arXiv 2605.12290; SCIENCE.md §3) ranks MLP
neurons by how differently they fire on a positive prompt set P⁺ (showing a behaviour, e.g.
harmful requests that get refused) and a style-matched negative set P⁻ (harmless requests),
using forward passes only. From the last-token activation tables written by
:mod:`neuronaudit.interventions.capture` (one ``a_l`` vector per prompt at its last prompt token) and the
DISCOVERY split of each prompt set, per neuron ``(l, i)``:

``delta``       ``δ = mean_{P⁺} a − mean_{P⁻} a``
``std_delta``   ``δ / sqrt(s_pooled² + s0²)`` with ``s_pooled² = ((n⁺−1)s⁺² + (n⁻−1)s⁻²) /
                (n⁺+n⁻−2)`` and ``s0`` the layer's median ``s_pooled`` (Cohen's d moderated by
                SAM's variance floor: it makes layers with different activation scales comparable,
                and a neuron with near-zero variance cannot reach the top on a tiny δ)
``ci_low/high`` percentile bootstrap CI of δ: prompts of each set are resampled with replacement
                (``n_boot`` ≥ 1000 replicates, seeded). Each replicate draws its prompt indices
                once and reuses them for every neuron of every layer: a replicate is a row of a
                count matrix ``C [n_boot, n_prompts]`` and the replicate means of a whole layer
                are one matrix product ``C @ A / n``. Memory is ``n_boot × chunk`` per step, with
                layers read one at a time and neurons processed in chunks. Where the two sets are
                paired (a ``pair_id`` shared by a P⁺ and a P⁻ prompt: style-matched pairs), a pair
                is resampled as one unit, both its prompts together; unpaired prompts are
                resampled within their own set (:func:`paired_count_matrices`).

Winner's curse: the circuit is the top of a ranking of every neuron on the discovery prompts, so
its discovery δ is biased away from zero. :func:`heldout_contrast` re-measures δ of the circuit
neurons on the HELD-OUT prompts of the same two sets (the last-token tables hold every split),
with the same paired bootstrap, so the report can set discovery δ beside held-out δ.

Layers 0 and 1 are not screened by default (``skip_layers``, as in SCIENCE.md §3); their rows stay in
the table with ``screened=False`` and no rank, so the table holds every neuron.

*Universal* neurons fire strongly on almost everything: a neuron is universal when it is among
its layer's top-``top_n`` (default 20) neurons by ``|a|`` at the last token on at least
``fraction`` (default 80%) of the prompts of a diverse collection (e.g. generic text and the task
groups). They are flagged (``universal``, with ``top_frac``) and left out of circuits.

The circuit (:func:`select_circuit`) is the top-``k`` screened, non-universal neurons by ``|δ|``
(``k`` an integer count or a fraction of ALL MLP neurons of the model; the paper uses 0.1%), with
the sign kept: ``pos`` (δ > 0, more active on P⁺) and ``neg`` neurons behave differently under
scaling. Raw ``|δ|`` favours layers with large activations (in SmolLM2-135M the last layer
holds most of the top 0.1%); ``rank_by="std_delta"`` ranks by the standardised score instead and
is recorded in the provenance. CNA's intervention is ``a ← m·a`` on the circuit at every position during generation
(:func:`circuit_plan`).

The CAA baseline (a residual-stream mean difference added at one layer) lives in
:mod:`neuronaudit.methods.cna`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import bootstrap_count_matrices, count_matrix, mean_difference_ci
from neuronaudit.interventions.capture import LastTokenTable
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit

SCREEN_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("delta", pa.float64(), nullable=False),
        pa.field("std_delta", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=False),
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("mean_pos", pa.float64(), nullable=False),
        pa.field("mean_neg", pa.float64(), nullable=False),
        pa.field("std_pos", pa.float64(), nullable=False),
        pa.field("std_neg", pa.float64(), nullable=False),
        pa.field("top_frac", pa.float64(), nullable=True),  # null without diverse sets
        pa.field("universal", pa.bool_(), nullable=False),
        pa.field("screened", pa.bool_(), nullable=False),  # False in skipped layers
        pa.field("rank", pa.int32(), nullable=True),  # 1 = largest |delta| (null when not screened)
    ]
)

CIRCUIT_SCHEMA = pa.schema(
    [
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("sign", pa.string(), nullable=False),  # 'pos' (delta > 0) or 'neg'
        pa.field("delta", pa.float64(), nullable=False),
        pa.field("std_delta", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=False),
        pa.field("ci_high", pa.float64(), nullable=False),
        # δ re-measured on the held-out prompts of the same sets (null without held-out prompts)
        pa.field("delta_heldout", pa.float64(), nullable=True),
        pa.field("heldout_ci_low", pa.float64(), nullable=True),
        pa.field("heldout_ci_high", pa.float64(), nullable=True),
    ]
)

RANK_BY = ("delta", "std_delta")


# --- reading ----------------------------------------------------------------------------------


# --- statistics --------------------------------------------------------------------------------


def contrast(
    pos: np.ndarray,
    neg: np.ndarray,
    counts_pos: np.ndarray | None = None,
    counts_neg: np.ndarray | None = None,
    ci: float = 0.95,
    chunk_elements: int = 1 << 23,
) -> dict[str, np.ndarray]:
    """Per-neuron contrast of ``pos [n⁺, N]`` vs ``neg [n⁻, N]``.

    Returns ``delta, std_delta, mean_pos, mean_neg, std_pos, std_neg`` and, with the bootstrap
    count matrices (:func:`neuronaudit.evaluation.stats.bootstrap_count_matrices`), ``ci_low, ci_high``
    (percentile CI at ``ci``).
    """
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos < 2 or n_neg < 2:
        raise NeuronAuditError(f"contrast needs at least 2 prompts per set (got {n_pos} and {n_neg})")
    mean_pos, mean_neg = pos.mean(0), neg.mean(0)
    std_pos, std_neg = pos.std(0, ddof=1), neg.std(0, ddof=1)
    delta = mean_pos - mean_neg
    pooled = np.sqrt(((n_pos - 1) * std_pos**2 + (n_neg - 1) * std_neg**2) / (n_pos + n_neg - 2))
    # a variance floor (SAM's fudge factor s0, Tusher et al. 2001): the layer's median pooled std,
    # so a neuron that barely varies cannot top the ranking with a tiny δ
    s0 = float(np.median(pooled)) if pooled.size else 0.0
    scale = np.sqrt(pooled**2 + s0**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        std_delta = np.where(scale > 0, delta / np.where(scale > 0, scale, 1.0), np.sign(delta) * np.inf)
    std_delta = np.where((scale == 0) & (delta == 0), 0.0, std_delta)
    out = dict(
        delta=delta, std_delta=std_delta, mean_pos=mean_pos, mean_neg=mean_neg,
        std_pos=std_pos, std_neg=std_neg,
    )
    if counts_pos is not None and counts_neg is not None:
        ci_low, ci_high = mean_difference_ci(pos, neg, counts_pos, counts_neg, ci, chunk_elements)
        out.update(ci_low=ci_low, ci_high=ci_high)
    return out


def paired_count_matrices(
    pos_units: Sequence[str | None], neg_units: Sequence[str | None], n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Bootstrap weight matrices ``([n_boot, n⁺], [n_boot, n⁻])`` resampling pairs together.

    ``pos_units[r]`` / ``neg_units[r]`` is the pair id of each row (``None``: unpaired). A pair id
    found in both sets is one unit: each replicate draws as many units as there are pairs, with
    replacement, and every prompt of a drawn unit (in either set) counts once per draw. Prompts
    without a partner in the other set are resampled within their own set. Each row of a matrix
    is scaled to sum to the set's size, so ``W @ A / n`` is the replicate's mean (as with
    :func:`neuronaudit.evaluation.stats.bootstrap_count_matrices`, which this equals when nothing
    is paired). Returns the matrices and ``{n_pairs, n_unpaired_pos, n_unpaired_neg}``.
    """
    if n_boot < 1:
        raise NeuronAuditError(f"n_boot {n_boot!r} must be at least 1")
    pos_units = [None if u is None else str(u) for u in pos_units]
    neg_units = [None if u is None else str(u) for u in neg_units]
    shared = sorted({u for u in pos_units if u is not None} & {u for u in neg_units if u is not None})
    key = {u: j for j, u in enumerate(shared)}
    rng = np.random.default_rng(seed)
    draws = count_matrix(rng.integers(0, len(shared), size=(n_boot, len(shared))), len(shared)) if shared else None

    def weights(units: list[str | None]) -> np.ndarray:
        n = len(units)
        w = np.zeros((n_boot, n))
        paired = [r for r, u in enumerate(units) if u in key]
        if paired:
            w[:, paired] = draws[:, [key[units[r]] for r in paired]]
        alone = [r for r, u in enumerate(units) if u not in key]
        if alone:
            w[:, alone] = count_matrix(rng.integers(0, len(alone), size=(n_boot, len(alone))), len(alone))
        total = w.sum(1, keepdims=True)
        return w * n / np.where(total > 0, total, 1.0)

    wp, wn = weights(pos_units), weights(neg_units)
    info = {"n_pairs": len(shared), "n_unpaired_pos": sum(u not in key for u in pos_units),
            "n_unpaired_neg": sum(u not in key for u in neg_units)}
    return wp, wn, info


def _boot_weights(pos_ids, neg_ids, pairs, n_boot, seed):
    if pairs is None:
        return (*bootstrap_count_matrices(len(pos_ids), len(neg_ids), n_boot, seed),
                {"n_pairs": 0, "n_unpaired_pos": len(pos_ids), "n_unpaired_neg": len(neg_ids)})
    return paired_count_matrices([pairs.get(p) for p in pos_ids], [pairs.get(p) for p in neg_ids], n_boot, seed)


def top_fraction(activations: np.ndarray, top_n: int = 20) -> np.ndarray:
    """Fraction of prompts (rows of ``[n_prompts, N]``) on which each neuron is in the top-n |a|."""
    n_prompts, width = activations.shape
    if n_prompts == 0:
        return np.full(width, np.nan)
    top_n = min(int(top_n), width)
    top = np.argpartition(-np.abs(activations), top_n - 1, axis=1)[:, :top_n]
    return np.bincount(top.ravel(), minlength=width) / n_prompts


def universal_neurons(
    diverse_last_tokens: Sequence[LastTokenTable],
    layers: Iterable[int] | None = None,
    top_n: int = 20,
    fraction: float = 0.8,
) -> pd.DataFrame:
    """``layer, neuron, top_frac, universal`` from the last-token tables of diverse prompt sets.

    ``top_frac`` is the fraction of all prompts (every set concatenated, every split) on which the
    neuron is among its layer's top-``top_n`` by ``|a|``; ``universal`` is ``top_frac ≥ fraction``.
    """
    if not diverse_last_tokens:
        raise NeuronAuditError("universal neurons need at least one diverse last-token table")
    if not 0 < fraction <= 1:
        raise NeuronAuditError(f"universal fraction {fraction!r} must be in (0, 1]")
    layers = diverse_last_tokens[0].layers if layers is None else list(layers)
    frames = []
    for layer in layers:
        acts = np.concatenate([t.layer(layer)[1] for t in diverse_last_tokens], axis=0)
        frac = top_fraction(acts, top_n)
        frames.append(
            pd.DataFrame(
                {"layer": layer, "neuron": np.arange(acts.shape[1]), "top_frac": frac, "universal": frac >= fraction}
            )
        )
    return pd.concat(frames, ignore_index=True)


# --- the screen ----------------------------------------------------------------------------------


def screen(
    pos_last_token: LastTokenTable,
    neg_last_token: LastTokenTable,
    pos_ids: Iterable[str] | None = None,
    neg_ids: Iterable[str] | None = None,
    diverse_last_tokens: Sequence[LastTokenTable] = (),
    skip_layers: Iterable[int] = (0, 1),
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    universal_top_n: int = 20,
    universal_fraction: float = 0.8,
    rank_by: str = "delta",
    pairs: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Scores of every neuron of every layer in the tables (columns of :data:`SCREEN_SCHEMA`).

    ``pos_ids``/``neg_ids`` restrict each set to those prompts (the discovery split); ``None``
    uses every prompt. Without diverse tables no neuron is universal and ``top_frac`` is NaN (null).
    ``pairs`` maps a prompt id to its pair id: the bootstrap then resamples pairs together
    (:func:`paired_count_matrices`); ``df.attrs['bootstrap']`` records the units.
    """
    if rank_by not in RANK_BY:
        raise NeuronAuditError(f"rank_by {rank_by!r} must be one of {RANK_BY}")
    if not 0 < ci < 1:
        raise NeuronAuditError(f"ci {ci!r} must be in (0, 1)")
    layers = pos_last_token.layers
    neg_layers = neg_last_token.layers
    if layers != neg_layers:
        raise NeuronAuditError(f"positive and negative tables hold different layers ({layers} vs {neg_layers})")
    if pos_last_token.width != neg_last_token.width:
        raise NeuronAuditError("positive and negative tables have different MLP widths")
    skip = {int(s) for s in skip_layers}
    pos_ids = None if pos_ids is None else list(pos_ids)
    neg_ids = None if neg_ids is None else list(neg_ids)
    boot = None
    frames = []
    universal = None
    if diverse_last_tokens:
        universal = universal_neurons(diverse_last_tokens, layers, universal_top_n, universal_fraction)
    for layer in layers:
        pos_rows, pos = pos_last_token.layer(layer, pos_ids)
        neg_rows, neg = neg_last_token.layer(layer, neg_ids)
        if boot is None:
            *boot, units = _boot_weights(pos_rows, neg_rows, pairs, n_boot, seed)
        stats = contrast(pos, neg, *boot, ci=ci)
        frame = pd.DataFrame({"layer": layer, "neuron": np.arange(pos.shape[1]), **stats})
        frame["screened"] = layer not in skip
        frames.append(frame)
    scores = pd.concat(frames, ignore_index=True)
    if universal is not None:
        scores = scores.merge(universal, on=["layer", "neuron"], how="left", validate="one_to_one")
        scores["universal"] = scores["universal"].fillna(False).astype(bool)
    else:
        scores["top_frac"], scores["universal"] = np.nan, False
    key = scores[rank_by].abs().where(scores["screened"])
    order = np.lexsort((scores["neuron"].to_numpy(), scores["layer"].to_numpy(), -key.fillna(-1).to_numpy()))
    rank = pd.Series(pd.NA, index=scores.index, dtype="Int32")
    screened_order = order[scores["screened"].to_numpy(bool)[order]]
    rank.iloc[screened_order] = np.arange(1, len(screened_order) + 1)
    scores["rank"] = rank
    out = scores[list(SCREEN_SCHEMA.names)]
    out.attrs["bootstrap"] = {"paired": pairs is not None, **units}
    return out


def heldout_contrast(
    circuit: pd.DataFrame,
    pos_last_token: LastTokenTable,
    neg_last_token: LastTokenTable,
    pos_ids: Sequence[str],
    neg_ids: Sequence[str],
    pairs: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """δ of the circuit's neurons re-measured on other prompts of the same sets (the held-out
    split), with the same (paired) bootstrap CI: the circuit with ``delta_heldout``,
    ``heldout_ci_low``, ``heldout_ci_high`` filled. ``df.attrs['heldout']`` summarises the
    winner's curse: the mean of ``sign(δ_discovery)·δ_heldout`` over the mean ``|δ_discovery|``
    (``retained``; 1 = no shrinkage), the share keeping their sign and the share whose held-out
    CI excludes 0 on the discovery side."""
    out = circuit.copy()
    for col in ("delta_heldout", "heldout_ci_low", "heldout_ci_high"):
        out[col] = np.nan
    boot = None
    for layer, group in out.groupby("layer"):
        pos_rows, pos = pos_last_token.layer(int(layer), pos_ids)
        neg_rows, neg = neg_last_token.layer(int(layer), neg_ids)
        if boot is None:
            *boot, units = _boot_weights(pos_rows, neg_rows, pairs, n_boot, seed)
        cols = group["neuron"].to_numpy(int)
        stats = contrast(pos[:, cols], neg[:, cols], *boot, ci=ci)
        out.loc[group.index, "delta_heldout"] = stats["delta"]
        out.loc[group.index, "heldout_ci_low"] = stats["ci_low"]
        out.loc[group.index, "heldout_ci_high"] = stats["ci_high"]
    sign = np.sign(out["delta"].to_numpy())
    kept = sign * out["delta_heldout"].to_numpy()
    beyond = np.where(sign > 0, out["heldout_ci_low"].to_numpy() > 0, out["heldout_ci_high"].to_numpy() < 0)
    out.attrs["heldout"] = {
        "n_pos": len(pos_ids), "n_neg": len(neg_ids), "paired": pairs is not None, **(units if boot else {}),
        "mean_abs_delta_discovery": float(np.abs(out["delta"]).mean()),
        "mean_signed_delta_heldout": float(kept.mean()),
        "retained": float(kept.mean() / np.abs(out["delta"]).mean()) if np.abs(out["delta"]).mean() > 0 else None,
        "share_same_sign": float((kept > 0).mean()),
        "share_ci_excludes_zero": float(beyond.mean()),
    }
    return out


def resolve_k(k: int | float, n_total: int) -> int:
    """A circuit size: an int is a count, a float in (0, 1) a fraction of ``n_total`` (≥ 1)."""
    if isinstance(k, bool):
        raise NeuronAuditError(f"circuit size k {k!r} must be a count or a fraction")
    if isinstance(k, (int, np.integer)):
        if k < 1:
            raise NeuronAuditError(f"circuit size k {k!r} must be at least 1")
        return int(k)
    k = float(k)
    if not 0 < k < 1:
        raise NeuronAuditError(
            f"circuit size k {k!r} must be an integer count or a fraction in (0, 1) of all MLP neurons"
        )
    return max(1, int(round(k * n_total)))


def select_circuit(
    scores: pd.DataFrame,
    k: int | float = 0.001,
    exclude_universal: bool = True,
    n_total: int | None = None,
    rank_by: str = "delta",
) -> pd.DataFrame:
    """Top-``k`` screened neurons by ``|rank_by|`` with their sign (columns of :data:`CIRCUIT_SCHEMA`).

    ``k`` is a count (int) or a fraction (float in (0, 1)) of ``n_total`` MLP neurons (default: the
    number of rows of ``scores``, i.e. every neuron of the model when the screen read every layer).
    ``df.attrs`` records ``k_requested``, ``k``, ``n_total``, ``n_universal_excluded``.
    """
    if rank_by not in RANK_BY:
        raise NeuronAuditError(f"rank_by {rank_by!r} must be one of {RANK_BY}")
    n_total = len(scores) if n_total is None else int(n_total)
    k_count = resolve_k(k, n_total)
    pool = scores[scores["screened"].astype(bool)]
    pool = pool.assign(_abs=pool[rank_by].abs()).sort_values(
        ["_abs", "layer", "neuron"], ascending=[False, True, True]
    )
    # universal neurons that the top-k would have held without the exclusion
    n_universal = int(pool.head(k_count)["universal"].sum()) if exclude_universal else 0
    if exclude_universal:
        pool = pool[~pool["universal"].astype(bool)]
    top = pool.head(k_count)
    if len(top) < k_count:
        raise NeuronAuditError(f"circuit size k={k_count} exceeds the {len(pool)} eligible neurons")
    out = pd.DataFrame(
        {
            "rank": np.arange(1, len(top) + 1, dtype=np.int32),
            "layer": top["layer"].to_numpy(np.int32),
            "neuron": top["neuron"].to_numpy(np.int32),
            "sign": np.where(top["delta"].to_numpy() > 0, "pos", "neg"),
            "delta": top["delta"].to_numpy(),
            "std_delta": top["std_delta"].to_numpy(),
            "ci_low": top["ci_low"].to_numpy(),
            "ci_high": top["ci_high"].to_numpy(),
            "delta_heldout": np.nan,
            "heldout_ci_low": np.nan,
            "heldout_ci_high": np.nan,
        }
    )
    out.attrs.update(
        k_requested=k, k=k_count, n_total=n_total, rank_by=rank_by,
        exclude_universal=exclude_universal, n_universal_excluded=n_universal,
    )
    return out


def circuit_plan(
    circuit: pd.DataFrame,
    factor: float,
    positions: Sequence[str] = ("prompt", "generated"),
    sign: str | None = None,
) -> InterventionPlan:
    """CNA's intervention ``a ← factor·a`` on the circuit (optionally only its ``pos``/``neg`` part)."""
    rows = circuit if sign is None else circuit[circuit["sign"] == sign]
    return InterventionPlan.broadcast(
        NeuronEdit.scale(int(r.layer), int(r.neuron), factor, positions) for r in rows.itertuples()
    )


# --- stage ---------------------------------------------------------------------------------------


__all__ = [
    "SCREEN_SCHEMA", "CIRCUIT_SCHEMA", "contrast", "top_fraction",
    "universal_neurons", "screen", "resolve_k", "select_circuit", "circuit_plan",
    "paired_count_matrices", "heldout_contrast",
]
