"""Keystone neurons: consistently strong across tasks, and collapse when ablated.

Keystone neurons (arXiv 2605.24846; SCIENCE.md §4) are an extremely sparse set of MLP neurons
that stay highly activated across tasks of many capability dimensions and whose removal
collapses the model. This module reproduces the audit:

1. **Cross-task activation strength** (:func:`keystone_scores`). From the collected statistics
   table of each task group (``task_knowledge``, ``task_arithmetic``, ``task_code``,
   ``task_chat``, ``generic``; mean ``|a|`` over every prompt token of the group), per neuron:
   ``score_min`` = min over groups of the group's mean ``|a|`` (strong on *every* task) and
   ``score_mean`` = their mean. Neurons are ranked by ``score_min`` (rank 1 = strongest).
2. **Super-weight-like outliers** (Yu et al., "The Super Weight", arXiv 2411.07191): a neuron
   whose max ``|a|`` (over all groups' tokens) exceeds ``outlier_multiple`` (default 50) × the
   median max ``|a|`` of its layer is flagged ``super_weight_outlier``. Such spikes feed
   ``down_proj`` huge values on a few tokens (typically the first token), so
   ablating them confounds a collapse measurement. They are labelled, counted in every curve
   row (``n_outliers``), and — when present in the top ``k_max`` — a second keystone curve
   skipping them (``kind = keystone_no_outliers``) is measured; they are never silently dropped.
3. **Stability** (:func:`group_stability`), measured on the score that picks the ablated set.
   For every split of the task groups into two disjoint halves of groups (sizes ⌊G/2⌋ and ⌈G/2⌉,
   each unordered split once), the ranking score is recomputed on each half from the statistics
   tables (mean ``|a|`` per group over every prompt token, min over the half's groups; ``mean``
   likewise), and the IoU of the two top-``k`` sets is reported next to the IoU two random
   ``k``-subsets of the same neurons have in expectation (hypergeometric; ``iou_chance``). This is
   the "disjoint prompt groups" of the paper: the two halves share no task group.
   Secondary, and labelled so (``basis = prompt_halves``; :func:`stability`): each group's prompts
   split into two random halves (seeded, ``n_splits`` times), scored by last-token ``|a|`` from the
   last-token tables. It is not the ranking score and its halves share every task group, so it
   bounds sampling noise only.
4. **Ablation curve** (:func:`ablation_curve`). Zero (scale 0, at every prompt and generated
   position) the top-``k`` keystone neurons for ``k = 1, 2, 4, …`` and measure capability with
   :mod:`neuronaudit.evaluation.capability` (perplexity on general text, exact-answer accuracy per task
   group); compare with ``n_random`` random-``k`` controls drawn from the SAME layers (the same
   number of neurons per layer as the keystone set, none of them a top-``k_max`` keystone
   candidate; seeded).

The summary (:func:`summarise_curve`) reports, at each ``k``, the keystone perplexity, the
random controls' min–median–max, and their ratio; "separates" means the keystone value lies
beyond EVERY random control at that ``k``. With ``n_random`` controls that happens by chance
with probability ``1/(n_random+1)`` at a single ``k``, which the summary states next to the result.

The published result: keystone neurons are under 0.2% of neurons; zeroing 30 of them in
Llama-3.1-8B drives every benchmark to 0; the sets are stable across disjoint prompt groups.

Note: the score comes from statistics over every collected prompt (all splits), while the curve
is evaluated on the held-out split by default; the score is activation strength only (it never
sees answers), so this is not answer leakage, but the generic texts' tokens did enter the score.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.stats import hypergeom

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.capability import (
    DEFAULT_POSITIONS,
    ablation_plan,
    capability_report,
)
from neuronaudit.interventions.capture import LastTokenTable
from neuronaudit.io import RowCheckpoint

DEFAULT_GROUPS = ("task_knowledge", "task_arithmetic", "task_code", "task_chat", "generic")
DEFAULT_K_VALUES = (1, 2, 4, 8, 16, 32)
CURVE_KINDS = ("baseline", "keystone", "keystone_no_outliers", "random")


def keystone_schema(groups: Sequence[str]) -> pa.Schema:
    """Scores table: one row per neuron, one ``mean_abs__<group>`` column per task group."""
    return pa.schema(
        [
            pa.field("layer", pa.int32(), nullable=False),
            pa.field("neuron", pa.int32(), nullable=False),
            *[pa.field(f"mean_abs__{g}", pa.float64(), nullable=False) for g in groups],
            pa.field("score_min", pa.float64(), nullable=False),
            pa.field("score_mean", pa.float64(), nullable=False),
            pa.field("max_abs", pa.float64(), nullable=False),
            pa.field("max_abs_ratio", pa.float64(), nullable=False),  # max_abs / layer median max_abs
            pa.field("super_weight_outlier", pa.bool_(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),  # by score_min, 1 = strongest
        ]
    )


def curve_schema(groups: Sequence[str]) -> pa.Schema:
    """Ablation curve: one row per (k, kind, replicate)."""
    return pa.schema(
        [
            pa.field("k", pa.int32(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("replicate", pa.int32(), nullable=False),
            pa.field("n_outliers", pa.int32(), nullable=False),
            pa.field("perplexity", pa.float64(), nullable=False),  # median over texts
            pa.field("perplexity_mean", pa.float64(), nullable=False),
            *[pa.field(f"accuracy__{g}", pa.float64(), nullable=False) for g in groups],
            *[pa.field(f"n_correct__{g}", pa.int32(), nullable=False) for g in groups],
            pa.field("neurons", pa.string(), nullable=False),  # JSON [[layer, neuron], ...]
        ]
    )


#: Stability bases: the primary one (disjoint task groups, the ranking score) and the secondary one.
STABILITY_BASES = ("task_groups", "prompt_halves")

STABILITY_SCHEMA = pa.schema(
    [
        pa.field("basis", pa.string(), nullable=False),  # 'task_groups' (primary) or 'prompt_halves'
        pa.field("half_a", pa.string(), nullable=False),  # JSON list of the groups of half A ('[]': every group)
        pa.field("half_b", pa.string(), nullable=False),
        pa.field("split", pa.int64(), nullable=False),
        pa.field("k", pa.int64(), nullable=False),
        pa.field("score", pa.string(), nullable=False),  # 'min' or 'mean' across groups
        pa.field("iou", pa.float64(), nullable=False),
        pa.field("n_intersection", pa.int64(), nullable=False),
        pa.field("iou_chance", pa.float64(), nullable=False),
    ]
)


# --- scores -------------------------------------------------------------------------------------


def _stats_frame(df: pd.DataFrame) -> pd.DataFrame:
    missing = {"layer", "neuron", "mean_abs", "max_abs"} - set(df.columns)
    if missing:
        raise NeuronAuditError(f"statistics table lacks columns {sorted(missing)}")
    return df.sort_values(["layer", "neuron"]).reset_index(drop=True)


def keystone_scores(stats_by_group: Mapping[str, pd.DataFrame], outlier_multiple: float = 50.0) -> pd.DataFrame:
    """Cross-task activation strength per neuron (columns of :func:`keystone_schema`)."""
    if len(stats_by_group) < 1:
        raise NeuronAuditError("keystone scores need at least one task group")
    if outlier_multiple <= 0:
        raise NeuronAuditError(f"outlier_multiple {outlier_multiple!r} must be positive")
    groups = list(stats_by_group)
    frames = {g: _stats_frame(s) for g, s in stats_by_group.items()}
    ref = frames[groups[0]][["layer", "neuron"]].to_numpy()
    for g, f in frames.items():
        if f.shape[0] != ref.shape[0] or not np.array_equal(f[["layer", "neuron"]].to_numpy(), ref):
            raise NeuronAuditError(f"statistics of group {g!r} cover different neurons than {groups[0]!r}")
    out = pd.DataFrame({"layer": ref[:, 0].astype(np.int32), "neuron": ref[:, 1].astype(np.int32)})
    strength = np.stack([frames[g]["mean_abs"].to_numpy(np.float64) for g in groups], axis=1)
    for j, g in enumerate(groups):
        out[f"mean_abs__{g}"] = strength[:, j]
    out["score_min"] = strength.min(axis=1)
    out["score_mean"] = strength.mean(axis=1)
    out["max_abs"] = np.stack([frames[g]["max_abs"].to_numpy(np.float64) for g in groups], axis=1).max(axis=1)
    layer_median = out.groupby("layer")["max_abs"].transform("median").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(layer_median > 0, out["max_abs"].to_numpy() / np.where(layer_median > 0, layer_median, 1), 0.0)
    ratio = np.where((layer_median == 0) & (out["max_abs"].to_numpy() > 0), np.inf, ratio)
    out["max_abs_ratio"] = ratio
    out["super_weight_outlier"] = ratio > outlier_multiple
    order = np.lexsort((out["neuron"].to_numpy(), out["layer"].to_numpy(), -out["score_min"].to_numpy()))
    rank = np.empty(len(out), dtype=np.int32)
    rank[order] = np.arange(1, len(out) + 1)
    out["rank"] = rank
    out.attrs.update(groups=groups, outlier_multiple=outlier_multiple)
    return out


def ranked_neurons(scores: pd.DataFrame, by: str = "score_min") -> pd.DataFrame:
    """Scores sorted strongest first by ``by`` (ties by layer, neuron)."""
    return scores.sort_values([by, "layer", "neuron"], ascending=[False, True, True]).reset_index(drop=True)


# --- stability ----------------------------------------------------------------------------------


def split_halves(prompt_ids: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Two disjoint halves of ``prompt_ids`` (sorted first, then a seeded permutation)."""
    ids = sorted(set(map(str, prompt_ids)))
    if len(ids) < 2:
        raise NeuronAuditError(f"a stability split needs at least 2 prompts per group (got {len(ids)})")
    perm = np.random.default_rng(seed).permutation(len(ids))
    half = len(ids) // 2
    return [ids[i] for i in perm[:half]], [ids[i] for i in perm[half : 2 * half]]


