"""The CNA stage: circuit scaling against a random circuit and CAA, typed rollouts and
capability under each (the algorithm is :mod:`neuronaudit.methods.cna`).

The CAA vectors need the residual stream at the last prompt token, which the collect stage does
not store (it keeps MLP activations); this stage computes them with one forward pass over the
discovery prompts of the behaviour's positive and negative sets before any rollout.

With ``cna.shard_size: n`` the interventions (:func:`~neuronaudit.methods.cna.intervention_names`,
in the order of :func:`~neuronaudit.methods.cna.cna_interventions`) are measured ``n`` at a time
by :func:`run_cna_part` jobs: part ``p`` rolls out every held-out prompt under interventions
``p·n … (p+1)·n − 1`` and measures capability under each (each part computes the CAA vectors as
the one job does); a part past the last intervention (the workflow's count, read from the config,
is an upper bound) writes an empty table without loading the model. :func:`run_merge_cna` joins
the parts into the tables one job writes: the rollouts in the one job's row order, the type
fractions bootstrapped over every prompt, the summary with the picks at matched quality over every
row."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.capability import capability_report
from neuronaudit.evaluation.rollouts import ROLLOUT_SCHEMA, rollouts_table
from neuronaudit.interventions.hooks import InterventionPlan
from neuronaudit.io import provenance, read_provenance, write_table
from neuronaudit.methods.cna import (
    caa_layers,
    caa_vectors,
    cna_interventions,
    intervention_names,
    pick_at_matched_quality,
    residual_means,
    summarise,
)
from neuronaudit.models.loading import read_manifest
from neuronaudit.options import CnaOptions, RolloutOptions
from neuronaudit.shards import cna_shard_count
from neuronaudit.stages.common import (
    capability_load,
    open_model,
    part_of_run,
    read_circuit,
    read_prompts,
    read_table,
    resolve_batch_sizes,
    rollout_load,
)
from neuronaudit.stages.rollouts import read_rollout_tables, run_rollouts, write_summaries

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


@dataclass
class _Inputs:
    """What every CNA job reads before the model: the manifest, the circuit, the CAA layers, the
    CAA discovery prompts and the capability texts and task prompts."""

    manifest: dict
    circuit: pd.DataFrame
    layers: list[int]
    caa_pos: list[str]
    caa_neg: list[str]
    generic: list[str]
    tasks: dict[str, pd.DataFrame]


def _read_inputs(manifest_path, circuit_path, harmful_table, negative_table, generic_table,
                 task_tables: Mapping[str, str | Path], o: CnaOptions) -> _Inputs:
    cap = o.capability
    manifest = read_manifest(manifest_path)
    circuit = read_circuit(circuit_path)
    if len(circuit) == 0:
        raise NeuronAuditError(f"circuit {str(circuit_path)!r} is empty")
    layers = caa_layers(o.caa_layers, int(manifest["n_layers"]))
    caa_pos = read_prompts(harmful_table, CAA_SPLIT, role="positive prompt table")["text"].tolist()
    caa_neg = read_prompts(negative_table, CAA_SPLIT, role="negative prompt table")["text"].tolist()
    generic = read_prompts(generic_table, SPLIT, cap.max_texts, role="generic prompt table")["text"].tolist()
    tasks = {g: read_prompts(p, SPLIT, cap.max_task_prompts) for g, p in task_tables.items()}
    return _Inputs(manifest, circuit, layers, caa_pos, caa_neg, generic, tasks)


def _open(manifest_path, inputs: _Inputs, o: CnaOptions, threads):
    """The opened model, the options with resolved batch sizes, every intervention (the CAA vectors
    from one forward pass over the discovery prompts) and the CAA vectors' norms by layer."""
    opened = open_model(manifest_path, o.model, threads)
    loads = {"rollouts.batch_size": rollout_load(o.max_new_tokens),
             "capability.batch_size": capability_load(o.capability.max_new_tokens)}
    o = resolve_batch_sizes(opened.model, opened.adapter, o, loads)
    means = [residual_means(opened.model, opened.tokenizer, opened.adapter, texts, inputs.layers,
                            batch_size=o.capability.batch_size, chat_template=o.model.chat_template,
                            system_prompt=o.model.system_prompt)
             for texts in (inputs.caa_pos, inputs.caa_neg)]
    vectors = caa_vectors(*means)
    norms = {layer: round(float(np.linalg.norm(vectors[layer])), 3) for layer in inputs.layers}
    log.info("CAA vectors (layer: norm) %s", norms)
    interventions = cna_interventions(inputs.circuit, vectors, o.factors, o.caa_alphas, inputs.manifest["n_neurons"],
                                      o.seed)
    return opened, o, interventions, norms


