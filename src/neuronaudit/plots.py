"""Figures and derived tables for the audit report (pure functions, no I/O).

Every figure function takes pandas DataFrames and returns a :class:`matplotlib.figure.Figure`;
turning it into an image is the report's job (:func:`neuronaudit.report.figure_to_data_uri`).
Colours come from one place, :func:`color_for` / :data:`PALETTE`, so the same prompt set or
rollout type has the same colour in every figure of every report.

Input tables follow :data:`neuronaudit.io.NEURON_STATS_SCHEMA` (one row per ``(layer, neuron)``),
concatenated over prompt sets with an extra ``prompt_set`` column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from neuronaudit.errors import NeuronAuditError  # noqa: E402

__all__ = [
    "PALETTE",
    "color_for",
    "palette_for",
    "layer_profile_table",
    "layer_activation_profile",
    "neuron_outliers",
]

#: Fixed colours for names that recur across figures (prompt sets, rollout outcome types).
#: Names not listed get a stable colour from :data:`_CYCLE` chosen by a hash of the name.
PALETTE: dict[str, str] = {
    # prompt sets
    "harmful": "#d55e00",
    "harmless": "#0173b2",
    # rollout outcome types
    "refusal": "#029e73",
    "collapse": "#949494",
    "coherent_bypass": "#de8f05",
    "actionable": "#8c1c13",
    # steering conditions
    "baseline": "#333333",
    "steered": "#cc78bc",
}

# Colours for names without a fixed colour; none of them is a PALETTE colour, so an unknown name
# never borrows the colour of a known one.
_CYCLE: tuple[str, ...] = (
    "#56b4e9", "#ca9161", "#6a3d9a", "#e7298a", "#17becf", "#66a61e", "#7570b3", "#bcbd22",
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
    colors = palette_for(prof["prompt_set"].unique())
    with sns.axes_style("whitegrid"):
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True, layout="constrained")
    for name, df in prof.groupby("prompt_set", sort=True):
        c = colors[str(name)]
        label = _mpl_text(name)
        ax0.plot(df["layer"], df["mean_abs_mean"], marker="o", ms=3, color=c, label=label)
        ax0.fill_between(df["layer"], df["mean_abs_q10"], df["mean_abs_q90"], color=c, alpha=0.18, lw=0)
        ax1.plot(df["layer"], df["max_abs_max"], marker="o", ms=3, color=c, label=label)
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
    ax0.legend(title="prompt set", fontsize=8, title_fontsize=8, frameon=False)
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


def rollout_type_bars(fractions: pd.DataFrame) -> Figure:
    """Stacked bars of rollout-type fractions per horizon, one panel per (prompt set, intervention).

    ``fractions`` follows the rollouts fraction table (prompt_set, intervention, sampling, horizon,
    rollout_type, fraction, ci_low, ci_high); greedy rows are drawn when present.
    """
    df = fractions
    if "sampling" in df and (df["sampling"] == "greedy").any():
        df = df[df["sampling"] == "greedy"]
    panels = list(df.groupby(["prompt_set", "intervention"], sort=False).groups)
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1.5, 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], panels):
        g = df[(df["prompt_set"] == key[0]) & (df["intervention"] == key[1])]
        wide = g.pivot_table(index="horizon", columns="rollout_type", values="fraction", aggfunc="mean")
        wide = wide.reindex(columns=[t for t in ROLLOUT_TYPES if t in wide.columns]).fillna(0.0)
        bottom = None
        for t in wide.columns:
            ax.bar(wide.index.astype(str), wide[t], bottom=bottom, color=color_for(t), label=t, width=0.7)
            bottom = wide[t] if bottom is None else bottom + wide[t]
        ax.set_title(_mpl_text(f"{key[0]} · {key[1]}"), fontsize=9)
        ax.set_xlabel("horizon (new tokens)")
    axes[0][0].set_ylabel("fraction of rollouts")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color_for(t)) for t in ROLLOUT_TYPES]
    fig.legend(handles, ROLLOUT_TYPES, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    return fig


def screen_overview(scores: pd.DataFrame, circuits: dict[str, pd.DataFrame]) -> Figure:
    """Standardised δ of every screened neuron by layer, per behaviour, circuit neurons marked."""
    names = list(circuits)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = scores[(scores["behaviour"] == name) & scores["screened"].astype(bool)]
        ax.scatter(s["layer"], s["std_delta"], s=2, color="#bbbbbb", rasterized=True, label="neurons")
        c = circuits[name]
        ax.scatter(c["layer"], c["std_delta"], s=14, color=color_for(name), label="circuit (top-k |δ|)")
        u = s[s["universal"].astype(bool)]
        if len(u):
            ax.scatter(u["layer"], u["std_delta"], s=10, marker="x", color="#333333", label="universal")
        ax.axhline(0, color="#666666", lw=0.6)
        ax.set_title(_mpl_text(name), fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("standardised δ (pooled-std units)")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def cna_dose_response(summary: pd.DataFrame) -> Figure:
    """Refusal rate, quality and perplexity per intervention (circuit scalings, random, CAA)."""
    df = summary.copy()
    df["family"] = df["intervention"].str.extract(r"^(none|circuit_pos|circuit_neg|circuit|random|caa)")[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    order = list(df["intervention"])
    colors = {"none": "#333333", "circuit": "#d55e00", "circuit_pos": "#e69f00", "circuit_neg": "#56b4e9",
              "random": "#949494", "caa": "#cc78bc"}
    palette = [colors.get(f, "#999999") for f in df["family"]]
    for ax, col, label in zip(axes, ["refusal_rate", "quality", "perplexity_median"],
                              ["refusal rate (held-out harmful)", "quality (1 − 4-gram repetition)",
                               "median perplexity (general text)"]):
        ax.barh(order, df[col], color=palette)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    return fig


def keystone_curve(curve: pd.DataFrame) -> Figure:
    """Perplexity after ablating the top-k keystone neurons vs same-layer random controls."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ks = curve[curve["kind"] == "keystone"].sort_values("k")
    rnd = curve[curve["kind"] == "random"]
    ax.plot(ks["k"], ks["perplexity"], "o-", color="#d55e00", label="keystone top-k")
    if len(rnd):
        agg = rnd.groupby("k")["perplexity"].agg(["min", "median", "max"]).reset_index()
        ax.plot(agg["k"], agg["median"], "s--", color="#555555", label="random same-layer (median)")
        ax.fill_between(agg["k"], agg["min"], agg["max"], color="#999999", alpha=0.3, label="random min–max")
    nk = curve[curve["kind"] == "keystone_no_outliers"].sort_values("k")
    if len(nk):
        ax.plot(nk["k"], nk["perplexity"], "^:", color="#0173b2", label="keystone without outliers")
    base = curve[curve["kind"] == "baseline"]
    if len(base):
        ax.axhline(float(base["perplexity"].iloc[0]), color="#029e73", lw=1, label="no ablation")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("neurons ablated (k)")
    ax.set_ylabel("median perplexity, general text")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def saturation_plot(single: pd.DataFrame, geometry: pd.DataFrame) -> Figure:
    """Measured alignment against the saturation curve: every (neuron, x) of the single-pass
    sweep at the write layer and at the readout, with the curve for each neuron's ``c0``."""
    import numpy as np

    from neuronaudit.window import saturation_curve

    df = single.merge(geometry[["layer", "neuron", "c0"]], on=["layer", "neuron"], how="left")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    xs = np.linspace(df["x"].min(), df["x"].max(), 400)
    for ax, col, title in zip(axes, ["alignment_write", "alignment_readout"], ["write layer", "readout (final layer)"]):
        for (layer, neuron), g in df.groupby(["layer", "neuron"]):
            ax.plot(xs, saturation_curve(xs, g["c0"].iloc[0]), color="#cccccc", lw=0.6, zorder=1)
        sc = ax.scatter(df["x"], df[col], c=df["layer"], cmap="viridis", s=12, zorder=2)
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xlabel("normalised dose x = d / B (budget units)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("alignment cos(r', v)")
    fig.colorbar(sc, ax=axes, label="layer")
    return fig


def ceiling_scatter(window: pd.DataFrame) -> Figure:
    """Predicted against measured collapse ceilings (|x|) for training and held-out neurons."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ok = window.dropna(subset=["ceiling_x"])
    top = max(float(ok["ceiling_x"].max()) if len(ok) else 1.0, 1.0) * 1.2
    for ax, col, title in zip(axes, ["predicted_ceiling_x_alignment", "predicted_ceiling_x_kl"],
                              ["(a) critical alignment c*", "(b) single-pass KL threshold"]):
        for split, marker in (("train", "o"), ("heldout", "s")):
            g = ok[ok["split"] == split]
            ax.scatter(g["ceiling_x"], g[col].clip(upper=top), marker=marker, s=28, alpha=0.8,
                       label=f"{split} ({len(g)})")
        ax.plot([0, top], [0, top], color="#666666", lw=0.8)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("measured ceiling |x| (budget units)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel("predicted ceiling |x| (budget units)")
    fig.tight_layout()
    return fig


def window_diagram(window: pd.DataFrame, horizon: int) -> Figure:
    """Per neuron and dose sign: the trigger (dot) against the measured ceiling (bar end)."""
    import numpy as np

    df = window.copy()
    df["label"] = [f"{b} L{l}/N{n} {'+' if s > 0 else '−'}" for b, l, n, s in
                   zip(df["behaviour"], df["layer"], df["neuron"], df["sign"])]
    df = df.sort_values(["behaviour", "layer", "neuron", "sign"])
    fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(df) + 1)))
    y = np.arange(len(df))
    grid_max = float(np.nanmax(df[["ceiling_x", f"trigger_x_{horizon}"]].to_numpy(float))) if len(df) else 1.0
    grid_max = grid_max if np.isfinite(grid_max) else 1.0
    ceiling = df["ceiling_x"].fillna(grid_max * 1.5)
    ax.barh(y, ceiling, color=["#029e73" if v == "open" else "#bbbbbb" for v in df["verdict"]], height=0.6)
    ax.scatter(df[f"trigger_x_{horizon}"], y, color="#d55e00", zorder=3, s=14, label=f"trigger at τ={horizon}")
    ax.set_yticks(y, [_mpl_text(t) for t in df["label"]], fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("|x| (budget units): bar = coherent range up to the measured ceiling")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def attribution_panels(scores: pd.DataFrame) -> Figure:
    """Measured control against |gradient|, |standardised δ| and |cos(v, u_readout)|."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, col, label in zip(axes, ["grad", "std_delta", "readout_cos"],
                              ["|∂m/∂a| (gradient)", "|standardised δ| (forward screen)", "|cos(v, u_readout)|"]):
        for behaviour, g in scores.groupby("behaviour"):
            ax.scatter(g[col].abs(), g["control_strength"], s=22, color=color_for(str(behaviour)),
                       label=_mpl_text(behaviour), edgecolor=["black" if c else "none" for c in g["controls"]])
        ax.set_xlabel(label)
    axes[0].set_ylabel("measured control (max flip fraction below ceiling)")
    axes[-1].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
