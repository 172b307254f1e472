"""The control-window stage on tiny models: a planted controller's trigger is found where planted."""

import numpy as np
import pandas as pd
import pytest
import torch

from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.interventions.sweeps import generated_dose_sweep
from neuronaudit.methods import window as law
from neuronaudit.methods.window import flips, layer_band, pick_candidates, window_table
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
    assert [layer_band(l, 30) for l in (0, 5, 6, 23, 24, 29)] == ["early"] * 2 + ["bulk"] * 2 + ["late"] * 2


def test_flip_rules():
    types = ["refusal", "coherent_bypass", "collapse"]
    assert list(flips("refusal", ["", "", ""], types, [{}, {}, {}])) == [False, True, False]
    operands = [{"a": 5, "b": 7}, {"a": 5, "b": 7}]
    assert list(flips("operator", ["The answer is 35.", "12"], ["x", "x"], operands)) == [True, False]
    assert list(flips("format", ["1. apples\n2. pears", "Apples are red."], ["x", "x"], [{}, {}])) == [True, False]


def test_window_table_measures_ceilings_triggers_and_verdicts():
    rows = []
    for neuron, (trig, ceil) in enumerate([(1.0, 4.0), (4.0, 2.0), (2.0, 8.0), (8.0, 1.0)]):
        for x in (0.5, 1.0, 2.0, 4.0, 8.0):
            for sign in (1, -1):
                for p in range(4):
                    rows.append({"behaviour": "b", "layer": 5, "neuron": neuron, "sign": sign, "x": sign * x,
                                 "prompt_id": f"p{p}", "horizon": 8,
                                 "flip": sign == 1 and x >= trig, "collapse": x >= ceil})
    sweeps = pd.DataFrame(rows)
    single = pd.DataFrame([{"layer": 5, "neuron": n, "x": s * x, "kl": x * (n + 1), "entropy": 1.0,
                            "alignment_write": 0.99, "alignment_readout": 0.5}
                           for n in range(4) for x in (0.5, 1, 2, 4, 8) for s in (1, -1)])
    geometry = pd.DataFrame({"layer": 5, "neuron": range(4), "budget": 10.0, "c0": 0.0})
    neurons = pd.DataFrame({"behaviour": "b", "layer": 5, "neuron": range(4), "kind": "screened"})
    table, fitted = window_table(sweeps, single, neurons, geometry, [8], n_layers=30, n_heldout=2, seed=0)
    pos = table[table.sign == 1].set_index("neuron")
    assert list(pos["ceiling_x"]) == [4.0, 2.0, 8.0, 1.0]
    assert list(pos["trigger_x_8"]) == [1.0, 4.0, 2.0, 8.0]
    assert list(pos["verdict"]) == ["open", "closed", "open", "closed"]
    assert set(table["split"]) == {"train", "heldout"} and (table.groupby("neuron")["split"].nunique() == 1).all()
    assert 0 < fitted["c_star"] < 1
    assert table.loc[table.verdict == "closed", "failure_mode"].eq("collapse_before_trigger").all()