def _capability(opened, o: CnaOptions, inputs: _Inputs, interventions: Mapping[str, list]) -> dict[str, dict]:
    """The capability report under each intervention."""
    cap = o.capability
    out = {}
    for name, edits in interventions.items():
        plan = InterventionPlan.broadcast(edits) if edits else None
        out[name] = capability_report(
            opened.model, opened.tokenizer, opened.adapter, inputs.generic, inputs.tasks, plan=plan,
            chat_template=o.model.chat_template, system_prompt=o.model.system_prompt, batch_size=cap.batch_size,
            max_new_tokens=cap.max_new_tokens,
        )
        log.info("capability under %s: %s", name, out[name])
    return out


def _write_summary(typed: pd.DataFrame, capability: Mapping[str, dict], n_edits: Mapping[str, int], inputs: _Inputs,
                   o: CnaOptions, norms: Mapping, circuit_path, out_summary) -> pd.DataFrame:
    """The summary table (one row per intervention, the picks at matched quality) and its provenance."""
    manifest = inputs.manifest
    summary = summarise(typed, capability, o.max_new_tokens)
    summary["n_edits"] = [n_edits[n] for n in summary["intervention"]]
    summary, matched = pick_at_matched_quality(summary, o.quality_threshold)
    prov = provenance(
        model_id=manifest.get("source"), weight_sha256=manifest.get("weight_sha256"),
        circuit=str(circuit_path), circuit_size=len(inputs.circuit), factors=list(o.factors),
        caa_alphas=list(o.caa_alphas), caa_layers_requested=list(o.caa_layers), caa_layers=inputs.layers,
        caa_positions=["last_prompt", "generated"], caa_site="residual stream after the block (block output)",
        caa_vector="mean residual at the last prompt token, positive minus negative discovery prompts",
        caa_prompts={"positive": len(inputs.caa_pos), "negative": len(inputs.caa_neg), "split": CAA_SPLIT},
        caa_vector_norms={str(layer): norm for layer, norm in norms.items()},
        prompts=o.prompts, max_new_tokens=o.max_new_tokens, seed=o.seed,
        random_circuit_seed=o.seed, capability=dict(capability), matched_quality=matched,
    )
    write_table(pa.Table.from_pandas(summary, preserve_index=False), out_summary, prov)
    return summary


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
    inputs = _read_inputs(manifest_path, circuit_path, harmful_table, negative_table, generic_table, task_tables,
                          options)
    opened, o, interventions, norms = _open(manifest_path, inputs, options, threads)
    run_rollouts(manifest_path, {"harmful": harmful_table}, SPLIT, interventions, out_rollouts, out_fractions, None,
                 cna_rollout_options(o), opened=opened)
    typed = read_table(out_rollouts, "rollouts table")
    capability = _capability(opened, o, inputs, interventions)
    return _write_summary(typed, capability, {n: len(e) for n, e in interventions.items()}, inputs, o, norms,
                          circuit_path, out_summary)


def _run_key(inputs: _Inputs, prompt_tables: Mapping[str, str | Path], o: CnaOptions) -> dict:
    """What the parts of one CNA run share: the model, the circuit, the settings and the prompts."""
    circuit = inputs.circuit[["layer", "neuron", "sign"]].astype({"layer": int, "neuron": int, "sign": str})
    return {"weight_sha256": inputs.manifest.get("weight_sha256"),
            "circuit": hashlib.sha256(json.dumps(circuit.values.tolist()).encode()).hexdigest(),
            "options": o.to_dict(),
            "prompts": {name: read_provenance(path).get("prompt_set_hash") for name, path in prompt_tables.items()}}


