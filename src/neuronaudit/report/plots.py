"""Figures and derived tables for the audit report (pure functions, no I/O).

Every figure function takes pandas DataFrames and returns a :class:`matplotlib.figure.Figure`;
turning it into an image is the report's job (:func:`neuronaudit.report.page.figure_to_data_uri`).
Colours come from one place, :func:`color_for` / :data:`PALETTE`, so the same prompt set,
rollout type, behaviour or intervention family has the same colour in every figure of every
report (and of every study set side by side by ``neuronaudit compare``). Doses are drawn in
budget units (``x = d / B``), alignments as ``cosθ``, and a figure draws error bars wherever its
table carries a confidence interval.

Input tables follow :data:`neuronaudit.io.NEURON_STATS_SCHEMA` (one row per ``(layer, neuron)``),
concatenated over prompt sets with an extra ``prompt_set`` column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    MaxNLocator,  # noqa: E402
    NullLocator,
)

from neuronaudit.errors import NeuronAuditError  # noqa: E402
from neuronaudit.methods.window import saturation_curve

__all__ = [
    "PALETTE",
    "ROLLOUT_TYPES",
    "color_for",
    "palette_for",
    "layer_profile_table",
    "layer_activation_profile",
    "neuron_outliers",
    "rollout_type_bars",
    "screen_overview",
    "cna_dose_response",
    "keystone_curve",
    "saturation_plot",
    "ceiling_scatter",
    "window_diagram",
    "attribution_panels",
    "sufficient_precision",
    "sufficient_stability",
    "sufficient_control",
    "reasoning_strength",
    "reasoning_ablation",
    "reasoning_gate_roc",
    "reasoning_transfer",
]

#: Fixed colours for names that recur across figures (prompt sets, rollout outcome types, the
#: default behaviours, intervention families). The behaviour ``refusal`` shares the colour of the
#: rollout type ``refusal`` on purpose. Names not listed get a stable colour from :data:`_CYCLE`
#: chosen by a hash of the name.
PALETTE: dict[str, str] = {
    # prompt sets
    "harmful": "#d55e00",
    "harmless": "#0173b2",
    # rollout outcome types
    "refusal": "#029e73",
    "collapse": "#949494",
    "coherent_bypass": "#de8f05",
    "actionable": "#8c1c13",
    # behaviours of the default study (refusal as above)
    "operator": "#6a3d9a",
    "format": "#56b4e9",
    # steering conditions and intervention families
    "baseline": "#333333",
    "steered": "#cc78bc",
    "none": "#333333",
    "circuit": "#d55e00",
    "circuit_pos": "#e69f00",
    "circuit_neg": "#0173b2",
    "random": "#b6a27c",
    "caa": "#cc78bc",
    "keystone": "#d55e00",
    # reasoning-critical neurons and their controls
    "critical": "#029e73",
    "random_mapping": "#b6a27c",
    # sufficient sets and their baselines
    "found": "#029e73",
    "attribution": "#0173b2",
    "screen": "#de8f05",
}

# Colours for names without a fixed colour; none of them is a PALETTE colour, so an unknown name
# never borrows the colour of a known one.
_CYCLE: tuple[str, ...] = (
    "#ca9161", "#e7298a", "#17becf", "#66a61e", "#7570b3", "#bcbd22", "#a6761d", "#1b9e77",
)

_STATS_COLUMNS = ("layer", "neuron", "count", "mean_abs", "max_abs")


def _hash_index(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % len(_CYCLE)


def color_for(name: str) -> str:
    """The colour of ``name``: its :data:`PALETTE` entry, else a colour chosen by a stable hash.

    Figures use :func:`palette_for`, which gives the same colours except that an unlisted name
    whose hashed colour is already taken in that figure moves to the next free one.
    """
    name = str(name)
    return PALETTE.get(name) or _CYCLE[_hash_index(name)]


def palette_for(names: Iterable[str]) -> dict[str, str]:
    """Colours for the ``names`` drawn together in one figure.

    Names in :data:`PALETTE` keep their fixed colour. Other names start from their hashed slot in
    the colour cycle and, in sorted order, move to the next free slot if that colour is already
    taken, so two names in one figure never share a colour while the result depends only on the
    set of names (not their order).
    """
    names = sorted({str(n) for n in names})
    out = {n: PALETTE[n] for n in names if n in PALETTE}
    used = set(out.values())
    for n in names:
        if n in out:
            continue
        i = _hash_index(n)
        for step in range(len(_CYCLE)):
            c = _CYCLE[(i + step) % len(_CYCLE)]
            if c not in used:
                break
        else:  # more names than colours: reuse the hashed colour
            c = _CYCLE[i]
        out[n] = c
        used.add(c)
    return out


def _mpl_text(s: object) -> str:
    """Text safe for matplotlib: ``$`` would otherwise switch to mathtext and may fail to parse."""
    return str(s).replace("$", r"\$")


def _check_stats(stats: pd.DataFrame, needed: Iterable[str] = _STATS_COLUMNS) -> pd.DataFrame:
    missing = [c for c in needed if c not in stats.columns]
    if missing:
        raise NeuronAuditError(f"neuron stats table lacks column(s) {missing}")
    if stats.empty:
        raise NeuronAuditError("neuron stats table is empty")
    if "prompt_set" not in stats.columns:
        stats = stats.assign(prompt_set="all")
    return stats


def layer_profile_table(stats: pd.DataFrame) -> pd.DataFrame:
    """Per ``(prompt_set, layer)``: mean, 10% and 90% quantile over neurons of ``mean_abs``, the
    max over neurons of ``max_abs`` and the number of neurons. This is the data of
    :func:`layer_activation_profile`."""
    stats = _check_stats(stats)
    g = stats.groupby(["prompt_set", "layer"], sort=True)
    out = pd.DataFrame(
        {
            "mean_abs_mean": g["mean_abs"].mean(),
            "mean_abs_q10": g["mean_abs"].quantile(0.10),
            "mean_abs_q90": g["mean_abs"].quantile(0.90),
            "max_abs_max": g["max_abs"].max(),
            "n_neurons": g["neuron"].nunique(),
        }
    )
    return out.reset_index()


def layer_activation_profile(stats: pd.DataFrame) -> Figure:
    """Two panels over layers, one line per prompt set.

    Left: mean over neurons of each neuron's mean ``|a|``, with a band from the 10% to the 90%
    quantile across neurons. Right: the largest ``max |a|`` of any neuron in the layer on a log
    scale, where outlier (super-weight-like) neurons show up as spikes.
    """
    prof = layer_profile_table(stats)
    prof["label"] = prof["prompt_set"].map(_mpl_text)
    colors = palette_for(prof["prompt_set"].unique())
    palette = {_mpl_text(name): colors[name] for name in sorted(colors)}
    line = {"hue": "label", "hue_order": list(palette), "palette": palette, "marker": "o", "ms": 4,
            "errorbar": None, "legend": False}
    with sns.axes_style("whitegrid"):
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True, layout="constrained")
    sns.lineplot(data=prof, x="layer", y="mean_abs_mean", ax=ax0, **line)
    for name, df in prof.groupby("prompt_set", sort=True):
        ax0.fill_between(df["layer"], df["mean_abs_q10"], df["mean_abs_q90"], color=colors[str(name)], alpha=0.18,
                         lw=0)
    sns.lineplot(data=prof, x="layer", y="max_abs_max", ax=ax1, **line)
    ax0.set_xlabel("layer")
    ax0.set_ylabel("mean |a| over neurons")
    ax0.set_title("mean |a| per neuron (line: mean, band: 10–90% of neurons)", fontsize=9)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("max |a|")
    ax1.set_title("largest |a| of any neuron in the layer", fontsize=9)
    if (prof["max_abs_max"] > 0).any():
        ax1.set_yscale("log")
    for ax in (ax0, ax1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [plt.Line2D([], [], color=c, marker="o", ms=4, markeredgecolor="w") for c in palette.values()]
    ax0.legend(handles, list(palette), title="prompt set", fontsize=8, title_fontsize=8, frameon=False)
    return fig


def neuron_outliers(stats: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """The ``top`` neurons by ``max_abs`` (its maximum over prompt sets).

    Columns: ``layer``, ``neuron``, ``max_abs`` (max over sets), ``mean_abs`` (count-weighted mean
    over sets, i.e. the mean ``|a|`` over all positions collected), ``ratio_to_layer_median``
    (``max_abs`` divided by the median over the layer's neurons of their ``max_abs``; missing when
    that median is 0) and ``peak_prompt_set`` (the set in which ``max_abs`` was reached).
    """
    if top < 1:
        raise NeuronAuditError(f"top must be at least 1, got {top}")
    stats = _check_stats(stats)
    s = stats[["prompt_set", "layer", "neuron", "count", "mean_abs", "max_abs"]].copy()
    s["prompt_set"] = s["prompt_set"].astype(str)
    s["_weighted"] = s["mean_abs"] * s["count"]
    g = s.groupby(["layer", "neuron"], sort=True)
    total = g["count"].sum()
    per = pd.DataFrame(
        {
            "max_abs": g["max_abs"].max(),
            "mean_abs": (g["_weighted"].sum() / total.where(total > 0)),
        }
    )
    peak = s.sort_values(["max_abs", "prompt_set"], ascending=[False, True]).groupby(
        ["layer", "neuron"], sort=True
    ).head(1)
    per["peak_prompt_set"] = peak.set_index(["layer", "neuron"])["prompt_set"]
    per = per.reset_index()
    median = per.groupby("layer")["max_abs"].transform("median")
    per["ratio_to_layer_median"] = per["max_abs"] / median.where(median > 0)
    per = per.sort_values(["max_abs", "layer", "neuron"], ascending=[False, True, True], kind="stable")
    out = per.head(top)[
        ["layer", "neuron", "max_abs", "mean_abs", "ratio_to_layer_median", "peak_prompt_set"]
    ].reset_index(drop=True)
    out["ratio_to_layer_median"] = out["ratio_to_layer_median"].astype(float)
    return out


# ---------------------------------------------------------------------------------------------
# stage figures

ROLLOUT_TYPES = ("refusal", "collapse", "coherent_bypass", "actionable")

#: Axis labels shared by every figure that draws the quantity.
DOSE_LABEL = "normalised dose x = d / B (budget units)"
ABS_DOSE_LABEL = "|x| = |d| / B (budget units)"
ALIGNMENT_LABEL = "alignment cosθ = cos(r′, v)"


def _type_handles(types=ROLLOUT_TYPES):
    return [plt.Rectangle((0, 0), 1, 1, color=color_for(t)) for t in types]


def _yerr(values: pd.Series, low: pd.Series, high: pd.Series):
    """Asymmetric error-bar lengths (2, n) from a CI, clipped at zero; None without a CI."""

    if low is None or high is None:
        return None
    lo = np.clip(values.to_numpy(float) - low.to_numpy(float), 0, None)
    hi = np.clip(high.to_numpy(float) - values.to_numpy(float), 0, None)
    return np.nan_to_num(np.vstack([lo, hi]))


def rollout_type_bars(fractions: pd.DataFrame) -> Figure:
    """Rollout-type fractions per horizon with their 95% CIs, one panel per (prompt set,
    intervention): at each horizon one bar per rollout type, coloured by type.

    ``fractions`` follows the rollouts fraction table (prompt_set, intervention, sampling, horizon,
    rollout_type, fraction, ci_low, ci_high); greedy rows are drawn when present.
    """
    df = fractions
    if "sampling" in df and (df["sampling"] == "greedy").any():
        df = df[df["sampling"] == "greedy"]
    panels = list(df.groupby(["prompt_set", "intervention"], sort=False).groups)
    n = max(len(panels), 1)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, n, figsize=(max(3.6 * n + 0.6, 6.0), 3.9), squeeze=False, sharey=True)
    palette = {t: color_for(t) for t in ROLLOUT_TYPES}
    for ax, key in zip(axes[0], panels):
        g = df[(df["prompt_set"] == key[0]) & (df["intervention"] == key[1]) & df["rollout_type"].isin(ROLLOUT_TYPES)]
        horizons = sorted(g["horizon"].unique())
        means = g.groupby(["horizon", "rollout_type"])[["fraction", "ci_low", "ci_high"]].mean()
        with_rows = set(means.index.get_level_values("rollout_type")[means["fraction"].notna().to_numpy()])
        drawn = [t for t in ROLLOUT_TYPES if t in with_rows]
        # every drawn type gets a bar at every horizon (height 0 where the table has no row)
        grid = means.reindex(pd.MultiIndex.from_product([horizons, drawn], names=means.index.names)).reset_index()
        grid["fraction"] = grid["fraction"].fillna(0.0)
        sns.barplot(data=grid, x="horizon", y="fraction", hue="rollout_type", order=horizons,
                    hue_order=list(ROLLOUT_TYPES), palette=palette, saturation=1, errorbar=None, legend=False, ax=ax)
        # the 95% CIs of the table at the bar centres: seaborn draws one container per hue level in
        # hue_order (empty for a type without rows), its bars in horizon order
        for t, bars in zip(ROLLOUT_TYPES, ax.containers):
            if not len(bars):
                continue
            rows = grid[grid["rollout_type"] == t].set_index("horizon").reindex(horizons)
            ax.errorbar([b.get_x() + b.get_width() / 2 for b in bars], rows["fraction"],
                        yerr=_yerr(rows["fraction"], rows["ci_low"], rows["ci_high"]), fmt="none",
                        elinewidth=0.8, capsize=1.5, ecolor="#222222")
        ax.set_ylabel("")
        ax.set_ylim(0, 1.02)
        ax.set_title(_mpl_text(f"{key[0]} · {key[1]}"), fontsize=9)
        ax.set_xlabel("horizon (new tokens)")
    axes[0][0].set_ylabel("fraction of rollouts (95% CI)")
    fig.legend(_type_handles(), ROLLOUT_TYPES, loc="lower center", ncol=len(ROLLOUT_TYPES), fontsize=8, frameon=False,
               title="rollout type", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig


def screen_overview(scores: pd.DataFrame, circuits: dict[str, pd.DataFrame]) -> Figure:
    """Standardised δ of every screened neuron by layer, per behaviour; circuit neurons in the
    behaviour's colour with the bootstrap 95% CI of δ (rescaled by the same pooled std)."""

    names = list(circuits)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = scores[(scores["behaviour"] == name) & scores["screened"].astype(bool)]
        ax.scatter(s["layer"], s["std_delta"], s=2, color="#bbbbbb", rasterized=True, label="screened neurons")
        c = circuits[name]
        if {"ci_low", "ci_high", "delta"} <= set(c.columns) and len(c):
            scale = np.where(c["delta"].to_numpy(float) != 0, c["std_delta"] / c["delta"].replace(0, np.nan), 0.0)
            scale = np.nan_to_num(scale)
            lo, hi = c["ci_low"] * scale, c["ci_high"] * scale
            ax.errorbar(c["layer"], c["std_delta"], yerr=_yerr(c["std_delta"], np.minimum(lo, hi), np.maximum(lo, hi)),
                        fmt="o", ms=3.5, color=color_for(name), elinewidth=0.7, capsize=0,
                        label="circuit (top-k |δ|, 95% CI)")
        else:
            ax.scatter(c["layer"], c["std_delta"], s=14, color=color_for(name), label="circuit (top-k |δ|)")
        u = s[s["universal"].astype(bool)]
        if len(u):
            ax.scatter(u["layer"], u["std_delta"], s=10, marker="x", color="#333333", label="universal (excluded)")
        ax.axhline(0, color="#666666", lw=0.6)
        ax.set_title(_mpl_text(name), fontsize=10, color=color_for(name))
        ax.set_xlabel("layer")
        ax.set_ylabel("standardised δ (pooled-std units)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def screen_heldout(circuits: dict[str, pd.DataFrame]) -> Figure:
    """Per behaviour, each circuit neuron's δ on the discovery prompts (where it was picked)
    against δ re-measured on the held-out prompts of the same sets, with the held-out 95% CI;
    points below the diagonal (in the neuron's sign) show the winner's curse."""

    names = [n for n, c in circuits.items() if "delta_heldout" in c and c["delta_heldout"].notna().any()]
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.0 * max(len(names), 1), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        c = circuits[name].dropna(subset=["delta_heldout"])
        ax.errorbar(c["delta"], c["delta_heldout"],
                    yerr=_yerr(c["delta_heldout"], c["heldout_ci_low"], c["heldout_ci_high"]), fmt="o", ms=3.5,
                    color=color_for(name), elinewidth=0.7, capsize=0)
        lim = float(np.nanmax(np.abs(np.r_[c["delta"], c["heldout_ci_low"], c["heldout_ci_high"]]))) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="#666666", lw=0.8, label="held-out δ = discovery δ")
        ax.axhline(0, color="#999999", lw=0.6)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(_mpl_text(name), fontsize=10, color=color_for(name))
        ax.set_xlabel("δ, discovery prompts (ranked on)")
        ax.set_ylabel("δ, held-out prompts (95% CI)")
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    if not names:
        axes[0][0].text(0.5, 0.5, "no held-out prompts collected", ha="center", va="center")
    fig.tight_layout()
    return fig