def chance_iou(n: int, k: int) -> float:
    """Expected IoU of two independent uniformly random ``k``-subsets of ``n`` items."""

    if k <= 0 or n <= 0:
        return math.nan
    k = min(k, n)
    j = np.arange(max(0, 2 * k - n), k + 1)
    pmf = hypergeom.pmf(j, n, k, k)
    return float(np.sum(pmf * j / (2 * k - j)))


def _top_k(score: np.ndarray, k: int) -> set[int]:
    order = np.lexsort((np.arange(score.size), -score))
    return set(order[:k].tolist())


def group_splits(groups: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """Every split of ``groups`` into two disjoint halves of sizes ⌊G/2⌋ and ⌈G/2⌉, each unordered
    split once (with an even G, half A holds the first group)."""
    groups = list(groups)
    if len(groups) < 2:
        raise NeuronAuditError(f"stability across task groups needs at least 2 groups (got {len(groups)})")
    size = len(groups) // 2
    out = []
    for combo in itertools.combinations(range(len(groups)), size):
        if 2 * size == len(groups) and 0 not in combo:
            continue
        a = [groups[i] for i in combo]
        out.append((a, [g for g in groups if g not in a]))
    return out


def group_stability(
    stats_by_group: Mapping[str, pd.DataFrame], k_values: Sequence[int] = (8, 16, 32, 64, 128)
) -> pd.DataFrame:
    """IoU of the top-``k`` sets ranked by the keystone score (min, and mean, over groups of the
    group's mean ``|a|``) recomputed on two disjoint halves of the task groups, for every split
    of :func:`group_splits` (columns of :data:`STABILITY_SCHEMA`, ``basis = task_groups``)."""
    groups = list(stats_by_group)
    splits = group_splits(groups)
    frames = {g: _stats_frame(s) for g, s in stats_by_group.items()}
    ref = frames[groups[0]][["layer", "neuron"]].to_numpy()
    for g, f in frames.items():
        if f.shape[0] != ref.shape[0] or not np.array_equal(f[["layer", "neuron"]].to_numpy(), ref):
            raise NeuronAuditError(f"statistics of group {g!r} cover different neurons than {groups[0]!r}")
    strength = {g: frames[g]["mean_abs"].to_numpy(np.float64) for g in groups}
    width = ref.shape[0]
    records = []
    for s, (half_a, half_b) in enumerate(splits):
        per_half = [np.stack([strength[g] for g in half]) for half in (half_a, half_b)]
        for score_name, reduce in (("min", np.min), ("mean", np.mean)):
            sa, sb = reduce(per_half[0], axis=0), reduce(per_half[1], axis=0)
            for k in k_values:
                ta, tb = _top_k(sa, int(k)), _top_k(sb, int(k))
                inter = len(ta & tb)
                records.append(dict(
                    basis="task_groups", half_a=json.dumps(half_a), half_b=json.dumps(half_b), split=s, k=int(k),
                    score=score_name, iou=inter / len(ta | tb), n_intersection=inter,
                    iou_chance=chance_iou(width, int(k)),
                ))
    return pd.DataFrame.from_records(records, columns=list(STABILITY_SCHEMA.names))


def stability(
    last_token_by_group: Mapping[str, LastTokenTable],
    k_values: Sequence[int] = (8, 16, 32, 64, 128),
    seed: int = 0,
    n_splits: int = 5,
    prompt_ids_by_group: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Secondary stability measure (``basis = prompt_halves``): IoU of the top-``k`` sets by
    last-token ``|a|`` found from two random halves of every group's prompts (the halves share
    every group; this is not the ranking score, see :func:`group_stability`).

    Rows: the columns of :data:`STABILITY_SCHEMA`. Split ``s`` uses seed ``seed + s`` for every group.
    """
    if n_splits < 1:
        raise NeuronAuditError(f"n_splits {n_splits!r} must be at least 1")
    data = {}
    width = None
    for g, table in last_token_by_group.items():
        wanted = None if prompt_ids_by_group is None else prompt_ids_by_group.get(g)
        ids, rows = table.abs_rows(wanted)
        if width is not None and rows.shape[1] != width:
            raise NeuronAuditError(f"last-token table of group {g!r} has a different number of neurons")
        width = rows.shape[1]
        data[g] = (ids, rows)
    records = []
    for s in range(n_splits):
        halves = [[], []]
        for ids, rows in data.values():
            a, b = split_halves(ids, seed + s)
            pos = {p: r for r, p in enumerate(ids)}
            halves[0].append(rows[[pos[p] for p in a]].mean(0))
            halves[1].append(rows[[pos[p] for p in b]].mean(0))
        per_half = [np.stack(h) for h in halves]  # [groups, neurons]
        for score_name, reduce in (("min", np.min), ("mean", np.mean)):
            sa, sb = reduce(per_half[0], axis=0), reduce(per_half[1], axis=0)
            for k in k_values:
                ta, tb = _top_k(sa, int(k)), _top_k(sb, int(k))
                inter = len(ta & tb)
                records.append(
                    dict(basis="prompt_halves", half_a="[]", half_b="[]", split=s, k=int(k), score=score_name,
                         iou=inter / len(ta | tb), n_intersection=inter, iou_chance=chance_iou(width, int(k)))
                )
    return pd.DataFrame.from_records(records, columns=list(STABILITY_SCHEMA.names))


# --- ablation curve -------------------------------------------------------------------------------


def random_controls(
    keystone: Sequence[tuple[int, int]],
    n_neurons: int,
    n_random: int,
    seed: int,
    exclude: Iterable[tuple[int, int]] = (),
    k: int | None = None,
) -> list[list[tuple[int, int]]]:
    """``n_random`` random sets with the same number of neurons per layer as ``keystone``.

    Neurons in ``exclude`` (and in ``keystone``) are never drawn. Replicate ``r`` draws with the
    generator seeded by ``(seed, k, r)``.
    """
    k = len(keystone) if k is None else k
    excluded = set(map(tuple, exclude)) | set(map(tuple, keystone))
    per_layer: dict[int, int] = {}
    for layer, _ in keystone:
        per_layer[int(layer)] = per_layer.get(int(layer), 0) + 1
    out = []
    for r in range(n_random):
        rng = np.random.default_rng([int(seed), int(k), r])
        chosen: list[tuple[int, int]] = []
        for layer in sorted(per_layer):
            pool = np.array([i for i in range(n_neurons) if (layer, i) not in excluded])
            if len(pool) < per_layer[layer]:
                raise NeuronAuditError(f"layer {layer} has too few non-keystone neurons for a random control")
            picks = rng.choice(pool, size=per_layer[layer], replace=False)
            chosen.extend((layer, int(i)) for i in sorted(picks))
        out.append(chosen)
    return out


def _curve_row(k, kind, replicate, neurons, outliers, report, groups) -> dict:
    row = dict(
        k=int(k), kind=kind, replicate=int(replicate),
        n_outliers=int(sum((l, i) in outliers for l, i in neurons)),
        perplexity=report["perplexity"]["median"], perplexity_mean=report["perplexity"]["mean"],
        neurons=json.dumps([[int(l), int(i)] for l, i in neurons]),
    )
    for g in groups:
        acc = report["accuracy"].get(g, {})
        row[f"accuracy__{g}"] = acc.get("accuracy", math.nan)
        row[f"n_correct__{g}"] = acc.get("n_correct", 0)
    return row


def _fingerprint(generic_texts, task_prompts, positions, capability_kwargs, model_name, n_params) -> str:

    doc = {
        "texts": list(map(str, generic_texts)),
        "tasks": {g: df.astype(str).to_dict(orient="list") for g, df in task_prompts.items()},
        "positions": list(positions),
        "kwargs": {k: str(v) for k, v in sorted(capability_kwargs.items())},
        "model": [str(model_name), int(n_params)],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def ablation_conditions(
    ranked: pd.DataFrame,
    k_values: Sequence[int],
    n_random: int,
    seed: int,
    n_neurons: int,
    include_baseline: bool = True,
    without_outliers: bool | None = None,
) -> tuple[list[tuple[int, str, int, list[tuple[int, int]]]], set[tuple[int, int]]]:
    """The conditions :func:`ablation_curve` measures, in its order, as ``(k, kind, replicate,
    neurons)``, and the flagged outliers of ``ranked``. Needs no model: the random sets are drawn
    from ``n_neurons`` neurons per layer (seeded)."""
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 1:
        raise NeuronAuditError(f"k_values {k_values!r} must be positive")
    if k_values[-1] > len(ranked):
        raise NeuronAuditError(f"k={k_values[-1]} exceeds the {len(ranked)} ranked neurons")
    neurons = list(zip(ranked["layer"].astype(int), ranked["neuron"].astype(int)))
    flags = (ranked["super_weight_outlier"].to_numpy(bool) if "super_weight_outlier" in ranked
             else np.zeros(len(ranked), bool))
    outliers = {n for n, f in zip(neurons, flags) if f}
    candidates = neurons[:k_values[-1]]
    clean = [n for n, f in zip(neurons, flags) if not f]
    if without_outliers is None:
        without_outliers = any(n in outliers for n in candidates)
    out: list[tuple[int, str, int, list[tuple[int, int]]]] = []
    if include_baseline:
        out.append((0, "baseline", 0, []))
    for k in k_values:
        top = neurons[:k]
        out.append((k, "keystone", 0, top))
        if without_outliers:
            if len(clean) < k:
                raise NeuronAuditError(f"fewer than {k} ranked neurons are not outliers")
            out.append((k, "keystone_no_outliers", 0, clean[:k]))
        for r, control in enumerate(random_controls(top, n_neurons, n_random, seed, exclude=candidates, k=k)):
            out.append((k, "random", r, control))
    return out, outliers


def condition_key(k, kind, replicate, neuron_set) -> str:
    """A condition's identity: its k, kind, replicate and neurons, as JSON."""
    return json.dumps([int(k), kind, int(replicate), [[int(l), int(i)] for l, i in neuron_set]])


def ablation_curve(
    model,
    tokenizer,
    adapter,
    ranked: pd.DataFrame,
    generic_texts: Sequence[str],
    task_prompts: Mapping[str, pd.DataFrame],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    n_random: int = 3,
    seed: int = 0,
    positions: Sequence[str] = DEFAULT_POSITIONS,
    include_baseline: bool = True,
    without_outliers: bool | None = None,
    progress=None,
    checkpoint: RowCheckpoint | None = None,
    only: Sequence[int] | None = None,
    **capability_kwargs,
) -> pd.DataFrame:
    """Capability after ablating the top-``k`` of ``ranked`` (strongest first; ``layer``,
    ``neuron`` and optionally ``super_weight_outlier``) vs ``n_random`` same-layer random sets.

    Returns one row per (k, kind, replicate) with the columns of :func:`curve_schema`; ``kind``
    is ``baseline`` (k = 0, no edit), ``keystone``, ``keystone_no_outliers`` (top-k skipping
    flagged outliers; by default only when the top ``max(k)`` holds one) or ``random``
    (:func:`ablation_conditions`). ``only`` measures just those positions of that list (one job of
    a sharded curve), in its order.

    ``checkpoint`` (:class:`neuronaudit.io.RowCheckpoint`) receives each measured row as soon as it
    exists; a rerun with the same inputs and settings (the same fingerprint) reuses those rows and
    measures only the missing ones, so an interrupted curve resumes instead of restarting.
    """
    conditions, outliers = ablation_conditions(ranked, k_values, n_random, seed, adapter.n_neurons,
                                               include_baseline, without_outliers)
    if only is not None:
        conditions = [conditions[i] for i in only]
    groups = list(task_prompts)
    rows = []
    say = progress or (lambda msg: None)

    fingerprint = _fingerprint(
        generic_texts, task_prompts, positions, capability_kwargs,
        getattr(getattr(model, "config", None), "_name_or_path", None), sum(p.numel() for p in model.parameters()),
    )
    done = checkpoint.load(fingerprint) if checkpoint is not None else {}

    for k, kind, replicate, neuron_set in conditions:
        key = condition_key(k, kind, replicate, neuron_set)
        if key in done:
            say(f"k={k} {kind} {replicate} (from checkpoint)")
            rows.append(done[key])
            continue
        say(f"k={k} {kind} {replicate}")
        plan = ablation_plan(neuron_set, positions) if neuron_set else None
        report = capability_report(model, tokenizer, adapter, generic_texts, task_prompts, plan=plan,
                                   **capability_kwargs)
        row = _curve_row(k, kind, replicate, neuron_set, outliers, report, groups)
        rows.append(row)
        if checkpoint is not None:
            checkpoint.append(key, row)
    df = pd.DataFrame.from_records(rows)
    return df[list(curve_schema(groups).names)]


# --- summary -----------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4g}"


def summarise_curve(curve: pd.DataFrame, groups: Sequence[str], n_random: int) -> dict:
    """Per-k comparison of the keystone ablation with its random controls, in numbers and words.

    For perplexity, "separates" at ``k`` means the keystone perplexity exceeds every random
    control; for accuracy, that it is below every random control. Nothing is claimed beyond that.
    """
    base = curve[curve["kind"] == "baseline"]
    baseline = None
    if len(base):
        b = base.iloc[0]
        baseline = {"perplexity": float(b["perplexity"]),
                    **{f"accuracy__{g}": float(b[f"accuracy__{g}"]) for g in groups}}
    per_k = []
    for k in sorted(curve.loc[curve["kind"] == "keystone", "k"].unique()):
        ks = curve[(curve["k"] == k) & (curve["kind"] == "keystone")].iloc[0]
        rnd = curve[(curve["k"] == k) & (curve["kind"] == "random")]
        entry = {"k": int(k), "n_outliers": int(ks["n_outliers"]), "n_random": int(len(rnd))}
        kp, rp = float(ks["perplexity"]), rnd["perplexity"].to_numpy(float)
        entry["perplexity"] = {
            "keystone": kp,
            "random_min": float(rp.min()) if rp.size else math.nan,
            "random_median": float(np.median(rp)) if rp.size else math.nan,
            "random_max": float(rp.max()) if rp.size else math.nan,
            "ratio_to_random_median": kp / float(np.median(rp)) if rp.size else math.nan,
            "ratio_to_random_max": kp / float(rp.max()) if rp.size else math.nan,
            "separates": bool(rp.size and kp > rp.max()),
        }
        nk = curve[(curve["k"] == k) & (curve["kind"] == "keystone_no_outliers")]
        if len(nk):
            entry["perplexity"]["keystone_no_outliers"] = float(nk.iloc[0]["perplexity"])
            entry["perplexity"]["no_outliers_separates"] = bool(rp.size and nk.iloc[0]["perplexity"] > rp.max())
        entry["accuracy"] = {}
        for g in groups:
            ka, ra = float(ks[f"accuracy__{g}"]), rnd[f"accuracy__{g}"].to_numpy(float)
            entry["accuracy"][g] = {
                "keystone": ka,
                "random_min": float(ra.min()) if ra.size else math.nan,
                "random_max": float(ra.max()) if ra.size else math.nan,
                "separates": bool(ra.size and ka < ra.min()),
            }
        per_k.append(entry)
    sep_ppl = [e["k"] for e in per_k if e["perplexity"]["separates"]]
    ks = [e["k"] for e in per_k]
    lines = []
    if per_k:
        lines.append(
            f"Perplexity: the keystone ablation exceeds every one of the {n_random} same-layer random "
            f"controls at k = {sep_ppl if sep_ppl else 'none'} of {ks}."
        )
        for e in per_k:
            p = e["perplexity"]
            lines.append(
                f"k={e['k']}: keystone {_fmt(p['keystone'])} vs random {_fmt(p['random_min'])}–"
                f"{_fmt(p['random_max'])} (ratio to random median {_fmt(p['ratio_to_random_median'])})"
                + (f"; {e['n_outliers']} super-weight-like outlier(s) in the set" if e["n_outliers"] else "")
                + (f"; without outliers {_fmt(p['keystone_no_outliers'])}" if "keystone_no_outliers" in p else "")
            )
        for g in groups:
            sep = [e["k"] for e in per_k if e["accuracy"][g]["separates"]]
            lines.append(
                f"Accuracy {g}: the keystone ablation is below every random control at k = "
                f"{sep if sep else 'none'} of {ks}."
            )
        lines.append(
            f"Chance: with {n_random} random controls, a keystone value beyond all of them at one k "
            f"has probability 1/{n_random + 1} if keystone and random sets were exchangeable."
        )
    largest = per_k[-1] if per_k else None
    return {
        "baseline": baseline,
        "per_k": per_k,
        "perplexity_separates_at_k": sep_ppl,
        "perplexity_separates_at_k_max": bool(largest and largest["perplexity"]["separates"]),
        "accuracy_separates_at_k": {
            g: [e["k"] for e in per_k if e["accuracy"][g]["separates"]] for g in groups
        },
        "statement": " ".join(lines),
    }


def summarise_stability(stab: pd.DataFrame) -> list[dict]:
    """Per (basis, score, k): mean, min and max IoU over the splits beside the chance IoU; the
    primary basis (disjoint task groups, the ranking score) first."""
    out = []
    order = {b: i for i, b in enumerate(STABILITY_BASES)}
    for (basis, score, k), g in sorted(stab.groupby(["basis", "score", "k"]), key=lambda x: (order[x[0][0]], x[0][1:])):
        out.append(
            {"basis": basis, "primary": basis == "task_groups", "score": score, "k": int(k),
             "iou_mean": float(g["iou"].mean()), "iou_min": float(g["iou"].min()),
             "iou_max": float(g["iou"].max()), "iou_chance": float(g["iou_chance"].iloc[0]), "n_splits": int(len(g))}
        )
    return out


# --- stage -----------------------------------------------------------------------------------------


