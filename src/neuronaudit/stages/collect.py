"""The collect stage: one streaming pass per prompt set over the chat-templated prompts, writing
per-neuron statistics and each prompt's last-token activations (the capture itself is
:mod:`neuronaudit.interventions.capture`)."""

from __future__ import annotations

from pathlib import Path

from neuronaudit.interventions.capture import collect_activations
from neuronaudit.interventions.memory import RowLoad
from neuronaudit.options import CollectOptions
from neuronaudit.prompts import render_prompts, uses_template
from neuronaudit.shards import merge_last_token, merge_stats, shard_rows
from neuronaudit.stages.common import open_model, read_prompts, resolve_batch_sizes


def run_collect(
    manifest_path: str | Path,
    prompts_table: str | Path,
    out_stats: str | Path,
    out_last_token: str | Path,
    options: CollectOptions,
    threads: int | None = None,
    shard: int | None = None,
):
    """Collect the ``collect.split`` prompts of one prompt table (with ``shard``, only that shard
    of ``collect.shard_size`` prompts); returns the statistics table."""
    o, m = options, options.model
    prompts = read_prompts(prompts_table, o.split)
    if shard is not None:
        rows = shard_rows(len(prompts), o.shard_size, shard)
        attrs = dict(prompts.attrs)
        prompts = prompts.iloc[rows.start: rows.stop].reset_index(drop=True)
        prompts.attrs.update(attrs)
    opened = open_model(manifest_path, m, threads)
    adapter, manifest = opened.adapter, opened.manifest
    # a row: a forward of max_length tokens (no head), and the float64 copies of its MLP activations
    # (the activation, its square, its absolute value) the statistics sum
    load = RowLoad(tokens=o.max_length, logits=0, hook_bytes=32 * adapter.n_neurons)
    o = resolve_batch_sizes(opened.model, opened.adapter, o, {"collect.batch_size": load})
    layers = adapter.check_layers(o.layers if o.layers is not None else range(adapter.n_layers))
    texts = render_prompts(opened.tokenizer, prompts["text"], m.chat_template, m.system_prompt)
    prov = {
        "model_id": manifest["source"],
        "model_path": manifest["path"],
        "model_type": manifest.get("model_type"),
        "weight_sha256": manifest["weight_sha256"],
        "dtype": opened.dtype,
        "device": opened.device,
        "prompt_set": prompts.attrs.get("prompt_set"),
        "prompt_set_hash": prompts.attrs.get("prompt_set_hash"),
        "split": o.split,
        "n_prompts": len(prompts),
        "shard": shard,
        "shard_size": o.shard_size if shard is not None else None,
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


def run_merge_collect(stats_paths, last_token_paths, out_stats: str | Path, out_last_token: str | Path):
    """Join a prompt set's collection shards into the tables one unsharded job writes; the
    provenance is the first shard's with the prompts of every shard counted."""
    import pyarrow.parquet as pq

    from neuronaudit.io import read_provenance, write_table

    prov = read_provenance(stats_paths[0])
    prov.update(n_prompts=sum(read_provenance(p).get("n_prompts") or 0 for p in stats_paths),
                shard=None, shards=len(stats_paths))
    stats = merge_stats([pq.read_table(p) for p in stats_paths])
    write_table(merge_last_token([pq.read_table(p) for p in last_token_paths]), out_last_token, prov)
    write_table(stats, out_stats, prov)
    return stats
