"""Gradient versus forward attribution on the control-window candidates (SCIENCE.md section 2).

For every behaviour, every candidate neuron of the window stage gets

* gradient scores (:mod:`neuronaudit.methods.attribution`), from ``∂m/∂a_p`` at the last prompt
  token of each swept prompt ``p`` (the held-out split of the set the window stage sweeps — the
  positive set for refusal, the negative set for the mode switches — first ``window.n_prompts``):
  ``grad`` = mean over prompts of ``|∂m/∂a_p|`` and ``grad_signed`` = mean of the signed
  ``∂m/∂a_p``; attribution patching ``atp`` = mean over prompts of ``|(ā⁺ − ā⁻)·∂m/∂a_p|`` and
  ``atp_signed`` = ``(ā⁺ − ā⁻)·mean ∂m/∂a_p``, where ``ā⁺`` and ``ā⁻`` are the screen table's
  last-token means (``mean_pos``, ``mean_neg``) over the discovery split of the behaviour's
  positive and negative sets. So the activation difference comes from the screen's prompts and
  the gradient from the swept prompts;
* forward scores: the screen's ``δ`` and standardised ``δ``, and the single-pass dose response
  ``Δm`` — the change of the behaviour metric under a dose of ±1 budget unit at the last prompt
  token (half the difference of the two signs), from one batched last-token sweep;
* geometry: ``cos(v, u_readout)`` and ``||v||``;
* ground truth from the window: ``controls`` (a trigger below the ceiling in either sign) and
  ``control_strength`` (the largest flip fraction at any coherent dose, final horizon; over the
  rolled-out doses, so a lower bound where an adaptive dose search skipped doses below the
  ceiling: ``control_strength_exact`` false, counted in the summary's
  ``n_control_strength_lower_bounds``).

The comparison (:func:`neuronaudit.methods.attribution.compare`) reports, for each |score|
(absolute and signed gradient variants alike), Spearman ρ with control strength beside its ``n``,
a two-sided permutation p-value, a paired BCa bootstrap 95% CI over neurons (``ci_method`` names
a percentile fallback and ``ci_fallback_reason`` why; ``n_degenerate_resamples`` counts the
resamples with a constant side), precision@k / recall@k at recovering the controllers (k = their
number); behaviours are pooled only after ranking within each. It also lists the controllers that
the gradient ranks low while the forward screen ranks them high.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa

from neuronaudit.interventions.memory import RowLoad
from neuronaudit.interventions.sweeps import last_token_dose_sweep
from neuronaudit.io import provenance, read_provenance, write_json, write_table
from neuronaudit.methods import attribution as attr
from neuronaudit.methods.attribution import (
    SCORE_DESCRIPTIONS,
    compare,
    control_strength,
    metric_token_ids,
    missed_by_gradient,
    statement,
)
from neuronaudit.options import AttributionOptions
from neuronaudit.prompts import extras, render_prompts, uses_template
from neuronaudit.stages.common import (
    PROMPT_TOKENS,
    OpenedModel,
    open_model,
    read_prompts,
    read_table,
    resolve_batch_sizes,
)

log = logging.getLogger(__name__)

#: The split of the swept prompt table the gradient is taken on (the window stage sweeps it too).
GRADIENT_SPLIT = "heldout"


def run_attribution(
    manifest_path: str | Path,
    window_table: str | Path,
    sweeps_table: str | Path,
    screen_scores: Mapping[str, str | Path],
    behaviour_prompts: Mapping[str, str | Path],
    behaviours: Mapping[str, Mapping],
    out_scores: str | Path,
    out_summary: str | Path,
    options: AttributionOptions,
    threads: int | None = None,
) -> dict:
    """Gradient and forward scores of every window candidate against its measured control."""
    o = options
    window = read_table(window_table, "window table")
    sweeps = read_table(sweeps_table, "sweeps table")
    truth = control_strength(sweeps, window)
    opened = open_model(manifest_path, o.model, threads)
    # a prompt's forward (every position's logits) and the backward pass through every layer
    load = RowLoad(tokens=PROMPT_TOKENS, logits=PROMPT_TOKENS, backward=True)
    o = resolve_batch_sizes(opened.model, opened.adapter, o, {"attribution.batch_size": load})
    rows, prompt_sets = [], {}
    for behaviour, spec in behaviours.items():
        neurons = window[window["behaviour"] == behaviour].drop_duplicates(["layer", "neuron"])
        if neurons.empty:
            continue
        prompts = read_prompts(behaviour_prompts[behaviour], GRADIENT_SPLIT, o.n_prompts)
        screen = read_table(screen_scores[behaviour], "screen table").set_index(["layer", "neuron"])
        rows += behaviour_scores(opened, behaviour, spec, neurons, prompts, screen, o)
        prompt_sets[behaviour] = prompt_sources(behaviour_prompts[behaviour], len(prompts), screen_scores[behaviour])
    table = pd.DataFrame(rows).merge(truth, on=["behaviour", "layer", "neuron"], how="left")
    comparison = compare(table, o.n_boot, o.seed, o.n_permutations)
    summary = {"comparison": comparison, "missed_by_gradient": missed_by_gradient(table),
               "statement": statement(comparison), "scores": dict(SCORE_DESCRIPTIONS), "prompts": prompt_sets,
               "n_control_strength_lower_bounds": _n_lower_bounds(table),
               "n_prompts": o.n_prompts, "n_boot": o.n_boot, "n_permutations": o.n_permutations, "seed": o.seed}
    prov = provenance(model_id=opened.manifest.get("source"), weight_sha256=opened.manifest.get("weight_sha256"),
                      seed=o.seed,
                      metric="logsumexp log p(behaviour openers) - logsumexp log p(default openers), last prompt token")
    write_table(pa.Table.from_pandas(table, preserve_index=False), out_scores, prov)
    write_json(json.loads(json.dumps(summary, default=float)), out_summary)
    return summary


def _n_lower_bounds(table: pd.DataFrame) -> int:
    """Neurons whose control strength is a lower bound (doses below the ceiling not rolled out)."""
    if "control_strength_exact" not in table:
        return 0
    return int((~table["control_strength_exact"].fillna(True).astype(bool)).sum())


def prompt_sources(prompt_table: str | Path, n_gradient: int, screen_table: str | Path) -> dict:
    """Which prompts each gradient score rests on: the swept prompts for ``∂m/∂a`` and the
    screen's positive and negative prompts for AtP's ``ā⁺ − ā⁻`` (from the tables' provenance)."""
    swept, screen = read_provenance(prompt_table), read_provenance(screen_table)
    return {
        "gradient": {"prompt_set": swept.get("prompt_set"), "split": GRADIENT_SPLIT, "n": n_gradient},
        "atp_means": {"positive_set": screen.get("positive_set"), "negative_set": screen.get("negative_set"),
                      "split": screen.get("split"), "n_pos": screen.get("n_pos"), "n_neg": screen.get("n_neg")},
    }


def behaviour_scores(opened: OpenedModel, behaviour: str, spec: Mapping, neurons: pd.DataFrame,
                     prompts: pd.DataFrame, screen: pd.DataFrame, o: AttributionOptions) -> list[dict]:
    """One row per candidate neuron of ``behaviour``: gradient, AtP, screen scores, single-pass dose
    response and readout geometry (none when the behaviour has no metric tokens).

    The gradient is taken on ``prompts`` (the swept prompts); AtP's ``ā⁺ − ā⁻`` is ``screen``'s
    ``mean_pos − mean_neg`` (the screen's positive and negative discovery prompts)."""
    model, tokenizer, adapter = opened.model, opened.tokenizer, opened.adapter
    chat_template, system_prompt = o.model.chat_template, o.model.system_prompt
    beh_ids, def_ids = metric_token_ids(tokenizer, spec, extras(prompts))
    if not beh_ids or not def_ids:
        log.info("behaviour %s has no metric tokens: gradient scores skipped", behaviour)
        return []
    texts = render_prompts(tokenizer, prompts["text"], chat_template, system_prompt)
    add_special = not uses_template(tokenizer, chat_template)
    grads = attr.gradient_scores(model, tokenizer, adapter, texts, beh_ids, def_ids,
                                 batch_size=o.batch_size, add_special_tokens=add_special)
    cos = attr.readout_alignment(adapter, beh_ids, def_ids)
    rows = [(int(n.layer), int(n.neuron), float(sign * n.budget)) for n in neurons.itertuples() for sign in (1, -1)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    dev = next(model.parameters()).device
    sweep = last_token_dose_sweep(model, adapter, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), rows)
    P, R = sweep.logits.shape[:2]

    def expand(ids):
        return [ids[p] for p in range(P) for _ in range(R)] if ids and isinstance(ids[0], list) else ids

    dosed = attr.behaviour_metric(sweep.logits.reshape(P * R, -1), expand(beh_ids), expand(def_ids)).reshape(P, R)
    clean = attr.behaviour_metric(sweep.clean_logits, beh_ids, def_ids)
    delta_m = (dosed - clean[:, None]).mean(0).numpy()
    out = []
    for j, n in enumerate(neurons.itertuples()):
        l, i = int(n.layer), int(n.neuron)
        s = screen.loc[(l, i)]
        atp, atp_signed = attr.attribution_patching_scores(grads["grad"][l, i], grads["grad_signed"][l, i],
                                                           s["mean_pos"], s["mean_neg"])
        out.append({
            "behaviour": behaviour, "layer": l, "neuron": i, "kind": n.kind,
            "grad": float(grads["grad"][l, i]), "grad_signed": float(grads["grad_signed"][l, i]),
            "atp": float(atp), "atp_signed": float(atp_signed),
            "delta": float(s["delta"]), "std_delta": float(s["std_delta"]),
            "dose_response": float((delta_m[2 * j] - delta_m[2 * j + 1]) / 2),
            "readout_cos": float(cos[l, i]),
            "write_norm": float(adapter.write_norms(l)[i]),
        })
    return out