def _tables(harmful_table, negative_table, generic_table, task_tables) -> dict[str, str | Path]:
    return {"harmful": harmful_table, "negative": negative_table, "generic": generic_table, **task_tables}


def run_cna_part(
    manifest_path: str | Path,
    circuit_path: str | Path,
    harmful_table: str | Path,
    negative_table: str | Path,
    generic_table: str | Path,
    task_tables: Mapping[str, str | Path],
    shard: int,
    out_table: str | Path,
    options: CnaOptions,
    threads: int | None = None,
) -> dict:
    """One job of a sharded CNA run (``cna.shard_size: n``): the typed rollouts of every held-out
    prompt under interventions ``shard·n … (shard+1)·n − 1`` (their order in
    :func:`~neuronaudit.methods.cna.cna_interventions`), with the capability under each, the edit
    counts, the CAA vectors' norms and what names the run (model, circuit, settings, prompts) in the
    table's provenance under ``cna_part``. A part past the last intervention writes an empty table
    and loads no model. :func:`run_merge_cna` joins the parts."""
    n = options.shard_size
    if n < 1:
        raise NeuronAuditError(f"cna part jobs need cna.shard_size >= 1, not {n!r}")
    count = cna_shard_count(options.factors, options.caa_layers, options.caa_alphas, n)
    if not 0 <= shard < count:
        raise NeuronAuditError(f"cna part {shard} out of range: cna.shard_size {n} makes {count} parts")
    inputs = _read_inputs(manifest_path, circuit_path, harmful_table, negative_table, generic_table, task_tables,
                          options)
    names = intervention_names(inputs.circuit, options.factors, options.caa_alphas, inputs.layers)
    block = names[shard * n:(shard + 1) * n]
    part = {"shard": int(shard), "shard_size": int(n), "interventions": block, "n_interventions": len(names),
            "run": _run_key(inputs, _tables(harmful_table, negative_table, generic_table, task_tables), options)}
    if not block:
        write_table(ROLLOUT_SCHEMA.empty_table(), out_table, provenance(cna_part=part))
        log.info("cna part %d: past the last of %d interventions, empty -> %s", shard, len(names), out_table)
        return {"n_interventions": 0}
    opened, o, interventions, norms = _open(manifest_path, inputs, options, threads)
    edits = {name: interventions[name] for name in block}
    capability = _capability(opened, o, inputs, edits)
    part.update(n_edits={name: len(e) for name, e in edits.items()}, capability=capability,
                caa_vector_norms={str(layer): norm for layer, norm in norms.items()})
    run_rollouts(manifest_path, {"harmful": harmful_table}, SPLIT, edits, out_table, None, None,
                 cna_rollout_options(o), opened=opened, extra_provenance={"cna_part": part}, add_reference=False)
    log.info("cna part %d: %d of %d interventions -> %s", shard, len(block), len(names), out_table)
    return {"n_interventions": len(block)}


#: Rollout provenance keys that differ between the parts of one CNA run.
_PER_PART = ("interventions", "generation_seconds", "cna_part")


