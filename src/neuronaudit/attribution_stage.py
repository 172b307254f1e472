"""Gradient versus forward attribution on the control-window candidates (SCIENCE.md section 2).

For every behaviour, every candidate neuron of the window stage gets

* gradient scores: ``∂m/∂a`` and attribution patching ``(ā⁺ − ā⁻)·∂m/∂a`` at the last prompt
  token of the swept prompts (:mod:`neuronaudit.attribution`);
* forward scores: the screen's ``δ`` and standardised ``δ``, and the single-pass dose response
  ``Δm`` — the change of the behaviour metric under a dose of ±1 budget unit at the last prompt
  token (half the difference of the two signs), from one batched last-token sweep;
* geometry: ``cos(v, u_readout)`` and ``||v||``;
* ground truth from the window: ``controls`` (a trigger below the ceiling in either sign) and
  ``control_strength`` (the largest flip fraction at any coherent dose, final horizon).

The comparison reports Spearman ρ of each |score| with control strength (bootstrap CIs over
neurons), precision@k / recall@k at recovering the controllers (k = their number), and the
controllers that the gradient ranks low while the forward screen ranks them high.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from scipy import stats

from neuronaudit import attribution as attr

log = logging.getLogger(__name__)
SCORES = ("grad", "atp", "delta", "std_delta", "dose_response")
GRADIENT_SCORES = ("grad", "atp")
FORWARD_SCORES = ("delta", "std_delta", "dose_response")


def metric_token_ids(tokenizer, spec: Mapping, extras: pd.DataFrame) -> tuple[list, list]:
    """Behaviour and default opening tokens: from config, or per prompt for the operator switch
    (first token of the product vs of the sum)."""
    if spec["oracle"] == "operator":
        first = lambda n: tokenizer(str(int(n)), add_special_tokens=False)["input_ids"][:1]  # noqa: E731
        return [first(p) for p in extras["product"]], [first(s) for s in extras["sum"]]
    return (attr.opening_token_ids(tokenizer, spec.get("behaviour_tokens") or []),
            attr.opening_token_ids(tokenizer, spec.get("default_tokens") or []))


def control_strength(sweeps: pd.DataFrame, window: pd.DataFrame) -> pd.DataFrame:
    """Per (behaviour, layer, neuron): the largest flip fraction over doses below the measured
    ceiling (final horizon, either sign) and whether the neuron controls (verdict open)."""
    final = sweeps["horizon"].max()
    at = sweeps[sweeps["horizon"] == final]
    frac = at.groupby(["behaviour", "layer", "neuron", "sign", "x"], as_index=False)[["flip", "collapse"]].mean()
    frac = frac.merge(window[["behaviour", "layer", "neuron", "sign", "ceiling_x"]], on=["behaviour", "layer", "neuron", "sign"])
    coherent = frac[frac["ceiling_x"].isna() | (frac["x"].abs() < frac["ceiling_x"])]
    strength = coherent.groupby(["behaviour", "layer", "neuron"])["flip"].max().rename("control_strength")
    controls = window.groupby(["behaviour", "layer", "neuron"])["verdict"].agg(lambda v: bool((v == "open").any())).rename("controls")
    out = pd.concat([strength, controls], axis=1).reset_index()
    out["control_strength"] = out["control_strength"].fillna(0.0)
    return out


def precision_at_k(score: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    """Precision and recall of the top-k by |score| at recovering ``truth`` (k = number true)."""
    k = int(truth.sum())
    if k == 0:
        return float("nan"), float("nan"), 0
    top = np.argsort(-np.abs(score), kind="stable")[:k]
    hits = int(truth[top].sum())
    return hits / k, hits / k, k


def compare(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman ρ with CIs and precision@k of each score, per behaviour and pooled."""
    out = {}
    for name, g in [("all", table), *table.groupby("behaviour")]:
        entry = {"n_neurons": int(len(g)), "n_controllers": int(g["controls"].sum())}
        for score in SCORES:
            x, y = np.abs(g[score].to_numpy(float)), g["control_strength"].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
                rho = float(stats.spearmanr(x[ok], y[ok]).statistic)
                pairs = np.stack([x[ok], y[ok]], axis=1)
                rng = np.random.default_rng(seed)
                boots = []
                for _ in range(n_boot):
                    s = pairs[rng.integers(0, len(pairs), len(pairs))]
                    if np.ptp(s[:, 0]) > 0 and np.ptp(s[:, 1]) > 0:
                        boots.append(stats.spearmanr(s[:, 0], s[:, 1]).statistic)
                lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if boots else (math.nan, math.nan)
            else:
                rho, lo, hi = math.nan, math.nan, math.nan
            prec, rec, k = precision_at_k(g[score].to_numpy(float), g["controls"].to_numpy(bool))
            entry[score] = {"spearman_rho": rho, "rho_ci95": [lo, hi], "precision_at_k": prec, "recall_at_k": rec, "k": k}
        cos = np.abs(g["readout_cos"].to_numpy(float))
        ctrl = g["controls"].to_numpy(bool)
        entry["abs_readout_cos"] = {
            "controllers_median": float(np.median(cos[ctrl])) if ctrl.any() else None,
            "others_median": float(np.median(cos[~ctrl])) if (~ctrl).any() else None,
        }
        out[name] = entry
    return out


def missed_by_gradient(table: pd.DataFrame) -> list[dict]:
    """Controllers in the bottom half of |grad| that are in the top half of |std_delta|."""
    out = []
    for b, g in table.groupby("behaviour"):
        grad_rank = g["grad"].abs().rank(ascending=False)
        fwd_rank = g["std_delta"].abs().rank(ascending=False)
        half = len(g) / 2
        for i in g.index[g["controls"] & (grad_rank > half) & (fwd_rank <= half)]:
            r = g.loc[i]
            out.append({"behaviour": b, "layer": int(r.layer), "neuron": int(r.neuron), "grad": float(r.grad),
                        "std_delta": float(r.std_delta), "readout_cos": float(r.readout_cos)})
    return out


