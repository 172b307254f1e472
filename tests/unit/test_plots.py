"""Figures drawn with seaborn keep the table's numbers: bar heights, CI whiskers and colours."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection

from neuronaudit.report import plots


def _fractions() -> pd.DataFrame:
    rows = []
    for intervention, types in (("none", plots.ROLLOUT_TYPES), ("circuit_x0", ("refusal", "collapse"))):
        for h in (4, 16):
            for j, t in enumerate(types):
                if intervention == "none" and h == 16 and t == "actionable":
                    continue  # no row: a zero-height bar without a whisker of its own
                f = 0.1 * (j + 1) + (0.05 if h == 16 else 0.0)
                rows.append({"prompt_set": "harmful", "intervention": intervention, "sampling": "greedy", "horizon": h,
                             "rollout_type": t, "fraction": f, "ci_low": f - 0.05, "ci_high": f + 0.1})
    sampled = pd.DataFrame(rows).assign(sampling="sampled", fraction=0.9)  # not drawn: greedy rows exist
    return pd.concat([pd.DataFrame(rows), sampled], ignore_index=True)


def test_rollout_type_bars_draw_the_table_and_its_cis():
    df = _fractions()
    fig = plots.rollout_type_bars(df)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["harmful · none", "harmful · circuit_x0"]
    greedy = df[df["sampling"] == "greedy"]
    for ax, intervention in zip(axes, ["none", "circuit_x0"]):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "16"]
        g = greedy[greedy["intervention"] == intervention].set_index(["horizon", "rollout_type"])
        whiskers = [c for c in ax.collections if isinstance(c, LineCollection)]
        segments = [s for c in whiskers for s in c.get_segments()]
        for t, bars in zip(plots.ROLLOUT_TYPES, ax.containers):
            if t not in g.index.get_level_values("rollout_type"):
                assert not len(bars)
                continue
            assert len(bars) == 2
            for i, (bar, h) in enumerate(zip(bars, (4, 16))):
                assert mcolors.to_hex(bar.get_facecolor()) == plots.color_for(t)
                assert round(bar.get_x() + bar.get_width() / 2) == i
                if (h, t) not in g.index:
                    assert bar.get_height() == 0
                    continue
                row = g.loc[(h, t)]
                assert bar.get_height() == pytest.approx(row["fraction"])
                x = bar.get_x() + bar.get_width() / 2
                seg = next(s for s in segments if s[0][0] == pytest.approx(x))
                assert sorted(seg[:, 1]) == pytest.approx([row["ci_low"], row["ci_high"]])


def test_layer_profile_and_attribution_colours_follow_the_palette():
    stats = pd.DataFrame({"layer": np.repeat([0, 1, 2], 4), "neuron": np.tile(range(4), 3), "count": 10,
                          "mean_abs": np.linspace(0.1, 1.2, 12), "max_abs": np.linspace(1, 12, 12)})
    both = pd.concat([stats.assign(prompt_set="harmful"), stats.assign(prompt_set="costs $5 $")])
    fig = plots.layer_activation_profile(both)
    colors = plots.palette_for(["harmful", "costs $5 $"])
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [r"costs \$5 \$", "harmful"]
    assert [h.get_color() for h in legend.legend_handles] == [colors["costs $5 $"], colors["harmful"]]
    fig.canvas.draw()  # a '$' in a name must not reach mathtext

    scores = pd.DataFrame({"behaviour": ["refusal", "refusal", "operator"], "grad": [-0.5, 0.2, 0.1],
                           "std_delta": [1.0, -2.0, 0.5], "readout_cos": [0.1, -0.05, 0.02],
                           "control_strength": [0.9, 0.1, 0.5], "controls": [True, False, True]})
    fig = plots.attribution_panels(scores)
    for ax in fig.axes:
        points = ax.collections
        xs = np.concatenate([p.get_offsets()[:, 0] for p in points])
        assert (xs >= 0).all()  # magnitudes
        faces = {mcolors.to_hex(c) for p in points for c in p.get_facecolors()}
        assert faces == {plots.PALETTE["refusal"], plots.PALETTE["operator"]}
    texts = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert texts == ["operator", "refusal", "controller (open window)"]
