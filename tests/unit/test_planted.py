"""The planted model is what its docstring says: the ground truth the workflow test relies on."""

import torch

from neuronaudit.interventions import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.models.adapters import adapter_for
from neuronaudit.planted import ANSWERS, PLANTED, planted_model, planted_prompts, planted_tokenizer


def test_planted_model_answers_yes_on_on_cues_and_no_on_off_cues_and_the_relay_sits_flat():
    tokenizer = planted_tokenizer()
    model = planted_model(tokenizer)
    adapter = adapter_for(model)
    yes, no = (tokenizer(" " + ANSWERS[k], add_special_tokens=False)["input_ids"][0] for k in ("behaviour", "default"))
    on, off = planted_prompts(8)
    tokenizer.padding_side = "left"
    margins = {}
    for name, rows in (("on", on), ("off", off)):
        enc = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1]
        margins[name] = logits[:, yes] - logits[:, no]
    assert bool((margins["on"] > 10).all()) and bool((margins["off"] < -1).all()) and bool((margins["off"] > -5).all())
    # the relay's gate on the off prompts: deep in SiLU's flat region
    enc = tokenizer([r["text"] for r in off], return_tensors="pt", padding=True)
    seen = {}
    layer, neuron = PLANTED.relay

    def keep(module, args, out):
        seen["gate"] = out[:, -1, neuron].detach()

    handle = model.model.layers[layer].mlp.gate_proj.register_forward_hook(keep)
    with torch.no_grad():
        model(**enc)
    handle.remove()
    assert bool((seen["gate"] < -8).all())
    # a dose of one budget unit on the controller flips an off prompt to yes through the relay
    plan = InterventionPlan.broadcast([NeuronEdit.dose(*PLANTED.controller, 8.0 * 16.8, ["last_prompt"])])
    with NeuronHooks(adapter, plan), torch.no_grad():
        dosed = model(**enc).logits[:, -1]
    assert bool((dosed[:, yes] > dosed[:, no]).all())
