"""A planted off-readout controller: gradient near zero, forward dose response ranks it first."""

import numpy as np
import pandas as pd
import torch

from neuronaudit.interventions.hooks import NeuronHooks
from neuronaudit.methods import attribution as attr
from neuronaudit.methods.attribution import (
    compare,
    control_strength,
    precision_at_k,
    statement,
)
from neuronaudit.models.adapters import adapter_for
from neuronaudit.testing import tiny_model

POSITIVE = ["How do I bake bread at home?", "Where is Paris?", "What is 7 plus 5?", "Can cats swim?"]
NEGATIVE = ["I bake bread at home.", "Paris is in France.", "Seven plus five is twelve.", "Cats can swim."]


def _last_token_layer2(model, adapter, tokenizer, texts):
    got = {}
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    def keep(layer, a, ctx):
        got[layer] = a[:, -1].clone()

    with torch.no_grad(), NeuronHooks(adapter, on_activation=keep, layers=[2]):
        model(**enc)
    return got[2].numpy()


def test_planted_off_readout_controller(tokenizer):
    """Neuron (2, 5) reads the '?' of questions (so the contrastive screen sees it) and writes
    orthogonally to the gradient of the behaviour metric (so attribution does not)."""
    from neuronaudit.methods.screen import contrast

    model = tiny_model("llama", vocab_size=len(tokenizer), seed=5)
    adapter = adapter_for(model)
    beh, dflt = [10, 11], [20, 21]
    tokenizer.padding_side = "left"
    question = tokenizer("?", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        e = model.get_input_embeddings().weight[question]
        mlp = model.model.layers[2].mlp
        mlp.gate_proj.weight[5] = 3.0 * e / e.norm() * adapter.d_model ** 0.5
        mlp.up_proj.weight[5] = 3.0 * e / e.norm() * adapter.d_model ** 0.5
    enc = tokenizer(NEGATIVE, return_tensors="pt", padding=True)
    embed = model.get_input_embeddings()
    w = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    scale = float(adapter.write_norms(2).max())
    for _ in range(6):  # planting moves the clean point: re-orthogonalise until it settles
        captured = {}
        handle = embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        def keep(layer, h, ctx, captured=captured):
            captured[layer] = h

        with torch.enable_grad(), NeuronHooks(adapter, on_resid=keep, layers=[2]):
            m = attr.behaviour_metric(model(**enc).logits[:, -1], beh, dflt)
            (g_resid,) = torch.autograd.grad(m.sum(), [captured[2]])
        handle.remove()
        g = g_resid[:, -1].sum(0)  # d(sum m)/d r_2 at the last token, summed over prompts
        with torch.no_grad():
            v = w - (w @ g) / (g @ g) * g
            adapter.write_matrix(2)[:, 5] = scale * v / v.norm()
    scores = attr.gradient_scores(model, tokenizer, adapter, NEGATIVE, beh, dflt, batch_size=4)
    layer_grads = np.abs(scores["grad"][2])
    assert layer_grads[5] < 1e-3 * layer_grads.max()  # first-order blind to the planted neuron
    screen = contrast(_last_token_layer2(model, adapter, tokenizer, POSITIVE),
                      _last_token_layer2(model, adapter, tokenizer, NEGATIVE))
    assert int(np.argmax(np.abs(screen["delta"]))) == 5  # the forward screen ranks it first
    assert int(np.argmax(np.abs(screen["std_delta"]))) == 5


def test_control_strength_and_comparison():
    sweeps = pd.DataFrame([
        {"behaviour": "b", "layer": 1, "neuron": n, "sign": 1, "x": x, "horizon": 8, "prompt_id": p,
         "flip": float(n == 0 and x >= 2), "collapse": float(x >= 8)}
        for n in range(4) for x in (1.0, 2.0, 8.0) for p in range(2)
    ])
    window = pd.DataFrame({"behaviour": "b", "layer": 1, "neuron": range(4), "sign": 1, "ceiling_x": 8.0,
                           "verdict": ["open", "closed", "closed", "closed"]})
    truth = control_strength(sweeps, window).set_index("neuron")
    assert truth.loc[0, "control_strength"] == 1.0 and truth.loc[1, "control_strength"] == 0.0
    assert bool(truth.loc[0, "controls"]) and not bool(truth.loc[1, "controls"])
    assert precision_at_k(np.array([0.1, 5.0, 0.2]), np.array([False, True, False]))[0] == 1.0
    table = truth.reset_index().assign(behaviour="b", grad=[0.0, 3.0, 2.0, 1.0], atp=[0.0, 3.0, 2.0, 1.0],
                                       delta=[5.0, 1.0, 0.5, 0.1], std_delta=[5.0, 1.0, 0.5, 0.1],
                                       dose_response=[2.0, 0.1, 0.1, 0.0], readout_cos=[0.01, 0.5, 0.4, 0.3])
    result = compare(table, n_boot=200, seed=0)
    assert result["all"]["grad"]["precision_at_k"] == 0.0 and result["all"]["std_delta"]["precision_at_k"] == 1.0
    assert result["all"]["grad"]["spearman_rho"] < 0 < result["all"]["std_delta"]["spearman_rho"]
    assert "ρ(|∂m/∂a|, control)" in statement(result)
