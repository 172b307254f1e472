"""The control-window stage on tiny models: a planted controller's trigger is found where planted."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.interventions.sweeps import generated_dose_sweep
from neuronaudit.io import write_json
from neuronaudit.methods import window as law
from neuronaudit.methods.window import (
    flips,
    heldout_summary,
    layer_band,
    pick_candidates,
    trigger_crossing,
    window_table,
)
from neuronaudit.testing import tiny_model


@pytest.fixture(scope="module")
def planted():
    """A tiny llama whose neuron (3, 5) writes straight onto the unembedding row of token 42."""
    model = tiny_model("llama", vocab_size=128, seed=3)
    from neuronaudit.models.adapters import adapter_for

    adapter = adapter_for(model)
    with torch.no_grad():
        u = model.lm_head.weight[42] / model.model.norm.weight
        adapter.write_matrix(3)[:, 5] = u / u.norm()
    return model, adapter


def _first_token(model, adapter, ids, dose):
    plan = InterventionPlan.broadcast([NeuronEdit.dose(3, 5, dose, ["last_prompt"])])
    with torch.no_grad(), NeuronHooks(adapter, plan):
        return int(model(ids).logits[0, -1].argmax())


def test_sweep_finds_the_planted_trigger(planted):
    model, adapter = planted
    ids = torch.tensor([[7, 19, 33, 2, 60, 11]])
    assert _first_token(model, adapter, ids, 0.0) != 42
    lo, hi = 0.0, 1.0
    while _first_token(model, adapter, ids, hi) != 42:
        hi *= 2
    for _ in range(40):  # the planted threshold dose, by bisection on plain forwards
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _first_token(model, adapter, ids, mid) == 42 else (mid, hi)
    threshold = hi
    grid = threshold * np.array([0.25, 0.5, 0.9, 1.1, 2.0, 4.0])
    rows = [(3, 5, float(d)) for d in grid]
    result = generated_dose_sweep(model, adapter, ids, torch.ones_like(ids), rows, max_new_tokens=2)
    first = result.tokens[0, :, 0].numpy()
    table = pd.DataFrame({"neuron": 5, "x": grid, "flip": (first == 42).astype(float)})
    found = law.crossings(table, "flip", ["neuron"])["flip_x"].iloc[0]
    assert found == pytest.approx(grid[3])  # the first grid dose above the planted threshold


def test_candidates_cover_bands_and_behaviours():
    scores = pd.DataFrame({
        "layer": np.repeat(np.arange(10), 20), "neuron": np.tile(np.arange(20), 10),
        "delta": np.linspace(-1, 1, 200), "std_delta": np.linspace(-3, 2, 200),
        "screened": True, "universal": False,
    })
    scores.loc[0, "universal"] = True  # the strongest |std_delta| is universal: excluded
    c = pick_candidates({"a": scores, "b": scores}, n_candidates=3, n_random=3, n_layers=10, n_neurons=20, seed=0)
    screened = c[c.kind == "screened"]
    assert len(screened) == 6 and not ((screened.layer == 0) & (screened.neuron == 0)).any()
    assert set(c[c.kind == "random"]["band"]) == {"early", "bulk", "late"}
    # stratified across the ranking: the top neuron, then one from each half of the rest
    ranks = sorted(screened[screened.behaviour == "a"]["screen_rank"])
    assert ranks[0] == 1 and 2 <= ranks[1] <= 100 and 101 <= ranks[2] <= 199


def test_the_strongest_neurons_are_always_swept_and_the_rest_stratified():
    scores = pd.DataFrame({"layer": 1, "neuron": np.arange(103), "delta": 0.0,
                           "std_delta": np.linspace(5, 0.1, 103), "screened": True, "universal": False})
    for seed in range(5):
        c = pick_candidates({"a": scores}, n_candidates=5, n_random=0, n_layers=4, n_neurons=103, seed=seed, n_top=3)
        ranks = sorted(c["screen_rank"])
        assert ranks[:3] == [1, 2, 3] and 4 <= ranks[3] <= 53 and 54 <= ranks[4] <= 103
    # more top neurons asked for than candidates: the top n_candidates
    c = pick_candidates({"a": scores}, n_candidates=2, n_random=0, n_layers=4, n_neurons=103, seed=0, n_top=3)
    assert sorted(c["screen_rank"]) == [1, 2]


def test_every_screened_neuron_can_become_a_candidate():
    scores = pd.DataFrame({"layer": 1, "neuron": np.arange(50), "delta": 0.0,
                           "std_delta": np.linspace(5, 0.1, 50), "screened": True, "universal": False})
    seen = set()
    for seed in range(40):
        c = pick_candidates({"a": scores}, n_candidates=5, n_random=0, n_layers=4, n_neurons=50, seed=seed)
        seen |= set(c["neuron"])
    assert len(seen) > 40  # not only the top five
    assert [layer_band(l, 30) for l in (0, 5, 6, 23, 24, 29)] == ["early"] * 2 + ["bulk"] * 2 + ["late"] * 2


def test_flip_rules():
    types = ["refusal", "coherent_bypass", "collapse"]
    assert list(flips("refusal", ["", "", ""], types, [{}, {}, {}])) == [False, True, False]
    operands = [{"a": 5, "b": 7}, {"a": 5, "b": 7}]
    assert list(flips("operator", ["The answer is 35.", "12"], ["x", "x"], operands)) == [True, False]
    assert list(flips("format", ["1. apples\n2. pears", "Apples are red."], ["x", "x"], [{}, {}])) == [True, False]


def synthetic_sweeps(windows, n_prompts=4, baseline_flip=0, readout=0.95):
    """Sweeps, single pass, geometry and candidates of neurons with given (trigger, ceiling) in |x|
    (the positive sign flips, both signs collapse), ``baseline_flip`` prompts flipped at x = 0."""
    rows = [{"behaviour": "b", "layer": 5, "neuron": 0, "kind": "baseline", "sign": 0, "x": 0.0,
             "prompt_id": f"p{p}", "horizon": 8, "flip": p < baseline_flip, "collapse": False}
            for p in range(n_prompts)]
    for neuron, (trig, ceil) in enumerate(windows):
        for x in (0.5, 1.0, 2.0, 4.0, 8.0):
            for sign in (1, -1):
                for p in range(n_prompts):
                    rows.append({"behaviour": "b", "layer": 5 + neuron % 3, "neuron": neuron, "kind": "screened",
                                 "sign": sign, "x": sign * x, "prompt_id": f"p{p}", "horizon": 8,
                                 "flip": sign == 1 and trig <= x < ceil, "collapse": x >= ceil})
    sweeps = pd.DataFrame(rows)
    n = len(windows)
    layers = [5 + k % 3 for k in range(n)]
    single = pd.DataFrame([{"layer": layers[k], "neuron": k, "x": s * x, "kl": x * (k + 1), "entropy": 1.0,
                            "alignment_write": 0.99, "alignment_readout": readout}
                           for k in range(n) for x in (0.5, 1, 2, 4, 8) for s in (1, -1)])
    geometry = pd.DataFrame({"layer": layers, "neuron": range(n), "budget": 10.0, "c0": 0.0})
    neurons = pd.DataFrame({"behaviour": "b", "layer": layers, "neuron": range(n), "kind": "screened"})
    return sweeps, single, neurons, geometry


def test_window_table_measures_ceilings_triggers_and_verdicts():
    windows = [(1.0, 4.0), (4.0, 2.0), (2.0, 8.0), (8.0, 1.0)]
    sweeps, single, neurons, geometry = synthetic_sweeps(windows)
    table, fitted = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=2, seed=0)
    pos = table[table.sign == 1].set_index("neuron").sort_index()
    assert list(pos["ceiling_x"]) == [4.0, 2.0, 8.0, 1.0]
    # a collapsed rollout never counts as a flip: neurons 1 and 3 collapse before they could flip
    trig = pos["trigger_x_8"].tolist()
    assert trig[0] == 1.0 and trig[2] == 2.0 and np.isnan(trig[1]) and np.isnan(trig[3])
    assert list(pos["verdict"]) == ["open", "closed", "open", "closed"]
    assert set(table["split"]) == {"train", "heldout"} and (table.groupby("neuron")["split"].nunique() == 1).all()
    assert 0 < fitted["c_star"] < 1
    assert table.loc[table.verdict == "closed", "failure_mode"].eq("collapse_before_trigger").all()
    assert (table["collapse_x_ci_low"] <= table["ceiling_x"]).all()  # the prompt bootstrap brackets it
    assert fitted["majority_verdict"] in ("open", "closed")


def test_a_trigger_must_beat_the_unintervened_rate():
    # 3 of 4 prompts flip without any dose: 4/4 at a dose is no trigger (Wilson lower bound 0.51 < 0.75)
    sweeps, single, neurons, geometry = synthetic_sweeps([(1.0, 8.0)], baseline_flip=3)
    table, _ = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=0, seed=0)
    assert table["trigger_x_8"].isna().all() and (table["baseline_flip"] == 0.75).all()
    assert trigger_crossing([1.0, 2.0], [12, 12], [12, 12], 0.0) == 1.0
    assert np.isnan(trigger_crossing([1.0], [5], [12], 0.0))  # below half the prompts
    assert trigger_crossing([1.0], [9], [12], 0.2) == 1.0 and np.isnan(trigger_crossing([1.0], [9], [12], 0.5))


def test_the_prompt_bootstrap_of_a_trigger_uses_the_trigger_rule():
    """7 of 12 prompts flip from x = 1 (a 50% crossing) but 10 of 12 flip without a dose: no trigger,
    and no resample of the prompts finds one either (each recomputes its own x = 0 share); the naive
    50% crossing would put the CI at x = 1."""
    from neuronaudit.evaluation.stats import crossing_bootstrap

    sweeps, single, neurons, geometry = synthetic_sweeps([(1.0, 99.0)], n_prompts=12, baseline_flip=10)
    dosed = sweeps["kind"] != "baseline"
    sweeps.loc[dosed, "flip"] &= sweeps.loc[dosed, "prompt_id"].isin([f"p{p}" for p in range(7)])
    table, _ = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=0, seed=0)
    pos = table[table.sign == 1].iloc[0]
    assert np.isnan(pos["trigger_x"]) and pos["flip_x_ci_rule"] == "trigger"
    assert pos["flip_x_share_crossing"] == 0 and pos["flip_x_ci_low"] == pos["flip_x_ci_high"] == np.inf
    ids = sorted(f"p{p}" for p in range(12))  # the bootstrap's prompt order
    hits = np.array([[0.0] + [float(int(p[1:]) < 7)] * 4 for p in ids])  # x = 0.5, 1, 2, 4, 8
    naive = crossing_bootstrap(hits, [0.5, 1, 2, 4, 8], n_boot=1000, seed=0)
    assert naive[0] > 0.5 and naive[1] <= 1.0  # what a plain 50% crossing would have reported
    # without the x = 0 flips the same dose response is a trigger at 1, and its CI says so
    sweeps.loc[~dosed, "flip"] = False
    table, _ = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=0, seed=0)
    pos = table[table.sign == 1].iloc[0]
    assert pos["trigger_x"] == 1.0 and pos["flip_x_ci_low"] == 1.0 and 0 < pos["flip_x_share_crossing"] < 1
    rule = crossing_bootstrap(hits, [0.5, 1, 2, 4, 8], n_boot=1000, seed=0, baseline=np.zeros(12))
    assert rule == (pos["flip_x_share_crossing"], pos["flip_x_ci_low"], pos["flip_x_ci_high"])
    high = crossing_bootstrap(hits, [0.5, 1, 2, 4, 8], n_boot=1000, seed=0,
                              baseline=[float(int(p[1:]) < 10) for p in ids])
    assert high == (0.0, np.inf, np.inf)


def test_neither_trigger_nor_collapse_and_the_readout_cap_are_their_own_failure_modes():
    sweeps, single, neurons, geometry = synthetic_sweeps([(99.0, 99.0), (99.0, 2.0)])
    table, _ = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=0, seed=0)
    modes = table.set_index(["neuron", "sign"])["failure_mode"]
    assert modes[(0, 1)] == "neither_within_grid" and modes[(1, 1)] == "collapse_before_trigger"
    capped = window_table(*synthetic_sweeps([(99.0, 2.0)], readout=0.5), [8], n_layers=30, n_heldout=0, seed=0)[0]
    assert capped["failure_mode"].eq("normalisation_cap").all()


def test_held_out_ceilings_do_not_leak_into_the_fit():
    windows = [(1.0, 4.0), (4.0, 2.0), (2.0, 8.0), (8.0, 1.0), (1.0, 2.0), (2.0, 4.0)]
    sweeps, single, neurons, geometry = synthetic_sweeps(windows)
    table, fitted = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=3, seed=0)
    held = set(table.loc[table.split == "heldout", "neuron"])
    moved = sweeps.copy()
    mask = moved["neuron"].isin(held) & (moved["kind"] != "baseline")
    moved.loc[mask, "collapse"] = moved.loc[mask, "x"].abs() >= 0.5  # every held-out ceiling moves to 0.5
    table2, fitted2 = window_table(moved, single, neurons, geometry, [8], n_layers=30, n_heldout=3, seed=0)
    assert (table2.loc[table2.split == "heldout", "ceiling_x"] == 0.5).all()
    for key in ("c_star", "kl_threshold", "train_mean_ceiling_x", "train_median_ceiling_dose", "majority_verdict"):
        assert fitted2[key] == fitted[key], key


def test_heldout_summary_counts_every_case_against_baselines():
    windows = [(1.0, 4.0), (4.0, 2.0), (2.0, 99.0), (8.0, 1.0), (1.0, 2.0), (2.0, 4.0)]
    sweeps, single, neurons, geometry = synthetic_sweeps(windows)
    table, fitted = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=3, seed=0)
    summary = heldout_summary(table, fitted, n_boot=1000, seed=0)
    for name in ("alignment", "kl", "constant", "raw_dose"):
        entry = summary[f"predictor_{name}"]
        assert entry["n_pairs"] == 6 and entry["n_neurons"] == 3  # both signs of 3 held-out neurons, none dropped
        assert entry["mae_x_ci95"][0] <= entry["mae_x"] <= entry["mae_x_ci95"][1]
    assert "skill_vs_constant_alignment" in summary["predictor_alignment"]
    v = summary["verdicts"]
    assert v["n_heldout_neurons"] == 3 and 0 <= v["mcnemar_exact_p_value"] <= 1
    assert v["majority_class_from_training"] == fitted["majority_verdict"]


def test_heldout_ceiling_statistics_resample_neurons_and_state_the_bands():
    """ρ and every MAE, per band too, resample neurons (both signs together), with their n; the
    band definition and the layers of each band are recorded."""
    windows = [(1.0, 4.0), (4.0, 2.0), (2.0, 99.0), (8.0, 1.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0), (4.0, 1.0)]
    sweeps, single, neurons, geometry = synthetic_sweeps(windows)
    table, fitted = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=6, seed=0)
    summary = heldout_summary(table, fitted, n_boot=1000, seed=0, n_layers=30)
    bands = summary["layer_bands"]
    assert bands["bulk"] == list(range(6, 24)) and bands["early"] == list(range(6)) and bands["n_layers"] == 30
    assert "0.2·n_layers ≤ layer < 0.8·n_layers" in bands["definition"]
    held = table[table["split"] == "heldout"]
    for name in ("alignment", "kl", "constant", "raw_dose"):
        entry = summary[f"predictor_{name}"]
        assert entry["band_definition"] == bands["definition"]
        assert entry["spearman_resampling_unit"] == entry["resampling_unit"] == law.NEURON_CLUSTERS
        assert entry["spearman_n_neurons"] <= entry["n_neurons"] == 6 and entry["spearman_n_pairs"] <= 12
        for band in ("bulk", "early", "late"):
            rows = held[held["band"] == band]
            assert entry[f"n_pairs_{band}"] == len(rows) and entry[f"n_neurons_{band}"] == rows["neuron"].nunique()
            if len(rows):
                lo, hi = entry[f"mae_alignment_{band}_ci95"]
                assert lo <= entry[f"mae_alignment_{band}"] <= hi
            else:
                assert entry[f"mae_x_{band}"] is None and entry[f"mae_x_{band}_ci95"] == [None, None]
        assert entry["n_pairs_bulk"] + entry["n_pairs_early"] == 12 and entry["n_pairs_late"] == 0
    # the Spearman CI is the neuron-cluster bootstrap's, not one over (neuron, sign) rows
    from neuronaudit.evaluation.stats import cluster_bootstrap_spearman

    a = summary["predictor_kl"]
    pred = np.minimum(held["predicted_ceiling_x_kl"].to_numpy(float), held["grid_max_x"].to_numpy(float))
    ref = cluster_bootstrap_spearman(pred, held["ceiling_x_or_edge"], [f"b/{l}/{n}" for l, n in
                                     zip(held["layer"], held["neuron"])], n_boot=1000, seed=0)
    assert a["spearman_rho_ci95"] == pytest.approx([ref.ci_low, ref.ci_high])
    assert a["spearman_n_degenerate_resamples"] == ref.n_degenerate_resamples


def test_each_behaviour_is_read_at_its_own_horizons():
    sweeps, single, neurons, geometry = synthetic_sweeps([(1.0, 8.0)])
    one_token = sweeps.assign(behaviour="short", horizon=1)  # a behaviour answered in one token
    both = pd.concat([sweeps, one_token], ignore_index=True)
    cands = pd.concat([neurons, neurons.assign(behaviour="short")], ignore_index=True)
    table, _ = window_table(both, single, cands, geometry, [8], n_layers=30, n_heldout=0, seed=0)
    by = table[table.sign == 1].set_index("behaviour")
    assert by.loc["short", "final_horizon"] == 1 and by.loc["b", "final_horizon"] == 8
    assert by.loc["short", "trigger_x"] == 1.0 and by.loc["b", "trigger_x"] == 1.0
    assert (table["verdict"] == "open").sum() == 2


def test_a_behaviour_without_screened_neurons_gets_no_candidates_but_no_crash():
    scores = pd.DataFrame({"layer": 1, "neuron": np.arange(5), "delta": 0.0, "std_delta": 1.0,
                           "screened": True, "universal": True})
    c = pick_candidates({"a": scores}, n_candidates=3, n_random=1, n_layers=4, n_neurons=5, seed=0)
    assert list(c["kind"]) == ["random"]


def test_a_summary_without_triggers_says_why_its_statistics_are_null(tmp_path):
    """No neuron triggers within the grid: the readout alignment at trigger and the McNemar test
    on triggered neurons are undefined, written as null with the reason (never a bare NaN)."""
    windows = [(99.0, 4.0), (99.0, 2.0), (99.0, 8.0), (99.0, 1.0)]
    sweeps, single, neurons, geometry = synthetic_sweeps(windows)
    table, fitted = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=2, seed=0)
    summary = heldout_summary(table, fitted, n_boot=1000, seed=0)
    shown = summary["fitted_on_training_neurons"]
    assert shown["trigger_readout_alignment"] is None and "no open training neuron" in shown["null_reasons"][
        "trigger_readout_alignment"]
    assert math.isnan(fitted["trigger_readout_alignment"])  # the fitted value itself is untouched
    v = summary["verdicts"]
    assert v["mcnemar_exact_p_value_with_trigger"] is None
    assert v["null_reasons"]["mcnemar_exact_p_value_with_trigger"] == "no held-out neuron has a trigger"
    write_json(summary, tmp_path / "summary.json")


def test_the_window_job_reruns_from_recorded_sweeps_without_rolling_out(tmp_path, monkeypatch, tokenizer, capsys):
    """``neuronaudit window --sweeps-from <sweeps.parquet>`` reads a finished window's rollouts back
    and computes the single pass, tables and summary again: the same summary, no dose rolled out;
    a recording swept on another grid is refused."""
    import json

    import pyarrow.parquet as pq

    from neuronaudit.cli import main
    from neuronaudit.io import write_table
    from neuronaudit.models.adapters import adapter_for
    from neuronaudit.options import WindowOptions
    from neuronaudit.prompts import prompt_table
    from neuronaudit.stages import window as stage
    from neuronaudit.stages.common import OpenedModel
    from neuronaudit.testing import stage_options

    model = tiny_model("llama", vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    o = stage_options(WindowOptions, n_candidates=1, n_top=1, n_random=1, x_grid=[1.0, 4.0],
                      single_pass_grid=[1.0, 4.0], horizons=[2, 4], n_prompts=2, n_generic=2, n_heldout=1,
                      row_batch_size=8, max_length=32, model={"chat_template": "none"})
    monkeypatch.setattr(stage, "open_model", lambda *a, **k: OpenedModel(model, tokenizer, adapter, {}, o.model))

    def prompts(name, texts):
        df = pd.DataFrame({"prompt_id": [f"{name}{k}" for k in range(len(texts))], "text": texts,
                           "split": "heldout", "extra": "{}"})
        write_table(prompt_table(df), tmp_path / f"{name}.parquet", {"prompt_set": name})
        return f"{name}={tmp_path / f'{name}.parquet'}"

    swept = prompts("prose", ["Tell me about bread.", "Describe the sea."])
    generic = prompts("generic", ["The sun rises in the east.", "Water boils at a high heat."]).split("=", 1)[1]
    pd.DataFrame({"layer": [1, 2, 3], "neuron": [4, 5, 6], "delta": [1.0, 0.5, 0.2], "std_delta": [3.0, 2.0, 1.0],
                  "screened": True, "universal": False}).to_parquet(tmp_path / "screen.parquet")
    behaviours = {"format": {"positive": "list", "negative": "prose", "oracle": "format"}}

    def run(out, options=o, *extra):
        out.mkdir(exist_ok=True)
        return main(["window", "--manifest", str(tmp_path / "manifest.json"),
                     "--screens", f"format={tmp_path / 'screen.parquet'}", "--prompts", "format" + swept[5:],
                     "--generic", generic, "--behaviours", json.dumps(behaviours), "--options", options.to_json(),
                     *(f"--out-{k}={out / f'{k}.{ext}'}" for k, ext in (("sweeps", "parquet"),
                                                                         ("single-pass", "parquet"),
                                                                         ("window", "parquet"),
                                                                         ("summary", "json"))), *extra])

    assert run(tmp_path / "first") == 0
    first = json.loads((tmp_path / "first" / "summary.json").read_text())

    def no_rollouts(*a, **k):
        raise AssertionError("a recorded sweep must not be rolled out again")

    monkeypatch.setattr(stage, "_sweep", no_rollouts)
    recorded = tmp_path / "first" / "sweeps.parquet"
    assert run(tmp_path / "again", o, "--sweeps-from", str(recorded)) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again.pop("sweeps_source").startswith("recorded") and first.pop("sweeps_source").startswith("rolled")
    assert again == first
    pd.testing.assert_frame_equal(pq.read_table(tmp_path / "again" / "window.parquet").to_pandas(),
                                  pq.read_table(tmp_path / "first" / "window.parquet").to_pandas())
    # a recording from before tables kept their search record: the summary beside it has it, else it is counted
    import shutil

    from neuronaudit.io import read_provenance

    old = tmp_path / "old"
    old.mkdir()
    meta = read_provenance(recorded)
    del meta["search_records"]
    write_table(pq.read_table(recorded), old / "sweeps.parquet", meta)
    shutil.copy(tmp_path / "first" / "summary.json", old / "summary.json")
    assert run(tmp_path / "from_old", o, "--sweeps-from", str(old / "sweeps.parquet")) == 0
    from_old = json.loads((tmp_path / "from_old" / "summary.json").read_text())
    assert from_old["dose_search"] == first["dose_search"]
    (old / "summary.json").unlink()
    assert run(tmp_path / "from_old", o, "--sweeps-from", str(old / "sweeps.parquet")) == 0
    counted = json.loads((tmp_path / "from_old" / "summary.json").read_text())
    assert (counted["n_rollouts"], counted["n_rollouts_full_grid"]) == (first["n_rollouts"],
                                                                        first["n_rollouts_full_grid"])
    assert "counted from the recorded sweep table" in counted["dose_search"]["by_behaviour"]["format"]["note"]
    # in place: the recorded table is also the output (read before anything is written)
    assert run(tmp_path / "first", o, "--sweeps-from", str(recorded)) == 0
    assert json.loads((tmp_path / "first" / "summary.json").read_text())["n_rollouts"] == first["n_rollouts"]
    other = stage_options(WindowOptions, **{**{k: getattr(o, k) for k in ("n_candidates", "n_top", "n_random",
                          "single_pass_grid", "horizons", "n_prompts", "n_generic", "n_heldout", "row_batch_size",
                          "max_length", "model")}, "x_grid": [1.0, 2.0]})
    capsys.readouterr()
    assert run(tmp_path / "other", other, "--sweeps-from", str(recorded)) == 2
    assert "was swept with window.x_grid [1.0, 4.0], this run has [1.0, 2.0]" in capsys.readouterr().err
