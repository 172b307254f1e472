"""The collect stage: one streaming pass per prompt set over the chat-templated prompts, writing
per-neuron statistics and each prompt's last-token activations (the capture itself is
:mod:`neuronaudit.interventions.capture`)."""

from __future__ import annotations

from pathlib import Path

from neuronaudit.interventions.capture import collect_activations
from neuronaudit.options import CollectOptions
from neuronaudit.prompts import render_prompts, uses_template
from neuronaudit.stages.common import open_model, read_prompts


def run_collect(
    manifest_path: str | Path,
    prompts_table: str | Path,
    out_stats: str | Path,
    out_last_token: str | Path,
    options: CollectOptions,
    threads: int | None = None,
):
    """Collect the ``collect.split`` prompts of one prompt table; returns the statistics table."""
    o, m = options, options.model
    prompts = read_prompts(prompts_table, o.split)
    opened = open_model(manifest_path, m, threads)
    adapter, manifest = opened.adapter, opened.manifest
    layers = adapter.check_layers(o.layers if o.layers is not None else range(adapter.n_layers))
    texts = render_prompts(opened.tokenizer, prompts["text"], m.chat_template, m.system_prompt)
    prov = {
        "model_id": manifest["source"],
        "model_path": manifest["path"],
        "model_type": manifest.get("model_type"),
        "weight_sha256": manifest["weight_sha256"],
        "dtype": m.dtype,
        "device": opened.device,
        "prompt_set": prompts.attrs.get("prompt_set"),
        "prompt_set_hash": prompts.attrs.get("prompt_set_hash"),
        "split": o.split,
        "n_prompts": len(prompts),
        "chat_template": m.chat_template,
        "system_prompt": m.system_prompt,
        "max_length": o.max_length,
        "seed": o.seed,
        "n_layers": adapter.n_layers,
        "n_neurons": adapter.n_neurons,
        "d_model": adapter.d_model,
    }
    return collect_activations(
        opened.model, opened.tokenizer, adapter, texts, list(prompts["prompt_id"]), out_stats, out_last_token,
        layers=layers, positions=o.positions, batch_size=o.batch_size, max_length=o.max_length,
        add_special_tokens=not uses_template(opened.tokenizer, m.chat_template), provenance=prov,
    )