def statement(comparison: dict) -> str:
    e = comparison.get("all", {})
    g, f = e.get("grad", {}), e.get("std_delta", {})
    rg, rf = g.get("spearman_rho", math.nan), f.get("spearman_rho", math.nan)
    if not (isinstance(rg, float) and math.isfinite(rg)):
        return "Not measurable here: too few neurons with variation in measured control."
    lo, hi = g["rho_ci95"]
    if hi < 0:
        verdict = "reproduces the anti-prediction (ρ of |gradient| with control is negative, CI below 0)"
    elif lo > 0:
        verdict = "does not reproduce it: |gradient| predicts control positively (CI above 0)"
    else:
        verdict = "neither reproduces nor refutes it: the CI of ρ for |gradient| includes 0"
    return (f"This model {verdict}; ρ(|∂m/∂a|, control) = {rg:.2f} (95% CI {lo:.2f}–{hi:.2f}), "
            f"ρ(|standardised δ|, control) = {rf:.2f} (95% CI {f['rho_ci95'][0]:.2f}–{f['rho_ci95'][1]:.2f}), "
            f"over {e['n_neurons']} neurons of which {e['n_controllers']} control.")


def run_attribution(
    manifest_path: str | Path,
    window_table: str | Path,
    sweeps_table: str | Path,
    screen_scores: Mapping[str, str | Path],
    behaviour_prompts: Mapping[str, str | Path],
    behaviours: Mapping[str, Mapping],
    out_scores: str | Path,
    out_summary: str | Path,
    n_prompts: int = 6,
    n_boot: int = 1000,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    batch_size: int = 8,
    threads: int | None = None,
) -> dict:
    import pyarrow.parquet as pq

    from neuronaudit.io import provenance, write_json, write_table
    from neuronaudit.models.loading import load_prepared
    from neuronaudit.prompts import extras, read_prompt_table, render_prompts, uses_template
    from neuronaudit.sweeps import last_token_dose_sweep

    if threads:
        torch.set_num_threads(int(threads))
    window = pq.read_table(window_table).to_pandas()
    sweeps = pq.read_table(sweeps_table).to_pandas()
    truth = control_strength(sweeps, window)
    model, tokenizer, adapter, manifest = load_prepared(manifest_path, dtype, device)
    frames = []
    for behaviour, spec in behaviours.items():
        neurons = window[window["behaviour"] == behaviour].drop_duplicates(["layer", "neuron"])
        if neurons.empty:
            continue
        prompts = read_prompt_table(behaviour_prompts[behaviour], split="heldout").head(n_prompts)
        beh_ids, def_ids = metric_token_ids(tokenizer, spec, extras(prompts))
        if not beh_ids or not def_ids:
            log.info("behaviour %s has no metric tokens: gradient scores skipped", behaviour)
            continue
        texts = render_prompts(tokenizer, prompts["text"], chat_template, system_prompt)
        add_special = not uses_template(tokenizer, chat_template)
        grads = attr.gradient_scores(model, tokenizer, adapter, texts, beh_ids, def_ids,
                                     batch_size=batch_size, add_special_tokens=add_special)
        screen = pq.read_table(screen_scores[behaviour]).to_pandas().set_index(["layer", "neuron"])
        cos = attr.readout_alignment(adapter, beh_ids, def_ids)
        rows = [(int(n.layer), int(n.neuron), float(sign * n.budget)) for n in neurons.itertuples() for sign in (1, -1)]
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        dev = next(model.parameters()).device
        sweep = last_token_dose_sweep(model, adapter, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), rows)
        P, R = sweep.logits.shape[:2]
        expand = lambda ids: [ids[p] for p in range(P) for _ in range(R)] if ids and isinstance(ids[0], list) else ids  # noqa: E731
        dosed = attr.behaviour_metric(sweep.logits.reshape(P * R, -1), expand(beh_ids), expand(def_ids)).reshape(P, R)
        clean = attr.behaviour_metric(sweep.clean_logits, beh_ids, def_ids)
        delta_m = (dosed - clean[:, None]).mean(0).numpy()
        for j, n in enumerate(neurons.itertuples()):
            l, i = int(n.layer), int(n.neuron)
            s = screen.loc[(l, i)]
            frames.append({
                "behaviour": behaviour, "layer": l, "neuron": i, "kind": n.kind,
                "grad": float(grads["grad"][l, i]),
                "atp": float(attr.attribution_patching(grads["grad"][l, i], s["mean_pos"], s["mean_neg"])),
                "delta": float(s["delta"]), "std_delta": float(s["std_delta"]),
                "dose_response": float((delta_m[2 * j] - delta_m[2 * j + 1]) / 2),
                "readout_cos": float(cos[l, i]),
                "write_norm": float(adapter.write_norms(l)[i]),
            })
    table = pd.DataFrame(frames).merge(truth, on=["behaviour", "layer", "neuron"], how="left")
    comparison = compare(table, n_boot, seed)
    summary = {"comparison": comparison, "missed_by_gradient": missed_by_gradient(table),
               "statement": statement(comparison), "n_boot": n_boot, "seed": seed}
    prov = provenance(model_id=manifest.get("source"), weight_sha256=manifest.get("weight_sha256"), seed=seed,
                      metric="logsumexp log p(behaviour openers) - logsumexp log p(default openers), last prompt token")
    write_table(pa.Table.from_pandas(table, preserve_index=False), out_scores, prov)
    write_json(json.loads(json.dumps(summary, default=float)), out_summary)
    return summary
