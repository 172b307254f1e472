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

from dataclasses import dataclass

import torch
from torch import nn

from neuronaudit.errors import NeuronAuditError


@dataclass(frozen=True)
class ArchitectureDeclaration:
    """Where the standard sites live in one model family.

    Paths are dotted attribute paths; ``mlp_out`` is relative to a block.
    """

    family: str
    model_types: tuple[str, ...]
    base: str  # the decoder stack without the LM head
    blocks: str  # the ModuleList of blocks
    mlp_out: str  # output projection of the MLP, relative to a block
    final_norm: str
    write_is_transposed: bool = False  # GPT-2 Conv1D stores weight as [in, out]
    post_mlp_norm: str | None = None  # a norm applied to the MLP output before the residual add


DECLARATIONS: tuple[ArchitectureDeclaration, ...] = (
    ArchitectureDeclaration(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "granite"),
        base="model",
        blocks="model.layers",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
    ),
    ArchitectureDeclaration(
        family="gemma",
        model_types=("gemma",),
        base="model",
        blocks="model.layers",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
    ),
    ArchitectureDeclaration(
        family="gemma2",
        model_types=("gemma2", "gemma3_text"),
        base="model",
        blocks="model.layers",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
        post_mlp_norm="post_feedforward_layernorm",
    ),
    ArchitectureDeclaration(
        family="gpt2",
        model_types=("gpt2",),
        base="transformer",
        blocks="transformer.h",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        write_is_transposed=True,
    ),
    ArchitectureDeclaration(
        family="gpt_neox",
        model_types=("gpt_neox",),
        base="gpt_neox",
        blocks="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
    ),
    ArchitectureDeclaration(
        family="opt",
        model_types=("opt",),
        base="model.decoder",
        blocks="model.decoder.layers",
        mlp_out="fc2",
        final_norm="model.decoder.final_layer_norm",
    ),
    ArchitectureDeclaration(
        family="phi",
        model_types=("phi",),
        base="model",
        blocks="model.layers",
        mlp_out="mlp.fc2",
        final_norm="model.final_layernorm",
    ),
)

_BY_MODEL_TYPE = {mt: d for d in DECLARATIONS for mt in d.model_types}


def supported_families() -> dict[str, tuple[str, ...]]:
    """Family name -> the Hugging Face ``model_type`` values it covers."""
    return {d.family: d.model_types for d in DECLARATIONS}


def declaration_for(model_type: str) -> ArchitectureDeclaration:
    """The declaration for a config's ``model_type``; a one-line error if none exists."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        families = "; ".join(f"{f}: {', '.join(mts)}" for f, mts in supported_families().items())
        raise NeuronAuditError(
            f"unsupported architecture model_type={model_type!r}; supported families are "
            f"[{families}]; to add one, append an ArchitectureDeclaration to DECLARATIONS in "
            f"neuronaudit/models/adapters.py and add its tiny config to tests/unit/test_adapters.py"
        ) from None


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
