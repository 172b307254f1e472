"""CNA circuit scaling against a CAA baseline (SCIENCE.md section 3; arXiv 2605.12290).

The circuit of a behaviour is the top-k screened neurons by ``|δ|`` (see :mod:`neuronaudit.methods.screen`).
CNA scales every circuit neuron, ``a ← m·a``, at every prompt and generated token, for a sweep of
``m`` (0 ablates, > 1 amplifies), and also each sign half of the circuit (δ > 0 and δ < 0 behave
differently). Controls: a random circuit of the same size drawn from the same layers, and the
CAA-style baseline — the mean-difference vector of MLP outputs added at every layer with
strength ``α`` (an exact dose ``α·δ_{l,i}`` on every neuron, :func:`neuronaudit.methods.screen.caa_edits`).

Each intervention is measured on held-out harmful prompts by typed rollouts (refusal rate with a
bootstrap CI over prompts), quality ``1 − 4-gram repetition``, and capability kept: perplexity on
general text and exact-answer accuracy on knowledge and arithmetic prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from neuronaudit.interventions.hooks import NeuronEdit
from neuronaudit.methods.screen import caa_edits

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


