"""The CNA stage: circuit scaling against a random circuit and CAA, typed rollouts and
capability under each (the algorithm is :mod:`neuronaudit.methods.cna`).

The CAA vectors need the residual stream at the last prompt token, which the collect stage does
not store (it keeps MLP activations); this stage computes them with one forward pass over the
discovery prompts of the behaviour's positive and negative sets before any rollout."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.capability import capability_report
from neuronaudit.interventions.hooks import InterventionPlan
from neuronaudit.io import provenance, write_table
from neuronaudit.methods.cna import (
    caa_layers,
    caa_vectors,
    cna_interventions,
    pick_at_matched_quality,
    residual_means,
    summarise,
)
from neuronaudit.models.loading import read_manifest
from neuronaudit.options import CnaOptions, RolloutOptions
from neuronaudit.stages.common import (
    capability_load,
    open_model,
    read_circuit,
    read_prompts,
    read_table,
    resolve_batch_sizes,
    rollout_load,
)
from neuronaudit.stages.rollouts import run_rollouts

log = logging.getLogger("neuronaudit")


#: CNA rollouts are greedy, read at one horizon (``cna.max_new_tokens``), on held-out prompts.
SPLIT = "heldout"
#: The CAA vectors are mean differences over the discovery prompts (like the screen's δ).
CAA_SPLIT = "discovery"


def cna_rollout_options(o: CnaOptions) -> RolloutOptions:
    """The rollout settings of the CNA interventions: greedy, one horizon, ``cna.prompts`` prompts."""
    return RolloutOptions(model=o.model, judge=o.judge, horizons=[o.max_new_tokens], sampling=["greedy"],
                          temperature=1.0, top_p=1.0, prompts_per_set=o.prompts, batch_size=o.batch_size,
                          shard_size=0, seed=o.seed)


def run_cna(
    manifest_path: str | Path,
    circuit_path: str | Path,
    harmful_table: str | Path,
    negative_table: str | Path,
    generic_table: str | Path,
    task_tables: Mapping[str, str | Path],
    out_rollouts: str | Path,
    out_fractions: str | Path,
    out_summary: str | Path,
    options: CnaOptions,
    threads: int | None = None,
) -> pd.DataFrame:
    """Circuit scaling, random-circuit and CAA interventions: typed rollouts on held-out harmful
    prompts and capability under each; writes rollouts, type fractions and a summary table.

    ``harmful_table`` / ``negative_table``: the behaviour's positive and negative prompt tables
    (held-out positive prompts are rolled out; the discovery prompts of both give the CAA vectors).
    The summary marks the best CNA and CAA rows at matched quality (column ``pick``; the rule and
    threshold are in its provenance under ``matched_quality``)."""
    o, cap = options, options.capability
    manifest = read_manifest(manifest_path)
    circuit = read_circuit(circuit_path)
    if len(circuit) == 0:
        raise NeuronAuditError(f"circuit {str(circuit_path)!r} is empty")
    layers = caa_layers(o.caa_layers, int(manifest["n_layers"]))
    caa_pos = read_prompts(harmful_table, CAA_SPLIT, role="positive prompt table")["text"].tolist()
    caa_neg = read_prompts(negative_table, CAA_SPLIT, role="negative prompt table")["text"].tolist()
    generic = read_prompts(generic_table, SPLIT, cap.max_texts, role="generic prompt table")["text"].tolist()
    tasks = {g: read_prompts(p, SPLIT, cap.max_task_prompts) for g, p in task_tables.items()}
    opened = open_model(manifest_path, o.model, threads)
    loads = {"rollouts.batch_size": rollout_load(o.max_new_tokens),
             "capability.batch_size": capability_load(cap.max_new_tokens)}
    o = resolve_batch_sizes(opened.model, opened.adapter, o, loads)
    cap = o.capability
    means = [residual_means(opened.model, opened.tokenizer, opened.adapter, texts, layers, batch_size=cap.batch_size,
                            chat_template=o.model.chat_template, system_prompt=o.model.system_prompt)
             for texts in (caa_pos, caa_neg)]
    vectors = caa_vectors(*means)
    norms = {layer: round(float(np.linalg.norm(vectors[layer])), 3) for layer in layers}
    log.info("CAA vectors (layer: norm) %s", norms)
    interventions = cna_interventions(circuit, vectors, o.factors, o.caa_alphas, manifest["n_neurons"], o.seed)
    run_rollouts(manifest_path, {"harmful": harmful_table}, SPLIT, interventions, out_rollouts, out_fractions, None,
                 cna_rollout_options(o), opened=opened)
    typed = read_table(out_rollouts, "rollouts table")
    capability = {}
    for name, edits in interventions.items():
        plan = InterventionPlan.broadcast(edits) if edits else None
        capability[name] = capability_report(
            opened.model, opened.tokenizer, opened.adapter, generic, tasks, plan=plan,
            chat_template=o.model.chat_template, system_prompt=o.model.system_prompt, batch_size=cap.batch_size,
            max_new_tokens=cap.max_new_tokens,
        )
        log.info("capability under %s: %s", name, capability[name])
    summary = summarise(typed, capability, o.max_new_tokens)
    summary["n_edits"] = [len(interventions[n]) for n in summary["intervention"]]
    summary, matched = pick_at_matched_quality(summary, o.quality_threshold)
    prov = provenance(
        model_id=manifest.get("source"), weight_sha256=manifest.get("weight_sha256"),
        circuit=str(circuit_path), circuit_size=len(circuit), factors=list(o.factors),
        caa_alphas=list(o.caa_alphas), caa_layers_requested=list(o.caa_layers), caa_layers=layers,
        caa_positions=["last_prompt", "generated"], caa_site="residual stream after the block (block output)",
        caa_vector="mean residual at the last prompt token, positive minus negative discovery prompts",
        caa_prompts={"positive": len(caa_pos), "negative": len(caa_neg), "split": CAA_SPLIT},
        caa_vector_norms={str(layer): norm for layer, norm in norms.items()},
        prompts=o.prompts, max_new_tokens=o.max_new_tokens, seed=o.seed,
        random_circuit_seed=o.seed, capability=capability, matched_quality=matched,
    )
    write_table(pa.Table.from_pandas(summary, preserve_index=False), out_summary, prov)
    return summary
