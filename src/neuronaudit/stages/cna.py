"""The CNA stage: circuit scaling against a random circuit and CAA, typed rollouts and
capability under each (the algorithm is :mod:`neuronaudit.methods.cna`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.hooks import InterventionPlan
from neuronaudit.methods.cna import cna_interventions, summarise

log = logging.getLogger("neuronaudit")


def run_cna(
    manifest_path: str | Path,
    circuit_path: str | Path,
    scores_path: str | Path,
    harmful_table: str | Path,
    generic_table: str | Path,
    task_tables: Mapping[str, str | Path],
    out_rollouts: str | Path,
    out_fractions: str | Path,
    out_summary: str | Path,
    factors: Sequence[float] = (0.0, 0.5, 2.0),
    caa_alphas: Sequence[float] = (-1.0, -2.0),
    prompts: int = 24,
    max_new_tokens: int = 64,
    judge_config: Mapping | None = None,
    seed: int = 0,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    max_texts: int = 24,
    max_task_prompts: int = 24,
    capability_max_new_tokens: int = 32,
    capability_batch_size: int = 32,
    threads: int | None = None,
) -> pd.DataFrame:
    """Circuit scaling, random-circuit and CAA interventions: typed rollouts on held-out harmful
    prompts and capability under each; writes rollouts, type fractions and a summary table."""

    from neuronaudit.evaluation.capability import capability_report
    from neuronaudit.io import provenance, write_table
    from neuronaudit.methods.screen import read_circuit
    from neuronaudit.models.loading import load_prepared, read_manifest
    from neuronaudit.prompts import read_prompt_table
    from neuronaudit.stages.rollouts import run_rollouts

    manifest = read_manifest(manifest_path)
    circuit = read_circuit(circuit_path)
    if len(circuit) == 0:
        raise NeuronAuditError(f"circuit {str(circuit_path)!r} is empty")
    scores = pq.read_table(scores_path).to_pandas()
    interventions = cna_interventions(circuit, scores, factors, caa_alphas, manifest["n_neurons"], seed)
    run_rollouts(
        manifest_path, {"harmful": harmful_table}, "heldout", interventions, horizons=[max_new_tokens],
        judge_config=judge_config, out_rollouts=out_rollouts, out_fractions=out_fractions,
        dtype=dtype, device=device, batch_size=batch_size, chat_template=chat_template,
        system_prompt=system_prompt, limit=prompts, seed=seed, threads=threads,
    )
    typed = pq.read_table(out_rollouts).to_pandas()
    model, tokenizer, adapter, _ = load_prepared(manifest_path, dtype, device)
    generic = read_prompt_table(generic_table, split="heldout")["text"].head(max_texts).tolist()
    tasks = {g: read_prompt_table(p, split="heldout").head(max_task_prompts) for g, p in task_tables.items()}
    capability = {}
    for name, edits in interventions.items():
        plan = InterventionPlan.broadcast(edits) if edits else None
        capability[name] = capability_report(
            model, tokenizer, adapter, generic, tasks, plan=plan, chat_template=chat_template,
            system_prompt=system_prompt, batch_size=capability_batch_size,
            max_new_tokens=capability_max_new_tokens,
        )
        log.info("capability under %s: %s", name, capability[name])
    summary = summarise(typed, capability, max_new_tokens)
    summary["n_edits"] = [len(interventions[n]) for n in summary["intervention"]]
    prov = provenance(
        model_id=manifest.get("source"), weight_sha256=manifest.get("weight_sha256"),
        circuit=str(circuit_path), circuit_size=len(circuit), factors=list(factors),
        caa_alphas=list(caa_alphas), prompts=prompts, max_new_tokens=max_new_tokens, seed=seed,
        random_circuit_seed=seed, capability=capability,
    )
    write_table(pa.Table.from_pandas(summary, preserve_index=False), out_summary, prov)
    return summary

