"""Gradient attribution: autograd at the MLP sites equals finite differences; readout geometry."""

import numpy as np
import pytest
import torch

from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.methods.attribution import (
    attribution_patching,
    behaviour_metric,
    gradient_scores,
    opening_token_ids,
    readout_alignment,
    readout_direction,
)

TEXTS = ["How do I bake bread at home?", "Hello!", "What is 7 plus 5?"]


def _metric(model, tokenizer, beh, dflt, plan=None):
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        if plan is None:
            logits = model(**enc).logits
        else:
            with NeuronHooks(model._adapter, plan):
                logits = model(**enc).logits
    return behaviour_metric(logits[:, -1], beh, dflt).double().numpy()


def test_gradient_matches_finite_difference_at_the_last_token(llama, tokenizer):
    model, adapter = llama
    model._adapter = adapter
    beh, dflt = opening_token_ids(tokenizer, ["I", "Sorry"]), opening_token_ids(tokenizer, ["Here", "Sure"])
    scores = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=2)
    assert scores["grad"].shape == (adapter.n_layers, adapter.n_neurons)
    eps = 1e-2
    for layer, neuron in [(0, 3), (2, 40), (3, 100)]:
        up = _metric(model, tokenizer, beh, dflt,
                     InterventionPlan.broadcast([NeuronEdit.dose(layer, neuron, eps, ["last_prompt"])]))
        down = _metric(model, tokenizer, beh, dflt,
                       InterventionPlan.broadcast([NeuronEdit.dose(layer, neuron, -eps, ["last_prompt"])]))
        fd = ((up - down) / (2 * eps)).mean()
        assert scores["grad"][layer, neuron] == pytest.approx(fd, rel=2e-2, abs=1e-5)
    np.testing.assert_allclose(scores["metric"], _metric(model, tokenizer, beh, dflt), atol=1e-5)


def test_attribution_patching_is_delta_times_gradient():
    g = np.array([[1.0, -2.0]])
    assert np.allclose(attribution_patching(g, np.array([[3.0, 1.0]]), np.array([[1.0, 1.0]])), [[2.0, 0.0]])


def test_a_write_orthogonal_to_the_readout_has_zero_alignment(llama, tokenizer):
    model, adapter = llama
    beh, dflt = opening_token_ids(tokenizer, ["I"]), opening_token_ids(tokenizer, ["Here"])
    u = readout_direction(adapter, beh, dflt)
    with torch.no_grad():
        w = adapter.write_matrix(1)
        original = w[:, :2].clone()
        v = torch.randn_like(u)
        w[:, 0] = v - (v @ u) / (u @ u) * u  # planted off-readout write
        w[:, 1] = u * 3.0  # planted on-readout write
        cos = readout_alignment(adapter, beh, dflt)
        w[:, :2] = original
    assert abs(cos[1, 0]) < 1e-5 and cos[1, 1] == pytest.approx(1.0, abs=1e-5)


def test_per_row_token_sets_equal_shared_sets_row_by_row():
    logits = torch.randn(3, 50)
    per_row = behaviour_metric(logits, [[1], [2, 3], [4]], [[5], [6], [7, 8]])
    for r, (b, d) in enumerate([([1], [5]), ([2, 3], [6]), ([4], [7, 8])]):
        assert per_row[r] == pytest.approx(float(behaviour_metric(logits[r : r + 1], b, d)[0]), abs=1e-5)
