"""Architecture adapters: standard site names mapped onto Hugging Face module paths.

Algorithms in this package speak only of standard sites:

``mlp_out``
    the MLP output projection of a block; its *input* is the MLP activation ``a_l`` whose
    coordinates are the neurons, and its weight columns are the write vectors ``v_{l,i}``.
``resid``
    the output of block ``l`` (the residual stream after layer ``l``).
``final_norm``
    the norm applied before the unembedding.
``unembed``
    the output embedding matrix ``[vocab, d_model]``.

Support for a family is data, not branches: one :class:`ArchitectureDeclaration` per family,
registered under the ``model_type`` values of its Hugging Face configs (the pattern of
TransformerLens' ``supported_architectures`` and pyvene's per-model site maps). To add a family,
append a declaration to :data:`DECLARATIONS` and add its tiny config to the adapter tests, which
prove that a hooked but unintervened forward equals the plain Hugging Face forward.
"""

from __future__ import annotations

import torch
from torch import nn

from neuronaudit.errors import NeuronAuditError
from neuronaudit.models.architectures import ArchitectureDeclaration, declaration_for


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


class ArchitectureAdapter:
    """Standard sites of one loaded model.

    Attributes: ``n_layers``, ``d_model`` (residual width), ``n_neurons`` (MLP width per layer).
    """

    def __init__(self, model: nn.Module, declaration: ArchitectureDeclaration):
        self.model = model
        self.declaration = declaration
        try:
            self.base = _get(model, declaration.base)
            self.blocks = list(_get(model, declaration.blocks))
            self.mlp_outs = [_get(block, declaration.mlp_out) for block in self.blocks]
            self.final_norm = _get(model, declaration.final_norm)
        except AttributeError as err:
            raise NeuronAuditError(
                f"model {type(model).__name__} does not match the {declaration.family!r} "
                f"declaration: {err}"
            ) from None
        self.n_layers = len(self.blocks)
        w0 = self.write_matrix(0)
        self.d_model, self.n_neurons = int(w0.shape[0]), int(w0.shape[1])

    @property
    def family(self) -> str:
        return self.declaration.family

    @property
    def hook_site(self) -> str:
        """Human-readable name of the hooked module, e.g. ``model.layers.{l}.mlp.down_proj``."""
        return f"{self.declaration.blocks}.{{layer}}.{self.declaration.mlp_out}:input"

    def write_matrix(self, layer: int) -> torch.Tensor:
        """``W_out`` of layer ``layer`` as ``[d_model, n_neurons]``: column ``i`` is ``v_{l,i}``."""
        weight = self.mlp_outs[layer].weight
        return weight.T if self.declaration.write_is_transposed else weight

    def write_vector(self, layer: int, neuron: int) -> torch.Tensor:
        """``v_{l,i}``, shape ``[d_model]``: what adding 1 to ``a_{l,i}`` adds to the MLP output."""
        return self.write_matrix(layer)[:, neuron]

    def write_norms(self, layer: int) -> torch.Tensor:
        """``||v_{l,i}||`` for every neuron of ``layer``, shape ``[n_neurons]``."""
        return self.write_matrix(layer).detach().float().norm(dim=0)

    @property
    def unembed(self) -> torch.Tensor:
        """Output embedding ``[vocab, d_model]``."""
        return self.model.get_output_embeddings().weight

    def check_layers(self, layers) -> list[int]:
        """Validate layer indices (negative ones count from the end); one-line error if out of range."""
        out = []
        for layer in layers:
            idx = int(layer)
            if not -self.n_layers <= idx < self.n_layers:
                raise NeuronAuditError(
                    f"layer index {layer} is out of range for a model with {self.n_layers} layers "
                    f"(valid: 0..{self.n_layers - 1})"
                )
            out.append(idx % self.n_layers)
        return out

    def check_neuron(self, neuron: int) -> int:
        if not 0 <= int(neuron) < self.n_neurons:
            raise NeuronAuditError(
                f"neuron index {neuron} is out of range for an MLP of width {self.n_neurons}"
            )
        return int(neuron)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a loaded Hugging Face causal LM (one-line error if unsupported)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ArchitectureAdapter(model, declaration_for(str(model_type)))
