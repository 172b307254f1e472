"""The control-window law's pure parts: curve, inverse, crossings, predictors, verdict scoring."""

import numpy as np
import pandas as pd
import pytest

from neuronaudit.evaluation.stats import bootstrap_ci
from neuronaudit.methods.window import (
    alignment,
    classify_failure,
    crossings,
    dose_for_alignment,
    first_crossing,
    fit_critical_alignment,
    fit_kl_threshold,
    predict_ceiling_from_alignment,
    saturation_curve,
    score_verdicts,
    split_neurons,
    verdict,
)


def test_saturation_curve_is_the_geometry_of_adding_the_write():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=64), rng.normal(size=64)
    budget = np.linalg.norm(r) / np.linalg.norm(v)
    c0 = alignment(r, v)
    for d in (-30.0, -2.0, 0.0, 0.5, 4.0, 100.0):
        assert alignment(r + d * v, v) == pytest.approx(saturation_curve(d / budget, c0), abs=1e-12)
    assert saturation_curve(1e6, c0) == pytest.approx(1.0, abs=1e-6)
    assert saturation_curve(-1e6, c0) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("c0", [-0.6, -0.1, 0.0, 0.2, 0.7])
@pytest.mark.parametrize("c", [-0.95, -0.3, 0.3, 0.8, 0.99])
def test_dose_for_alignment_inverts_the_curve(c0, c):
    x = dose_for_alignment(c, c0)
    assert saturation_curve(x, c0) == pytest.approx(c, abs=1e-9)
    assert np.isnan(dose_for_alignment(1.0, c0))


def test_first_crossing_and_per_group_crossings():
    assert first_crossing([0.5, 1, 2, 4], [0, 0.25, 0.5, 1.0]) == 2
    assert np.isnan(first_crossing([1, 2], [0.1, 0.4]))
    table = pd.DataFrame({
        "neuron": [1] * 8 + [2] * 8,
        "x": [1, 1, 2, 2, 4, 4, 8, 8] * 2,
        "flip": [0, 0, 0, 1, 1, 1, 1, 1] + [0] * 8,
    })
    out = crossings(table, "flip", ["neuron"]).set_index("neuron")["flip_x"]
    assert out[1] == 2 and np.isnan(out[2])


def test_verdict_rule():
    assert verdict(1.0, 2.0) == "open"
    assert verdict(3.0, 2.0) == "closed"
    assert verdict(np.nan, 2.0) == "closed"
    assert verdict(1.0, np.nan) == "open"


def test_critical_alignment_recovers_a_planted_universal_value():
    rng = np.random.default_rng(1)
    c0 = rng.uniform(-0.3, 0.3, size=20)
    c_star = 0.85
    ceilings = dose_for_alignment(c_star, c0)
    fitted = fit_critical_alignment(c0, ceilings)
    assert fitted == pytest.approx(c_star, abs=1e-9)
    pred = predict_ceiling_from_alignment(fitted, c0, np.ones_like(c0))
    np.testing.assert_allclose(pred, np.abs(ceilings), atol=1e-9)
    negative = dose_for_alignment(-c_star, c0)  # the same law in the other direction
    assert np.all(negative < 0)
    assert fit_critical_alignment(c0, negative) == pytest.approx(c_star, abs=1e-9)
    predicted = predict_ceiling_from_alignment(c_star, c0, -np.ones_like(c0))
    np.testing.assert_allclose(predicted, np.abs(negative), atol=1e-9)


def test_kl_threshold_fit_reproduces_ceilings_from_curves():
    xs = np.array([0.25, 0.5, 1, 2, 4, 8])
    curves = {k: (xs, 0.1 * xs ** 2 * s) for k, s in enumerate([1.0, 2.0, 0.5])}
    tau = 0.4
    ceilings = {k: first_crossing(xs, (kl >= tau).astype(float)) for k, (_, kl) in curves.items()}
    fitted = fit_kl_threshold(curves, ceilings)
    refit = {k: first_crossing(xs, (curves[k][1] >= fitted).astype(float)) for k in curves}
    assert refit == ceilings


def test_split_is_seeded_and_sized():
    keys = [(l, i) for l in range(5) for i in range(6)]
    a, b, c = split_neurons(keys, 15, 0), split_neurons(keys, 15, 0), split_neurons(keys, 15, 1)
    assert a == b and a != c and sum(v == "heldout" for v in a.values()) == 15


def test_verdict_score_uses_mcnemar_on_the_discordant_neurons():
    measured = ["closed"] * 10 + ["open"] * 5
    predicted = ["closed"] * 9 + ["open"] + ["open"] * 2 + ["closed"] * 3
    score = score_verdicts(predicted, measured, majority_class="closed")
    assert (score.correct, score.n, score.majority_correct, score.majority_class) == (11, 15, 10, "closed")
    # predictor right where the majority is wrong on 2 neurons, the reverse on 1: no evidence either way
    assert (score.only_predictor_right, score.only_majority_right) == (2, 1) and score.p_value == 1.0


def test_bootstrap_ci_brackets_the_mean():
    values = np.random.default_rng(2).normal(0.14, 0.05, size=15)
    lo, hi = bootstrap_ci(values, n_boot=1000, seed=0)
    assert lo < values.mean() < hi
    assert np.isnan(bootstrap_ci([1.0])[0])


def test_failure_modes_follow_the_stated_rules():
    # (verdict, layer, n_layers, max readout alignment, trigger readout alignment, trigger x, ceiling x)
    assert classify_failure("open", 10, 30, 0.99, 0.9, 1.0, 2.0) is None
    assert classify_failure("closed", 10, 30, 0.99, 0.5, float("nan"), float("nan")) == "neither_within_grid"
    assert classify_failure("closed", 10, 30, 0.6, 0.5, 4.0, 2.0) == "normalisation_cap"
    assert classify_failure("closed", 28, 30, 0.92, 0.95, 4.0, 2.0) == "too_little_depth"
    assert classify_failure("closed", 10, 30, 0.99, 0.5, 4.0, 2.0) == "collapse_before_trigger"



def test_generic_geometry_budget_and_alignment(llama, tokenizer):
    import torch

    from neuronaudit.interventions.hooks import NeuronHooks
    from neuronaudit.methods.window import generic_geometry

    model, adapter = llama
    texts = ["The river flows through the old city.", "Cats are animals.", "Hello there!"]
    geo = generic_geometry(model, tokenizer, adapter, texts, batch_size=2)
    assert len(geo) == adapter.n_layers * adapter.n_neurons
    row = geo[(geo.layer == 2) & (geo.neuron == 5)].iloc[0]
    v = adapter.write_vector(2, 5).detach().numpy()
    assert row.write_norm == pytest.approx(np.linalg.norm(v), rel=1e-5)
    norms, cosines = [], []
    for text in texts:
        got = {}
        enc = tokenizer(text, return_tensors="pt")
        def keep(layer, h, ctx, got=got):
            got[layer] = h[0].numpy().copy()

        with torch.no_grad(), NeuronHooks(adapter, on_resid=keep):
            model(**enc)
        norms.extend(np.linalg.norm(got[2], axis=1))
        cosines.append(alignment(got[2][-1], v))
    assert row.resid_norm == pytest.approx(np.mean(norms), rel=1e-5)
    assert row.budget == pytest.approx(np.mean(norms) / np.linalg.norm(v), rel=1e-5)
    assert row.c0 == pytest.approx(np.mean(cosines), abs=1e-5)