def _family(intervention: pd.Series) -> pd.Series:
    return intervention.str.extract(r"^(none|circuit_pos|circuit_neg|circuit|random|caa)")[0].fillna("other")


def cna_dose_response(summary: pd.DataFrame, fractions: pd.DataFrame | None = None,
                      quality_threshold: float | None = None) -> Figure:
    """Per intervention (circuit scalings, random circuit, CAA per layer and α): the rollout types
    of held-out harmful prompts with the 95% CI of the refusal fraction (from ``fractions``, the
    CNA rollout-type table; the summary's refusal rate without one), quality (with the matched-
    quality threshold as a line) and perplexity, bars coloured by intervention family."""

    df = summary.reset_index(drop=True).copy()
    df["family"] = _family(df["intervention"])
    order = list(df["intervention"])
    y = np.arange(len(order))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 3, figsize=(13, 0.28 * len(order) + 1.8), sharey=True)
    ax = axes[0]
    if fractions is not None and len(fractions):
        f = fractions
        if "sampling" in f and (f["sampling"] == "greedy").any():
            f = f[f["sampling"] == "greedy"]
        f = f[f["horizon"] == f["horizon"].max()]
        wide = f.pivot_table(index="intervention", columns="rollout_type", values="fraction", aggfunc="mean")
        wide = wide.reindex(index=order, columns=list(ROLLOUT_TYPES)).fillna(0.0)
        left = np.zeros(len(order))
        for t in ROLLOUT_TYPES:
            ax.barh(y, wide[t], left=left, color=color_for(t), height=0.7)
            left += wide[t].to_numpy()
        ref = f[f["rollout_type"] == "refusal"].groupby("intervention")[["fraction", "ci_low", "ci_high"]].mean()
        ref = ref.reindex(order)
        ax.errorbar(ref["fraction"], y, xerr=_yerr(ref["fraction"], ref["ci_low"], ref["ci_high"]), fmt="none",
                    ecolor="#111111", elinewidth=0.9, capsize=2)
        ax.set_xlabel("fraction of held-out harmful rollouts\n(whisker: 95% CI of the refusal fraction)")
        fig.legend(_type_handles(), ROLLOUT_TYPES, fontsize=8, frameon=False, loc="lower left", ncol=4,
                   title="rollout type", title_fontsize=8, bbox_to_anchor=(0.01, 0.0))
    else:
        ax.barh(y, df["refusal_rate"], color=[color_for(f) for f in df["family"]], height=0.7)
        ax.set_xlabel("refusal rate (held-out harmful)")
    ax.set_xlim(0, 1)
    for ax, col, label in zip(axes[1:], ["quality", "perplexity_median"],
                              ["quality (1 − 4-gram repetition)", "median perplexity, general text"]):
        ax.barh(y, df[col], color=[color_for(f) for f in df["family"]], height=0.7)
        ax.set_xlabel(label)
    if quality_threshold is not None:
        axes[1].axvline(quality_threshold, color="#111111", lw=0.9, ls="--")
    axes[0].set_yticks(y, [_mpl_text(o) for o in order])
    axes[0].invert_yaxis()
    families = list(dict.fromkeys(df["family"]))
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=color_for(f)) for f in families], families, fontsize=8,
               frameon=False, loc="lower right", ncol=len(families), title="intervention family", title_fontsize=8,
               bbox_to_anchor=(0.99, 0.0))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def keystone_curve(curve: pd.DataFrame) -> Figure:
    """Perplexity after ablating the top-k keystone neurons vs same-layer random controls."""
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ks = curve[curve["kind"] == "keystone"].sort_values("k")
    rnd = curve[curve["kind"] == "random"]
    ax.plot(ks["k"], ks["perplexity"], "o-", color=color_for("keystone"), label="keystone top-k")
    if len(rnd):
        agg = rnd.groupby("k")["perplexity"].agg(["min", "median", "max"]).reset_index()
        ax.plot(agg["k"], agg["median"], "s--", color="#555555", label="random same-layer (median)")
        ax.fill_between(agg["k"], agg["min"], agg["max"], color=color_for("random"), alpha=0.35,
                        label="random min–max over draws")
    nk = curve[curve["kind"] == "keystone_no_outliers"].sort_values("k")
    if len(nk):
        ax.plot(nk["k"], nk["perplexity"], "^:", color="#0173b2", label="keystone without outliers")
    base = curve[curve["kind"] == "baseline"]
    if len(base):
        ax.axhline(float(base["perplexity"].iloc[0]), color=color_for("none"), lw=1, label="no ablation")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("neurons ablated (k, log scale)")
    ax.set_ylabel("median perplexity, general text (log scale)")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def saturation_plot(single: pd.DataFrame, geometry: pd.DataFrame) -> Figure:
    """Measured alignment against the saturation curve: every (neuron, x) of the single-pass
    sweep at the write layer and at the readout, with the curve for each neuron's ``c0``."""


    df = single.merge(geometry[["layer", "neuron", "c0"]], on=["layer", "neuron"], how="left")
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), sharey=True, layout="constrained")
    xs = np.linspace(df["x"].min(), df["x"].max(), 400)
    reach = float(np.nanmax(np.abs(df["x"]))) if len(df) else 1.0
    magnitudes = [m for m in (0.25, 1.0, 4.0, 16.0, 64.0) if m <= reach * 1.01] or [reach]
    ticks = [-m for m in reversed(magnitudes)] + magnitudes
    sc = None
    titles = ["write layer", "readout (after the final norm)"]
    for ax, col, title in zip(axes, ["alignment_write", "alignment_readout"], titles):
        for _, g in df.groupby(["layer", "neuron"]):
            ax.plot(xs, saturation_curve(xs, g["c0"].iloc[0]), color="#cccccc", lw=0.6, zorder=1)
        sc = ax.scatter(df["x"], df[col], c=df["layer"], cmap="viridis", s=12, zorder=2)
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel(DOSE_LABEL)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel(ALIGNMENT_LABEL)
    if sc is not None:
        fig.colorbar(sc, ax=axes, label="layer of the neuron")
    return fig


