"""CNA circuit scaling against a CAA baseline (SCIENCE.md section 3; arXiv 2605.12290).

The circuit of a behaviour is the top-k screened neurons by ``|δ|`` (see :mod:`neuronaudit.screen`).
CNA scales every circuit neuron, ``a ← m·a``, at every prompt and generated token, for a sweep of
``m`` (0 ablates, > 1 amplifies), and also each sign half of the circuit (δ > 0 and δ < 0 behave
differently). Controls: a random circuit of the same size drawn from the same layers, and the
CAA-style baseline — the mean-difference vector of MLP outputs added at every layer with
strength ``α`` (an exact dose ``α·δ_{l,i}`` on every neuron, :func:`neuronaudit.screen.caa_edits`).

Each intervention is measured on held-out harmful prompts by typed rollouts (refusal rate with a
bootstrap CI over prompts), quality ``1 − 4-gram repetition``, and capability kept: perplexity on
general text and exact-answer accuracy on knowledge and arithmetic prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions import InterventionPlan, NeuronEdit

log = logging.getLogger(__name__)
POSITIONS = ("prompt", "generated")


def random_circuit(circuit: pd.DataFrame, n_neurons: int, seed: int) -> pd.DataFrame:
    """A circuit of the same size with the same number of neurons in each layer, drawn at random
    (seeded) from neurons outside the circuit."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer, group in circuit.groupby("layer"):
        taken = set(group["neuron"].astype(int))
        pool = np.array([i for i in range(n_neurons) if i not in taken])
        picks = rng.choice(pool, size=len(group), replace=False)
        rows += [{"layer": int(layer), "neuron": int(n)} for n in picks]
    return pd.DataFrame(rows)


def cna_interventions(
    circuit: pd.DataFrame,
    scores: pd.DataFrame,
    factors: Sequence[float],
    caa_alphas: Sequence[float],
    n_neurons: int,
    seed: int = 0,
) -> dict[str, list[NeuronEdit]]:
    """Named interventions: none, the circuit and each sign half at every factor, a random
    same-layer circuit at every factor, and CAA at every strength."""
    from neuronaudit.screen import caa_edits

    def scale(rows: pd.DataFrame, m: float) -> list[NeuronEdit]:
        return [NeuronEdit.scale(int(r.layer), int(r.neuron), float(m), POSITIONS) for r in rows.itertuples()]

    control = random_circuit(circuit, n_neurons, seed)
    out: dict[str, list[NeuronEdit]] = {"none": []}
    for m in factors:
        out[f"circuit_x{m:g}"] = scale(circuit, m)
        for sign in ("pos", "neg"):
            half = circuit[circuit["sign"] == sign]
            if len(half):
                out[f"circuit_{sign}_x{m:g}"] = scale(half, m)
        out[f"random_x{m:g}"] = scale(control, m)
    for alpha in caa_alphas:
        out[f"caa_a{alpha:g}"] = caa_edits(scores, float(alpha), POSITIONS)
    return out


def summarise(typed: pd.DataFrame, capability: Mapping[str, dict], horizon: int) -> pd.DataFrame:
    """One row per intervention: refusal rate at ``horizon`` (greedy), quality, capability."""
    at = typed[(typed["horizon"] == horizon) & (typed["sampling"] == "greedy")]
    rows = []
    for name, g in at.groupby("intervention", sort=False):
        cap = capability.get(name, {})
        row = {
            "intervention": name,
            "n_prompts": int(g["prompt_id"].nunique()),
            "refusal_rate": float((g["rollout_type"] == "refusal").mean()),
            "collapse_rate": float((g["rollout_type"] == "collapse").mean()),
            "quality": float(1.0 - g["repetition_ratio"].mean()),
            "perplexity_median": cap.get("perplexity", {}).get("median", np.nan),
        }
        for group, acc in cap.get("accuracy", {}).items():
            row[f"accuracy_{group}"] = acc.get("accuracy", np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


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
    import pyarrow.parquet as pq

    from neuronaudit.capability import capability_report
    from neuronaudit.io import provenance, write_table
    from neuronaudit.models.loading import load_prepared, read_manifest
    from neuronaudit.prompts import read_prompt_table
    from neuronaudit.rollouts import run_rollouts
    from neuronaudit.screen import read_circuit

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
