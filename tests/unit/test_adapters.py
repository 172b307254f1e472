"""Every adapter proves itself on a tiny random model of its family."""

import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.models.adapters import adapter_for
from neuronaudit.models.architectures import declaration_for, supported_families
from neuronaudit.testing import TINY_FAMILIES, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request):
    model = tiny_model(request.param)
    return request.param, model, adapter_for(model)


def test_every_tiny_family_is_covered_by_a_declaration():
    covered = {mt for mts in supported_families().values() for mt in mts}
    assert set(TINY_FAMILIES) <= covered


def test_hooked_unintervened_logits_equal_plain_logits(family_model):
    _, model, adapter = family_model
    reads = []
    with torch.no_grad():
        plain = model(IDS).logits
        with NeuronHooks(
            adapter,
            on_activation=lambda l, a, ctx: reads.append(l),
            on_resid=lambda l, h, ctx: reads.append(-1),
        ):
            hooked = model(IDS).logits
    assert torch.equal(plain, hooked)
    assert reads.count(-1) == adapter.n_layers  # every block output was read
    assert len(reads) == 2 * adapter.n_layers


def test_write_vector_is_what_a_unit_dose_adds(family_model):
    """Adding 1 to a_{l,i} adds exactly v_{l,i} to the MLP output at every dosed position."""
    family, model, adapter = family_model
    layer, neuron = 1, 37
    outputs = {}

    def grab(tag):
        def hook(module, args, out):
            outputs[tag] = out.detach().clone()

        return hook

    mlp_out = adapter.mlp_outs[layer]
    with torch.no_grad():
        handle = mlp_out.register_forward_hook(grab("clean"))
        model(IDS)
        handle.remove()
        plan = InterventionPlan.broadcast([NeuronEdit.dose(layer, neuron, 1.0, ["prompt"])])
        handle = mlp_out.register_forward_hook(grab("dosed"))
        with NeuronHooks(adapter, plan):
            model(IDS)
        handle.remove()
    diff = outputs["dosed"] - outputs["clean"]
    v = adapter.write_vector(layer, neuron).detach()
    assert v.shape == (adapter.d_model,)
    torch.testing.assert_close(diff, v.expand_as(diff), atol=1e-5, rtol=1e-4)


def test_residual_change_is_the_write_vector_unless_a_post_mlp_norm_is_declared(family_model):
    family, model, adapter = family_model
    layer, neuron = 2, 5
    resid = {}
    with torch.no_grad():
        with NeuronHooks(adapter, on_resid=lambda l, h, c: resid.__setitem__(("clean", l), h.clone())):
            model(IDS)
        plan = InterventionPlan.broadcast([NeuronEdit.dose(layer, neuron, 2.0, ["prompt"])])
        with NeuronHooks(adapter, plan, on_resid=lambda l, h, c: resid.__setitem__(("dosed", l), h.clone())):
            model(IDS)
    diff = resid[("dosed", layer)] - resid[("clean", layer)]
    v = adapter.write_vector(layer, neuron).detach()
    if adapter.declaration.post_mlp_norm:  # the norm rescales the write: the declaration says so
        assert not torch.allclose(diff, (2.0 * v).expand_as(diff), atol=1e-3)
    else:
        torch.testing.assert_close(diff, (2.0 * v).expand_as(diff), atol=1e-5, rtol=1e-4)
    assert torch.equal(resid[("dosed", layer - 1)], resid[("clean", layer - 1)])


def test_gpt2_write_matrix_is_transposed_conv1d():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    conv = adapter.mlp_outs[0]
    assert conv.weight.shape == (adapter.n_neurons, adapter.d_model)
    assert torch.equal(adapter.write_vector(0, 3), conv.weight[3, :])


def test_unsupported_architecture_names_it_and_lists_families():
    with pytest.raises(NeuronAuditError) as err:
        declaration_for("mamba")
    msg = str(err.value)
    assert "'mamba'" in msg and "llama" in msg and "gpt2" in msg and "DECLARATIONS" in msg
    assert "\n" not in msg


def test_layer_out_of_range_is_named(family_model):
    _, _, adapter = family_model
    with pytest.raises(NeuronAuditError, match=r"layer index 99 is out of range"):
        adapter.check_layers([99])
    assert adapter.check_layers([-1]) == [adapter.n_layers - 1]