_SPLIT_MARKERS = {"train": "o", "heldout": "s"}


def _log_dose_axis(ax, values: pd.Series) -> None:
    """A log x axis of doses with plain-number ticks at the powers of two the data spans."""

    v = values.to_numpy(float)
    v = v[np.isfinite(v) & (v > 0)]
    ax.set_xscale("log")
    if not len(v):
        return
    lo, hi = np.floor(np.log2(v.min())), np.ceil(np.log2(v.max()))
    ticks = 2.0 ** np.arange(lo, hi + 1)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:g}"))


def ceiling_scatter(window: pd.DataFrame) -> Figure:
    """Predicted against measured collapse ceilings (|x|, budget units), coloured by behaviour;
    training neurons filled, held-out neurons open."""
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    ok = window.dropna(subset=["ceiling_x"])
    top = max(float(ok["ceiling_x"].max()) if len(ok) else 1.0, 1.0) * 1.2
    behaviours = list(dict.fromkeys(ok["behaviour"])) if "behaviour" in ok else []
    colors = palette_for(behaviours)
    for ax, col, title in zip(axes, ["predicted_ceiling_x_alignment", "predicted_ceiling_x_kl"],
                              ["(a) critical alignment c*", "(b) single-pass KL threshold"]):
        for (behaviour, split), g in ok.groupby(["behaviour", "split"], sort=False):
            c = colors[str(behaviour)]
            filled = split != "heldout"
            ax.scatter(g["ceiling_x"], g[col].clip(upper=top), marker=_SPLIT_MARKERS.get(split, "D"), s=30, alpha=0.75,
                       facecolors=c if filled else "none", edgecolors=c, linewidths=1.2)
        ax.plot([0, top], [0, top], color="#666666", lw=0.8)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("measured ceiling " + ABS_DOSE_LABEL)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("predicted ceiling " + ABS_DOSE_LABEL)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[b]) for b in behaviours]
    labels = [_mpl_text(b) for b in behaviours]
    for split in ("train", "heldout"):
        n = int((ok["split"] == split).sum()) if "split" in ok else 0
        face = "#555555" if split == "train" else "none"
        handles.append(plt.Line2D([], [], ls="", marker=_SPLIT_MARKERS[split], markerfacecolor=face,
                                  markeredgecolor="#555555"))
        labels.append(f"{split} ({n})")
    axes[1].legend(handles, labels, fontsize=8, frameon=False, loc="upper left")
    fig.tight_layout()
    return fig


