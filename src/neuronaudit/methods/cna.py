"""CNA circuit scaling against a CAA baseline (SCIENCE.md section 3; arXiv 2605.12290).

The circuit of a behaviour is the top-k screened neurons by ``|δ|`` (see :mod:`neuronaudit.methods.screen`).
CNA scales every circuit neuron, ``a ← m·a``, at every prompt and generated token, for a sweep of
``m`` (0 ablates, > 1 amplifies), and also each sign half of the circuit (δ > 0 and δ < 0 behave
differently). Controls: a random circuit of the same size drawn from the same layers, and
contrastive activation addition (CAA; Rimsky et al., "Steering Llama 2 via Contrastive Activation
Addition", arXiv 2312.06681) as specified there:

- the CAA vector at layer ``l`` is the mean difference of the residual stream after block ``l``
  at the last prompt token between the positive and the negative discovery prompts
  (:func:`residual_means`, one forward pass over those prompts: the collect stage stores MLP
  activations, not the residual stream);
- it is added, times ``α``, to the residual stream after layer ``l`` at the positions after the
  instruction: the last prompt token and every generated token
  (:class:`neuronaudit.interventions.hooks.ResidualEdit`);
- the layer and ``α`` are swept (``cna.caa_layers``, as layer indices or fractions of depth, and
  ``cna.caa_alphas``).

Each intervention is measured on held-out harmful prompts by typed rollouts (refusal rate with a
bootstrap CI over prompts), quality ``1 − 4-gram repetition`` of the greedy rollout (mean over
prompts), and capability kept: perplexity on general text and exact-answer accuracy on knowledge
and arithmetic prompts.

Comparison at matched quality (:func:`pick_at_matched_quality`): the CNA paper reports quality
≥ 0.969 at every strength while CAA falls to 0.41–0.89 (SCIENCE.md §3). The fair comparison is
therefore the best row of each method among those whose quality reaches the threshold
(``cna.quality_threshold``, 0.969 by default): the lowest refusal rate, ties broken by the higher
quality, then the weaker strength. The summary marks the picked rows and states the rule.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.generation import encode_prompts, left_pad, pad_id, padded_position_ids
from neuronaudit.interventions.hooks import NeuronEdit, NeuronHooks, ResidualEdit
from neuronaudit.interventions.memory import split_on_oom

log = logging.getLogger(__name__)
POSITIONS = ("prompt", "generated")
#: CAA adds its vector after the instruction: the last prompt token and every generated token.
CAA_POSITIONS = ("last_prompt", "generated")
#: Families whose rows are CNA circuit interventions, and the CAA family.
CNA_FAMILIES = ("circuit", "circuit_pos", "circuit_neg")
CAA_FAMILY = "caa"
MATCHED_QUALITY_RULE = (
    "among the rows of a method whose quality (1 − 4-gram repetition of the greedy rollouts) is at "
    "least the threshold, the one with the lowest refusal rate; ties go to the higher quality, then "
    "the weaker strength"
)


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


# --- CAA ------------------------------------------------------------------------------------------


def caa_layers(spec: Iterable[int | float], n_layers: int) -> list[int]:
    """Layer indices from ``cna.caa_layers``: an integer is a layer (negative counts from the end),
    a float in [0, 1] a fraction of depth, ``round(f · (n_layers − 1))``. Sorted, without repeats."""
    out = set()
    for item in spec:
        if isinstance(item, bool):
            raise NeuronAuditError(f"cna.caa_layers entry {item!r} must be a layer index or a fraction of depth")
        if isinstance(item, (int, np.integer)):
            if not -n_layers <= int(item) < n_layers:
                raise NeuronAuditError(f"cna.caa_layers entry {item!r} is outside the model's {n_layers} layers")
            out.add(int(item) % n_layers)
        else:
            f = float(item)
            if not 0.0 <= f <= 1.0:
                raise NeuronAuditError(
                    f"cna.caa_layers entry {item!r}: a float is a fraction of depth and must lie in [0, 1]"
                )
            out.add(int(round(f * (n_layers - 1))))
    if not out:
        raise NeuronAuditError("cna.caa_layers is empty; give at least one layer for the CAA baseline")
    return sorted(out)


def residual_means(
    model, tokenizer, adapter, texts: Sequence[str], layers: Sequence[int], *, batch_size: int = 16,
    chat_template: str = "auto", system_prompt: str | None = None,
) -> dict[int, np.ndarray]:
    """Mean residual stream after each of ``layers`` at the last prompt token, ``{layer: [d_model]}``,
    over ``texts`` rendered as the model sees them (one batched forward pass, left-padded). A batch
    that runs out of memory runs as two halves at the whole batch's width; its rows are summed in
    one piece, as unsplit."""
    if len(texts) == 0:
        raise NeuronAuditError("CAA needs at least one prompt per set for its residual means")
    ids = encode_prompts(tokenizer, list(texts), chat_template, system_prompt)
    sums = {int(layer): torch.zeros(adapter.d_model, dtype=torch.float64) for layer in layers}
    device = next(model.parameters()).device
    got: dict[int, torch.Tensor] = {}

    def read(layer, hidden, ctx):
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        got[layer] = hidden[rows, ctx.last_prompt - ctx.past_length]

    def run(batch, part, width):
        got.clear()
        ids_, mask = left_pad([ids[i] for i in batch], pad_id(tokenizer), width)
        with torch.inference_mode(), NeuronHooks(adapter, on_resid=read, layers=list(sums)):
            adapter.base(input_ids=ids_.to(device), attention_mask=mask.to(device),
                         position_ids=padded_position_ids(mask).to(device))
        return [{layer: got[layer][r] for layer in sums} for r in range(len(batch))]

    for start in range(0, len(ids), batch_size):
        batch = list(range(start, min(start + batch_size, len(ids))))
        width = max(len(ids[i]) for i in batch)
        out = split_on_oom(functools.partial(run, width=width), batch, "residual means")
        for layer in sums:
            sums[layer] += torch.stack([row[layer] for row in out]).double().sum(0).cpu()
    return {layer: (s / len(ids)).numpy() for layer, s in sums.items()}


def caa_vectors(pos_means: Mapping[int, np.ndarray], neg_means: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """CAA vector per layer: mean residual over the positive prompts minus over the negative ones."""
    return {layer: np.asarray(pos_means[layer], float) - np.asarray(neg_means[layer], float) for layer in pos_means}


def caa_name(layer: int, alpha: float) -> str:
    return f"caa_L{int(layer)}_a{float(alpha):g}"


# --- interventions ----------------------------------------------------------------------------------


def cna_interventions(
    circuit: pd.DataFrame,
    vectors: Mapping[int, np.ndarray],
    factors: Sequence[float],
    caa_alphas: Sequence[float],
    n_neurons: int,
    seed: int = 0,
) -> dict[str, list[NeuronEdit | ResidualEdit]]:
    """Named interventions: none, the circuit and each sign half at every factor, a random
    same-layer circuit at every factor, and CAA at every (layer of ``vectors``, α)."""

    def scale(rows: pd.DataFrame, m: float) -> list[NeuronEdit]:
        return [NeuronEdit.scale(int(r.layer), int(r.neuron), float(m), POSITIONS) for r in rows.itertuples()]

    control = random_circuit(circuit, n_neurons, seed)
    out: dict[str, list] = {"none": []}
    for m in factors:
        out[f"circuit_x{m:g}"] = scale(circuit, m)
        for sign in ("pos", "neg"):
            half = circuit[circuit["sign"] == sign]
            if len(half):
                out[f"circuit_{sign}_x{m:g}"] = scale(half, m)
        out[f"random_x{m:g}"] = scale(control, m)
    for layer in sorted(vectors):
        for alpha in caa_alphas:
            if float(alpha) != 0.0:
                out[caa_name(layer, alpha)] = [ResidualEdit.add(layer, vectors[layer], float(alpha), CAA_POSITIONS)]
    return out


def intervention_names(
    circuit: pd.DataFrame, factors: Sequence[float], caa_alphas: Sequence[float], layers: Iterable[int]
) -> list[str]:
    """The names :func:`cna_interventions` makes, in its order, without the CAA vectors (``layers``:
    the CAA layers, :func:`caa_layers`): what a sharded CNA run splits into blocks."""
    signs = set(circuit["sign"])
    out: dict[str, None] = {"none": None}
    for m in factors:
        out[f"circuit_x{m:g}"] = None
        for sign in ("pos", "neg"):
            if sign in signs:
                out[f"circuit_{sign}_x{m:g}"] = None
        out[f"random_x{m:g}"] = None
    for layer in sorted(layers):
        for alpha in caa_alphas:
            if float(alpha) != 0.0:
                out[caa_name(layer, alpha)] = None
    return list(out)


_NAME = re.compile(r"^(?P<family>circuit_pos|circuit_neg|circuit|random)_x(?P<m>[-+.\deE]+)$")
_CAA = re.compile(r"^caa_L(?P<layer>\d+)_a(?P<alpha>[-+.\deE]+)$")


def describe(name: str) -> dict:
    """``family``, ``layer`` (CAA only) and ``strength`` (m or α) of an intervention name made by
    :func:`cna_interventions`."""
    if name == "none":
        return {"family": "none", "layer": None, "strength": None}
    if m := _NAME.match(name):
        return {"family": m["family"], "layer": None, "strength": float(m["m"])}
    if m := _CAA.match(name):
        return {"family": CAA_FAMILY, "layer": int(m["layer"]), "strength": float(m["alpha"])}
    return {"family": "other", "layer": None, "strength": None}


# --- summary ----------------------------------------------------------------------------------------


def summarise(typed: pd.DataFrame, capability: Mapping[str, dict], horizon: int) -> pd.DataFrame:
    """One row per intervention: family, CAA layer, strength, refusal rate at ``horizon`` (greedy),
    quality, capability."""
    at = typed[(typed["horizon"] == horizon) & (typed["sampling"] == "greedy")]
    rows = []
    for name, g in at.groupby("intervention", sort=False):
        cap = capability.get(name, {})
        row = {
            "intervention": name,
            **describe(str(name)),
            "n_prompts": int(g["prompt_id"].nunique()),
            "refusal_rate": float((g["rollout_type"] == "refusal").mean()),
            "collapse_rate": float((g["rollout_type"] == "collapse").mean()),
            "quality": float(1.0 - g["repetition_ratio"].mean()),
            "perplexity_median": cap.get("perplexity", {}).get("median", np.nan),
        }
        for group, acc in cap.get("accuracy", {}).items():
            row[f"accuracy_{group}"] = acc.get("accuracy", np.nan)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["layer"] = out["layer"].astype("Int32")
    out["strength"] = out["strength"].astype(float)
    return out


def _best(rows: pd.DataFrame, threshold: float) -> str | None:
    ok = rows[rows["quality"] >= threshold]
    if ok.empty:
        return None
    ok = ok.assign(_weak=ok["strength"].abs() if ok["family"].iloc[0] == CAA_FAMILY else (1 - ok["strength"]).abs())
    ok = ok.sort_values(["refusal_rate", "quality", "_weak"], ascending=[True, False, True], kind="stable")
    return str(ok["intervention"].iloc[0])


def pick_at_matched_quality(summary: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, dict]:
    """Mark the best CNA row (``best_cna``) and the best CAA row (``best_caa``) at matched quality in
    a ``pick`` column; returns the table and a record of the rule, the threshold and both picks
    (``None`` where no row of a method reaches the threshold)."""
    out = summary.copy()
    out["pick"] = ""
    picks = {}
    for label, families in (("best_cna", CNA_FAMILIES), ("best_caa", (CAA_FAMILY,))):
        best = _best(out[out["family"].isin(families)], threshold)
        picks[label] = best
        if best is not None:
            out.loc[out["intervention"] == best, "pick"] = label
    record = {"quality_threshold": float(threshold), "rule": MATCHED_QUALITY_RULE, **picks}
    n_caa = int((out["family"] == CAA_FAMILY).sum())
    n_ok = int(((out["family"] == CAA_FAMILY) & (out["quality"] >= threshold)).sum())
    record["n_caa_rows"], record["n_caa_rows_at_quality"] = n_caa, n_ok
    return out, record
