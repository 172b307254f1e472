"""Architecture declarations: where the standard sites live in each supported family (data only,
no torch import, so the workflow can check an architecture before any job)."""

from __future__ import annotations

from dataclasses import dataclass

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
            f"neuronaudit/models/architectures.py and add its tiny config to tests/unit/test_adapters.py"
        ) from None