def window_diagram(window: pd.DataFrame, horizon: int) -> Figure:
    """Per neuron and dose sign: the coherent range up to the measured ceiling (bar, coloured by
    behaviour, solid when open and pale when closed) and the trigger at ``horizon`` (dot)."""

    df = window.copy()
    df["label"] = [f"{b} L{l}/N{n} {'+' if s > 0 else '−'}" for b, l, n, s in
                   zip(df["behaviour"], df["layer"], df["neuron"], df["sign"])]
    df = df.sort_values(["behaviour", "layer", "neuron", "sign"])
    colors = palette_for(df["behaviour"].unique())
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(7.5, max(3, 0.18 * len(df) + 1.2)))
    y = np.arange(len(df))
    trig = "trigger_x" if "trigger_x" in window.columns else f"trigger_x_{horizon}"
    grid_max = float(np.nanmax(df[["ceiling_x", trig]].to_numpy(float))) if len(df) else 1.0
    grid_max = grid_max if np.isfinite(grid_max) else 1.0
    ceiling = df["ceiling_x"].fillna(grid_max * 1.5)
    is_open = (df["verdict"] == "open").to_numpy()
    bar_colors = [colors[str(b)] for b in df["behaviour"]]
    ax.barh(y[is_open], ceiling[is_open], color=[c for c, o in zip(bar_colors, is_open) if o], height=0.6)
    ax.barh(y[~is_open], ceiling[~is_open], color=[c for c, o in zip(bar_colors, is_open) if not o], alpha=0.3,
            height=0.6, hatch="///", edgecolor="white", linewidth=0)
    ax.scatter(df[trig], y, color="#111111", zorder=3, s=14)
    ax.set_yticks(y, [_mpl_text(t) for t in df["label"]], fontsize=6)
    ax.invert_yaxis()
    _log_dose_axis(ax, pd.concat([ceiling, df[trig]]))
    ax.set_xlabel(ABS_DOSE_LABEL + "; bar: coherent range up to the measured ceiling")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in colors]
    labels = [_mpl_text(b) for b in colors]
    handles += [plt.Rectangle((0, 0), 1, 1, color="#777777"), plt.Rectangle((0, 0), 1, 1, color="#777777", alpha=0.3),
                plt.Line2D([], [], ls="", marker="o", color="#111111")]
    where = "each behaviour's longest horizon" if trig == "trigger_x" else f"τ = {horizon}"
    labels += ["open (trigger below ceiling)", "closed", f"trigger at {where}"]
    ax.legend(handles, labels, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def attribution_panels(scores: pd.DataFrame) -> Figure:
    """Measured control against |gradient|, |standardised δ| and |cos(v, u_readout)|, coloured
    by behaviour; neurons with an open window outlined."""
    colors = palette_for(scores["behaviour"].astype(str).unique())
    palette = {_mpl_text(b): colors[b] for b in sorted(colors)}
    data = scores.assign(label=scores["behaviour"].astype(str).map(_mpl_text))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), sharey=True)
    for ax, col, label in zip(axes, ["grad", "std_delta", "readout_cos"],
                              ["|∂m/∂a| (gradient of the behaviour metric)", "|standardised δ| (pooled-std units)",
                               "|cos(v, u_readout)| (readout alignment)"]):
        d = data.assign(size=data[col].abs())
        # controllers outlined in black, the others without an outline
        for controls, g in d.groupby(d["controls"].astype(bool)):
            sns.scatterplot(data=g, x="size", y="control_strength", hue="label", hue_order=list(palette),
                            palette=palette, s=24, edgecolor="black" if controls else "none",
                            linewidth=1.0 if controls else 0, legend=False, ax=ax)
        ax.set_xlabel(label)
        ax.set_ylabel("")
    axes[0].set_ylabel("measured control\n(max flip fraction below the ceiling)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c) for c in palette.values()]
    labels = list(palette)
    handles.append(plt.Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="black"))
    labels.append("controller (open window)")
    axes[-1].legend(handles, labels, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


#: Order and labels of the sets compared in the sufficient-set figures.
SUFFICIENT_SETS = {"none": "unclamped", "found": "sufficient set (search)", "attribution": "top-|S| grad × act",
                   "screen": "top-|S| contrastive screen", "random": "random same-layer"}


def sufficient_precision(sets: pd.DataFrame, precision: pd.DataFrame) -> Figure:
    """Precision against set size: the best set of each growth step of every explained prompt's
    search (lines, search inputs) and the fresh-input precision of the found set and of the
    top-|S| baselines at their size (markers with Wilson intervals), one panel per task."""
    tasks = list(dict.fromkeys(precision["task"]))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.2 * max(len(tasks), 1), 3.6), sharey=True,
                                 squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grow = sets[(sets["task"] == task) & (sets["search"] == "search") & (sets["phase"] == "grow")]
        for _, g in grow.groupby("prompt_id"):
            best = g.groupby("step")["precision"].max()
            ax.plot(best.index, best.to_numpy(), "-", color="#bbbbbb", lw=1)
        rows = precision[precision["task"] == task]
        for offset, kind in zip((-0.12, 0.0, 0.12), ("found", "attribution", "screen")):
            r = rows[rows["set"] == kind]
            ax.errorbar(r["size"] + offset, r["precision"],
                        yerr=[r["precision"] - r["precision_low"], r["precision_high"] - r["precision"]],
                        fmt="o", ms=5, color=color_for(kind), label=SUFFICIENT_SETS[kind] + " (fresh)")
        ax.set_title(_mpl_text(task), fontsize=10)
        ax.set_xlabel("|S| (predicates)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("precision (share keeping the target)")
    axes[0][0].set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def sufficient_stability(precision: pd.DataFrame) -> Figure:
    """Jaccard index between the found sets of every pair of explained prompts (tasks in blocks)."""
    found = precision[precision["set"] == "found"].reset_index(drop=True)
    labels = [f"{t}/{p} {g!r}" for t, p, g in zip(found["task"], found["prompt_id"], found["target"])]
    sets = [{tuple(int(v) for v in n) for n in cell} for cell in found["neurons"]]
    n = len(sets)
    matrix = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            union = sets[i] | sets[j]
            matrix[i, j] = len(sets[i] & sets[j]) / len(union) if union else 1.0
    with sns.axes_style("white"):
        fig, ax = plt.subplots(figsize=(1.6 + 0.42 * n, 1.2 + 0.38 * n))
    sns.heatmap(pd.DataFrame(matrix, index=[_mpl_text(x) for x in labels], columns=[_mpl_text(x) for x in labels]),
                vmin=0, vmax=1, cmap="viridis", annot=n <= 16, fmt=".2f", annot_kws={"fontsize": 7}, ax=ax,
                cbar_kws={"label": "Jaccard of the sets' neurons"})
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def sufficient_control(control: pd.DataFrame) -> Figure:
    """Forcing rate (the target as next token on task prompts that lack it) and collapse rate of
    the greedy continuation, per set kind and task: means over explained prompts, with each
    prompt's value as a dot."""
    order = [k for k in SUFFICIENT_SETS if k in set(control["set"])]
    per_prompt = control.groupby(["task", "prompt_id", "set"], as_index=False)[["forcing_rate", "collapse_rate"]].mean()
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
    for ax, column, label in zip(axes, ("forcing_rate", "collapse_rate"),
                                 ("forcing rate (target as next token)", "collapsed continuations")):
        sns.barplot(per_prompt, x="task", y=column, hue="set", hue_order=order, errorbar=None,
                    palette={k: color_for(k) for k in order}, ax=ax, alpha=0.75)
        sns.stripplot(per_prompt, x="task", y=column, hue="set", hue_order=order, dodge=True, size=3,
                      palette={k: "#222222" for k in order}, legend=False, ax=ax)
        ax.set_ylabel(label)
        ax.set_xlabel("")
        ax.set_ylim(0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(handles[: len(order)], [SUFFICIENT_SETS[k] for k in labels[: len(order)]], fontsize=7,
                   frameon=False)
    if axes[1].get_legend() is not None:
        axes[1].get_legend().remove()
    fig.tight_layout()
    return fig


def reasoning_strength(steering: pd.DataFrame) -> Figure:
    """Held-out accuracy against steering strength, one panel per mode: the critical set and the
    first random same-layer set of the same size at each strength (lines, Wilson 95% bands), the
    unsteered accuracy (band), the strength chosen on validation problems marked."""
    held = steering[(steering["split"] == "heldout") & (steering["target_kind"] == "all")
                    & steering["set"].isin(["critical", "random"]) & (steering["replicate"].fillna(0) == 0)]
    held = held[~held["condition"].astype(str).str.startswith("cross ")]
    modes = list(dict.fromkeys(held["mode"].dropna()))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(4.6 * max(len(modes), 1), 3.6), sharey=True,
                                 squeeze=False)
    none = steering[(steering["split"] == "heldout") & (steering["condition"] == "none")].head(1)
    for ax, mode in zip(axes[0], modes):
        rows = held[held["mode"] == mode]
        for which, label in (("critical", "critical neurons"), ("random", "random same-layer neurons")):
            r = rows[rows["set"] == which].sort_values("strength")
            ax.plot(r["strength"], r["accuracy"], "o-", color=color_for(which), label=label)
            ax.fill_between(r["strength"], r["accuracy_low"], r["accuracy_high"], color=color_for(which), alpha=0.2)
        if len(none):
            n0 = none.iloc[0]
            ax.axhline(n0["accuracy"], color=color_for("none"), lw=1, label="unsteered")
            ax.axhspan(n0["accuracy_low"], n0["accuracy_high"], color=color_for("none"), alpha=0.08)
        chosen = rows[(rows["set"] == "critical") & (rows["chosen"] == True)]  # noqa: E712
        if len(chosen):
            ax.axvline(float(chosen["strength"].iloc[0]), color="#999999", ls=":", lw=1, label="chosen on validation")
        n = rows["n_neurons"].dropna()
        ax.set_title(_mpl_text(f"{mode}: top {int(n.iloc[0]) if len(n) else '?'} neurons"), fontsize=10)
        ax.set_xlabel("steering strength s")
    axes[0][0].set_ylabel("held-out accuracy (Wilson 95% CI)")
    axes[0][0].set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def reasoning_ablation(ablation: pd.DataFrame) -> Figure:
    """Change of held-out accuracy under each ablation (paired bootstrap 95% CI over problems):
    the critical set, random same-layer sets of the same size, and the other stages' top sets."""
    rows = ablation[(ablation["target_kind"] == "all") & (ablation["condition"] != "none")].reset_index(drop=True)
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.32 * max(len(rows), 1)))
    y = np.arange(len(rows))
    colours = [color_for("critical") if s == "critical" else color_for("random") if s == "random"
               else color_for(str(s).split(":")[0]) for s in rows["set"]]
    ax.barh(y, rows["delta"], color=colours, alpha=0.8)
    ax.errorbar(rows["delta"], y, xerr=_yerr(rows["delta"], rows["delta_low"], rows["delta_high"]), fmt="|",
                color="#222222", ecolor="#222222", capsize=2)  # the marker shows a change of exactly 0
    ax.set_yticks(y, [_mpl_text(c) for c in rows["condition"]], fontsize=8)
    ax.axvline(0, color="#333333", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("held-out accuracy change vs unedited (paired 95% CI)")
    fig.tight_layout()
    return fig


def reasoning_gate_roc(gate: pd.DataFrame, auc: float | None = None, threshold: float | None = None) -> Figure:
    """ROC of the failure probe on held-out problems (failure is the positive class), the chance
    diagonal, and the operating point of the gate's threshold."""
    held = gate[(gate["split"] == "heldout") & gate["probability"].notna()]
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(4.2, 4.0))
    score, positive = held["probability"].to_numpy(float), held["failed"].to_numpy(bool)
    if len(held) and 0 < positive.sum() < len(positive):
        thresholds = np.concatenate([[np.inf], np.unique(score)[::-1]])
        tpr = [((score >= t) & positive).sum() / positive.sum() for t in thresholds]
        fpr = [((score >= t) & ~positive).sum() / (~positive).sum() for t in thresholds]
        label = "probe" + (f" (AUC {auc:.2f})" if auc is not None and np.isfinite(auc) else "")
        ax.step(fpr, tpr, where="post", color=color_for("critical"), label=label)
        if threshold is not None and np.isfinite(threshold):
            fires = score >= threshold
            ax.plot((fires & ~positive).sum() / (~positive).sum(), (fires & positive).sum() / positive.sum(), "o",
                    color="#222222", label="gate threshold")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center", va="center", transform=ax.transAxes)
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
    ax.set_xlabel("false-alarm rate (solved problems flagged)")
    ax.set_ylabel("hit rate (failed problems flagged)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def reasoning_transfer(transfer: pd.DataFrame, source: dict | None = None) -> Figure:
    """Change of the second model's held-out accuracy under the carried steering and under random
    mappings of the same size (paired 95% CI over problems), beside the audited model's own change
    at the same setting, and the mean |correlation| of each mapping."""
    rows = transfer[transfer["condition"] != "none"].reset_index(drop=True)
    labels = list(rows["condition"])
    deltas, lows, highs = list(rows["delta"]), list(rows["delta_low"]), list(rows["delta_high"])
    colours = [color_for("critical") if c == "carried" else color_for("random_mapping") for c in labels]
    if source:
        labels.insert(0, "audited model (source)")
        deltas.insert(0, source.get("delta"))
        lows.insert(0, source.get("delta_low"))
        highs.insert(0, source.get("delta_high"))
        colours.insert(0, "#555555")
    d, lo, hi = (pd.Series(v, dtype=float) for v in (deltas, lows, highs))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 2, figsize=(9.0, 0.9 + 0.4 * max(len(labels), 2)),
                                 gridspec_kw={"width_ratios": [3, 1.3]})
    y = np.arange(len(labels))
    axes[0].barh(y, d, color=colours, alpha=0.8)
    axes[0].errorbar(d, y, xerr=_yerr(d, lo, hi), fmt="|", color="#222222", ecolor="#222222", capsize=2)
    axes[0].set_yticks(y, [_mpl_text(x) for x in labels], fontsize=8)
    axes[0].axvline(0, color="#333333", lw=1)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("held-out accuracy change vs unsteered (paired 95% CI)")
    corr = rows["mean_abs_correlation"].to_numpy(float)
    y2 = np.arange(len(rows))
    axes[1].barh(y2, corr, color=colours[-len(rows):] if len(rows) else [], alpha=0.8)
    axes[1].set_yticks(y2, [_mpl_text(x) for x in rows["condition"]], fontsize=8)
    axes[1].set_xlim(0, 1)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("mean |r| of the matches")
    fig.tight_layout()
    return fig