def run_merge_cna(
    manifest_path: str | Path,
    circuit_path: str | Path,
    harmful_table: str | Path,
    negative_table: str | Path,
    generic_table: str | Path,
    task_tables: Mapping[str, str | Path],
    part_paths: Sequence[str | Path],
    out_rollouts: str | Path,
    out_fractions: str | Path,
    out_summary: str | Path,
    options: CnaOptions,
) -> pd.DataFrame:
    """Join the tables of :func:`run_cna_part` jobs into the tables :func:`run_cna` writes (no
    model): the rollouts in its row order, the type fractions bootstrapped over every prompt, the
    summary with the picks at matched quality over every intervention.

    Refuses a table that is not a part, a part of another run (model, circuit, settings or prompts
    differ), parts rolled out otherwise (dtype, device, judge, batch size), and interventions
    missing, repeated or not of this run."""
    o = options
    inputs = _read_inputs(manifest_path, circuit_path, harmful_table, negative_table, generic_table, task_tables, o)
    names = intervention_names(inputs.circuit, o.factors, o.caa_alphas, inputs.layers)
    run = _run_key(inputs, _tables(harmful_table, negative_table, generic_table, task_tables), o)
    if not part_paths:
        raise NeuronAuditError("no cna part tables to merge")
    parts, held = [], {}
    for path in part_paths:
        part = part_of_run(path, "cna_part", run, "cna")
        prov = read_provenance(path)
        for name in part["interventions"]:
            if name in held:
                raise NeuronAuditError(f"intervention {name!r} is in two cna part tables: {held[name]} and {path}")
            held[name] = path
        if part["interventions"]:
            parts.append((path, prov, part))
    foreign = [name for name in held if name not in names]
    if foreign:
        raise NeuronAuditError(f"cna part {held[foreign[0]]} holds intervention {foreign[0]!r}, not one of this "
                               f"run's")
    missing = [name for name in names if name not in held]
    if missing:
        raise NeuronAuditError(f"the cna parts hold {len(held)} of the run's {len(names)} interventions; missing "
                               f"{missing[0]!r}: rerun the cna_part jobs")
    first_path, first, _ = parts[0]
    same = {k: v for k, v in first.items() if k not in _PER_PART}
    for path, prov, _ in parts[1:]:
        differs = sorted(k for k in set(same) | set(prov) if k not in _PER_PART and prov.get(k) != same.get(k))
        if differs:
            raise NeuronAuditError(f"cna part {path} was rolled out otherwise than {first_path}: "
                                   f"{', '.join(differs)} differ")
    typed = read_rollout_tables([path for path, _, _ in parts])
    keys = ["sample", "prompt_set", "prompt_id", "intervention", "horizon"]
    if not set(typed["intervention"]) <= set(names) or typed.duplicated(keys).any():
        raise NeuronAuditError("the cna part tables hold repeated rollouts or interventions their provenance "
                               "does not name: rerun the cna_part jobs")
    # the one job's row order: by sample, then the prompts' order, the interventions', the horizon
    prompt_ids = read_prompts(harmful_table, SPLIT, o.prompts)["prompt_id"].astype(str).tolist()
    typed["_p"] = typed["prompt_id"].map({pid: r for r, pid in enumerate(prompt_ids)})
    typed["_i"] = typed["intervention"].map({name: r for r, name in enumerate(names)})
    typed = (typed.sort_values(["sample", "_p", "_i", "horizon"], kind="stable").drop(columns=["_p", "_i"])
             .reset_index(drop=True))
    specs = {name: spec for _, prov, _ in parts for name, spec in prov["interventions"].items()}
    prov = {**same, "interventions": {name: specs[name] for name in names}, "shards": len(part_paths),
            "generation_seconds": round(sum(p.get("generation_seconds") or 0.0 for _, p, _ in parts), 2)}
    write_table(rollouts_table(typed), out_rollouts, prov)
    write_summaries(typed, out_fractions, None, prov, o.seed)
    groups = list(inputs.tasks)
    capability, n_edits = {}, {}
    for _, _, part in parts:
        capability.update(part["capability"])
        n_edits.update(part["n_edits"])
    # the accuracy groups in the order of the task tables (the provenance's JSON sorts keys)
    capability = {name: {**capability[name], "accuracy": {g: capability[name]["accuracy"][g] for g in groups}}
                  for name in names}
    log.info("merged %d cna parts: %d interventions, %d rollouts -> %s", len(part_paths), len(names), len(typed),
             out_rollouts)
    return _write_summary(typed, capability, n_edits, inputs, o, parts[0][2]["caa_vector_norms"], circuit_path,
                          out_summary)
