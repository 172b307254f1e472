"""The blend edit ``a ← (1 − s)·a + s·g``: exact values at the chosen positions, per-row plans,
validation, and a round trip through the intervention spec that leaves older specs unchanged."""

import json

import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.rollouts import edit_spec, parse_interventions
from neuronaudit.interventions import InterventionPlan, NeuronEdit, NeuronHooks

TEXTS = ["What is 7 plus 5?", "Hello! How are you today? I'm fine."]


def _read(store):
    def on_activation(layer, a, ctx):
        store[layer] = a.detach().clone()

    return on_activation


def test_blend_moves_each_activation_toward_the_template_only_where_asked(llama, tokenizer):
    model, adapter = llama
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    clean, edited = {}, {}
    with torch.no_grad():
        with NeuronHooks(adapter, on_activation=_read(clean)):
            model(**enc)
        plan = InterventionPlan.broadcast([
            NeuronEdit.blend(2, 7, 3.0, 0.25, ["prompt"]),
            NeuronEdit.blend(2, 9, -1.0, 1.0, ["last_prompt"]),
            NeuronEdit.dose(2, 11, 0.5, ["prompt"]),
        ])
        with NeuronHooks(adapter, plan, on_activation=_read(edited)):
            model(**enc)
    real = enc["attention_mask"].bool()
    a, b = clean[2], edited[2]
    torch.testing.assert_close(b[..., 7][real], 0.75 * a[..., 7][real] + 0.25 * 3.0)
    assert torch.equal(b[..., 7][~real], a[..., 7][~real])  # padding untouched
    assert torch.all(b[:, -1, 9] == -1.0) and torch.equal(b[:, :-1, 9], a[:, :-1, 9])  # s = 1 clamps
    torch.testing.assert_close(b[..., 11][real], a[..., 11][real] + 0.5)  # other ops unchanged beside it
    untouched = [i for i in range(adapter.n_neurons) if i not in (7, 9, 11)]
    assert torch.equal(a[..., untouched], b[..., untouched])


def test_blend_per_row_edits_only_its_row(llama, tokenizer):
    model, adapter = llama
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    clean, edited = {}, {}
    plan = InterventionPlan.per_row([[NeuronEdit.blend(1, 4, 2.0, 0.5, ["last_prompt"])], []])
    with torch.no_grad():
        with NeuronHooks(adapter, on_activation=_read(clean)):
            model(**enc)
        with NeuronHooks(adapter, plan, on_activation=_read(edited)):
            model(**enc)
    torch.testing.assert_close(edited[1][0, -1, 4], 0.5 * clean[1][0, -1, 4] + 1.0)
    assert torch.equal(edited[1][1], clean[1][1])


def test_blend_needs_a_finite_strength_and_only_a_blend_has_one():
    with pytest.raises(NeuronAuditError, match="a blend needs one"):
        NeuronEdit(0, 1, "blend", 1.0)
    with pytest.raises(NeuronAuditError, match="a strength belongs to a blend"):
        NeuronEdit(0, 1, "add", 1.0, strength=0.5)
    with pytest.raises(NeuronAuditError, match="impossible blend strength"):
        NeuronEdit.blend(0, 1, 1.0, float("nan"))


def test_blend_round_trips_through_the_spec_and_older_edits_keep_their_json():
    blend = NeuronEdit.blend(3, 1, 2.5, 0.4)
    dose = NeuronEdit.dose(3, 2, 1.0)
    items = json.loads(edit_spec([blend, dose]))
    assert items[0]["strength"] == 0.4 and "strength" not in items[1] and "source" not in items[1]
    assert set(items[1]) == {"layer", "neuron", "op", "value", "positions"}
    assert parse_interventions({"steer": items})["steer"] == [blend, dose]
