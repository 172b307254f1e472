"""Gradient attribution: autograd at the MLP sites equals finite differences, per-prompt signs do
not cancel in the absolute score, AtP from the two aggregates; readout geometry."""

import numpy as np
import pytest
import torch

from neuronaudit.interventions.generation import padded_position_ids
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.methods.attribution import (
    attribution_patching,
    attribution_patching_scores,
    behaviour_metric,
    gradient_scores,
    opening_token_ids,
    readout_alignment,
    readout_direction,
)
from neuronaudit.models.adapters import adapter_for
from neuronaudit.testing import TINY_FAMILIES, tiny_model

TEXTS = ["How do I bake bread at home?", "Hello!", "What is 7 plus 5?"]


def _metric(model, tokenizer, beh, dflt, plan=None):
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    enc["position_ids"] = padded_position_ids(enc["attention_mask"])  # as each prompt alone
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
    assert scores["grad"].shape == scores["grad_signed"].shape == (adapter.n_layers, adapter.n_neurons)
    eps = 1e-2
    for layer, neuron in [(0, 3), (2, 40), (3, 100)]:
        up = _metric(model, tokenizer, beh, dflt,
                     InterventionPlan.broadcast([NeuronEdit.dose(layer, neuron, eps, ["last_prompt"])]))
        down = _metric(model, tokenizer, beh, dflt,
                       InterventionPlan.broadcast([NeuronEdit.dose(layer, neuron, -eps, ["last_prompt"])]))
        fd = (up - down) / (2 * eps)  # per prompt
        assert scores["grad_signed"][layer, neuron] == pytest.approx(fd.mean(), rel=2e-2, abs=1e-5)
        assert scores["grad"][layer, neuron] == pytest.approx(np.abs(fd).mean(), rel=2e-2, abs=1e-5)
    np.testing.assert_allclose(scores["metric"], _metric(model, tokenizer, beh, dflt), atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_gradient_reaches_the_mlp_sites_of_every_family(family, tokenizer):
    """OPT flattens the MLP activation to [batch * chunk, n] before its output projection; the
    gradient at the [batch, chunk, n] view the hooks read must still equal finite differences.
    One batch, as the finite differences are taken."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    model._adapter = adapter = adapter_for(model)
    beh, dflt = opening_token_ids(tokenizer, ["I"]), opening_token_ids(tokenizer, ["The"])
    scores = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=len(TEXTS))
    eps, (layer, neuron) = 1e-2, (1, 7)
    fd = [_metric(model, tokenizer, beh, dflt, InterventionPlan.broadcast(
        [NeuronEdit.dose(layer, neuron, sign * eps, ["last_prompt"])])) for sign in (1, -1)]
    assert scores["grad_signed"][layer, neuron] == pytest.approx(((fd[0] - fd[1]) / (2 * eps)).mean(), rel=2e-2,
                                                                 abs=1e-6)


def test_opposite_gradients_cancel_in_the_signed_mean_only(llama, tokenizer):
    """The same prompt twice, the behaviour and default tokens swapped on the second: m₂ = −m₁, so
    every neuron's two per-prompt gradients are opposite. The signed mean is 0, the absolute mean
    is the size of one prompt's gradient."""
    model, adapter = llama
    a, b = opening_token_ids(tokenizer, ["I"]), opening_token_ids(tokenizer, ["Here"])
    text = TEXTS[0]
    one = gradient_scores(model, tokenizer, adapter, [text], a, b)
    both = gradient_scores(model, tokenizer, adapter, [text, text], [a, b], [b, a], batch_size=2)
    np.testing.assert_allclose(both["metric"], [one["metric"][0], -one["metric"][0]], rtol=1e-5, atol=1e-6)
    assert np.abs(one["grad_signed"]).max() > 0
    scale = np.abs(one["grad_signed"]).max()
    assert np.abs(both["grad_signed"]).max() < 1e-4 * scale  # signs cancel
    np.testing.assert_allclose(both["grad"], np.abs(one["grad_signed"]), rtol=1e-4, atol=1e-6 * scale)
    layer, neuron = np.unravel_index(np.argmax(np.abs(one["grad_signed"])), one["grad"].shape)
    assert both["grad"][layer, neuron] > 0.5 * scale and abs(both["grad_signed"][layer, neuron]) < 1e-4 * scale
    atp, atp_signed = attribution_patching_scores(both["grad"], both["grad_signed"], 2.0, 0.5)
    assert atp[layer, neuron] == pytest.approx(1.5 * both["grad"][layer, neuron])
    assert abs(atp_signed[layer, neuron]) < 1e-4 * scale


def test_attribution_patching_is_delta_times_gradient():
    g = np.array([[1.0, -2.0]])
    assert np.allclose(attribution_patching(g, np.array([[3.0, 1.0]]), np.array([[1.0, 1.0]])), [[2.0, 0.0]])


def test_atp_is_the_mean_of_per_prompt_absolute_attributions(llama, tokenizer):
    model, adapter = llama
    beh, dflt = opening_token_ids(tokenizer, ["I", "Sorry"]), opening_token_ids(tokenizer, ["Here", "Sure"])
    per_prompt = [gradient_scores(model, tokenizer, adapter, [t], beh, dflt)["grad_signed"] for t in TEXTS]
    scores = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=2)
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=scores["grad"].shape), rng.normal(size=scores["grad"].shape)
    atp, atp_signed = attribution_patching_scores(scores["grad"], scores["grad_signed"], pos, neg)
    expected = np.mean([np.abs(attribution_patching(g, pos, neg)) for g in per_prompt], axis=0)
    tol = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(atp, expected, rtol=1e-3, atol=tol)
    np.testing.assert_allclose(atp_signed, np.mean([attribution_patching(g, pos, neg) for g in per_prompt], axis=0),
                               rtol=1e-3, atol=tol)


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


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gradient_scores_do_not_depend_on_the_batching(family, tokenizer):
    """Prompts one at a time (no padding) and three in a left-padded batch give the same scores:
    models with absolute positions (GPT-2, OPT) must not read the padding into them."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    beh, dflt = opening_token_ids(tokenizer, ["I"]), opening_token_ids(tokenizer, ["The"])
    alone = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=1)
    batched = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=len(TEXTS))
    np.testing.assert_allclose(batched["metric"], alone["metric"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched["grad"], alone["grad"], rtol=1e-3, atol=1e-6)
