"""The control-window law (SCIENCE.md section 1; "Leverage Is Not Reach", seed 003).

A dose ``d`` on neuron ``(l, i)`` adds ``d·v`` to the residual ``r`` after layer ``l``. In units
of the coherence budget ``B = ||r_l|| / ||v||`` the normalised dose is ``x = d / B`` and the
alignment between the steered residual and the write follows the saturation curve

    cosθ(x) = (c0 + x) / sqrt(1 + 2·x·c0 + x²),     c0 = cos(r, v) unsteered,

exactly at the write layer (it is the geometry of ``r + d·v``), and only approximately at the
readout, where depth and normalisation intervene. Coherent control exists iff the behaviour
trigger (smallest ``|x|`` flipping an oracle on ≥50% of prompts at horizon τ) lies below the
collapse ceiling (smallest ``|x|`` at which rollouts stop being coherent on ≥50% of prompts).

This module holds the law and its measurement, with no file I/O: the curve and its inverse,
ceilings and triggers from sweep tables, the two ceiling predictors fitted on training neurons
only, verdicts against the majority class, intervals over neurons, the failure-mode rules, the
candidate picking, and the model-running parts (budgets and unsteered alignments from one generic
forward pass, a behaviour's batched dose sweep with typed rollouts, the single-pass sweep). The
stage that reads and writes the tables is :mod:`neuronaudit.stages.window`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from neuronaudit.evaluation.metrics import prefix_means, prefix_perplexity, repetition_ratio
from neuronaudit.evaluation.oracles import get_oracle
from neuronaudit.evaluation.stats import binomial_greater, bootstrap_ci
from neuronaudit.interventions.hooks import NeuronHooks
from neuronaudit.interventions.scoring import shared_prompt_scores
from neuronaudit.interventions.sweeps import generated_dose_sweep, single_pass_dose_response
from neuronaudit.prompts import extras, render_prompts, uses_template

log = logging.getLogger("neuronaudit")

FAILURE_MODES = ("collapse_before_trigger", "too_little_depth", "normalisation_cap")


def saturation_curve(x, c0):
    """Alignment of ``r + d·v`` with ``v`` at normalised dose ``x = d/B`` (broadcasts)."""
    x, c0 = np.asarray(x, dtype=float), np.asarray(c0, dtype=float)
    return (c0 + x) / np.sqrt(np.maximum(1.0 + 2.0 * x * c0 + x * x, 1e-300))


def dose_for_alignment(c_target, c0):
    """The normalised dose ``x`` at which the saturation curve reaches ``c_target``.

    Solves ``(c0 + x)² = c²(1 + 2xc0 + x²)``: ``x = −c0 + sign(c)·|c|·sqrt((1 − c0²)/(1 − c²))``,
    the root on the branch where ``c0 + x`` has the sign of ``c``. ``|c| ≥ 1`` is unreachable
    (``nan``).
    """
    c, c0 = np.asarray(c_target, dtype=float), np.asarray(c0, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt((1.0 - c0 * c0) / (1.0 - c * c))
        x = -c0 + c * root
    return np.where(np.abs(c) < 1.0, x, np.nan)


def alignment(resid: np.ndarray, write: np.ndarray) -> np.ndarray:
    """``cos(r, v)`` for residual vectors ``resid [..., d_model]`` and one write ``v [d_model]``."""
    resid = np.asarray(resid, dtype=float)
    write = np.asarray(write, dtype=float)
    num = resid @ write
    den = np.linalg.norm(resid, axis=-1) * np.linalg.norm(write)
    return num / np.maximum(den, 1e-30)


def first_crossing(x: Sequence[float], fraction: Sequence[float], level: float = 0.5) -> float:
    """Smallest ``|x|`` whose fraction reaches ``level`` (``nan`` if none): the grid for one sign."""
    x = np.abs(np.asarray(x, dtype=float))
    fraction = np.asarray(fraction, dtype=float)
    order = np.argsort(x)
    hits = x[order][fraction[order] >= level]
    return float(hits[0]) if hits.size else float("nan")


def crossings(table: pd.DataFrame, value: str, by: Sequence[str], level: float = 0.5) -> pd.DataFrame:
    """Per group of ``by``: the smallest ``|x|`` at which the mean of ``value`` over prompts reaches
    ``level``. ``table`` has one row per (group, x, prompt) with ``x`` and a 0/1 ``value``."""
    per_x = table.groupby([*by, "x"], as_index=False)[value].mean()
    rows = []
    for key, g in per_x.groupby(list(by)):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), f"{value}_x": first_crossing(g["x"], g[value], level)})
    return pd.DataFrame(rows)


def verdict(trigger_x: float, ceiling_x: float) -> str:
    """``open`` iff a trigger exists below the ceiling (no ceiling in the grid counts as above)."""
    if np.isnan(trigger_x):
        return "closed"
    return "open" if np.isnan(ceiling_x) or trigger_x < ceiling_x else "closed"


def fit_critical_alignment(c0: Sequence[float], ceiling_x: Sequence[float]) -> float:
    """Universal critical alignment ``c*``: the median over training neurons of ``|cosθ|`` the
    saturation curve gives at each measured ceiling. ``ceiling_x`` is signed (the dose's
    direction); neurons without a ceiling in the grid are skipped."""
    c0, ceiling_x = np.asarray(c0, float), np.asarray(ceiling_x, float)
    ok = ~np.isnan(ceiling_x)
    if not ok.any():
        return float("nan")
    return float(np.median(np.abs(saturation_curve(ceiling_x[ok], c0[ok]))))


def predict_ceiling_from_alignment(c_star: float, c0: Sequence[float], sign: Sequence[float]) -> np.ndarray:
    """Predictor (a): ``|x|`` where each neuron's saturation curve reaches ``sign·c*``."""
    c0, sign = np.asarray(c0, float), np.asarray(sign, float)
    return np.abs(dose_for_alignment(np.sign(sign) * c_star, c0))


def kl_crossing(x: Sequence[float], kl: Sequence[float], threshold: float) -> float:
    """Smallest ``|x|`` at which the single-pass next-token KL reaches ``threshold``."""
    return first_crossing(x, np.asarray(kl, float) >= threshold, 0.5)


def fit_kl_threshold(curves: dict, ceiling_x: dict, grid: Sequence[float] | None = None) -> float:
    """Predictor (b): the KL threshold minimising the training MAE of ``kl_crossing`` against the
    measured ceilings. ``curves[key] = (x, kl)``; ``ceiling_x[key]`` the measured ceiling."""
    keys = [k for k in curves if not np.isnan(ceiling_x.get(k, np.nan))]
    if not keys:
        return float("nan")
    grid = np.geomspace(1e-3, 20.0, 120) if grid is None else np.asarray(grid, float)
    best, best_err = float("nan"), np.inf
    for tau in grid:
        pred = np.array([kl_crossing(*curves[k], tau) for k in keys])
        meas = np.array([ceiling_x[k] for k in keys])
        err = np.where(np.isnan(pred), np.abs(meas), np.abs(pred - meas)).mean()
        if err < best_err:
            best, best_err = float(tau), err
    return best


def split_neurons(keys: Sequence, n_heldout: int, seed: int) -> dict:
    """Fixed-seed split of neuron keys into ``train`` and ``heldout``."""
    keys = list(keys)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    held = {keys[i] for i in order[: min(n_heldout, len(keys))]}
    return {k: ("heldout" if k in held else "train") for k in keys}


@dataclass
class VerdictScore:
    correct: int
    n: int
    majority_correct: int
    majority_class: str
    p_value: float  # exact one-sided binomial test of correct/n against the majority rate

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def score_verdicts(predicted: Sequence[str], measured: Sequence[str]) -> VerdictScore:
    """Verdict accuracy next to the majority-class baseline, with an exact binomial p-value."""
    predicted, measured = list(predicted), list(measured)
    n = len(measured)
    correct = sum(p == m for p, m in zip(predicted, measured))
    if n == 0:
        return VerdictScore(0, 0, 0, "none", float("nan"))
    counts = pd.Series(measured).value_counts()
    majority_class, majority_correct = str(counts.index[0]), int(counts.iloc[0])
    rate = majority_correct / n
    return VerdictScore(correct, n, majority_correct, majority_class, binomial_greater(correct, n, rate))


def classify_failure(
    verdict_: str,
    layer: int,
    n_layers: int,
    max_write_alignment: float,
    max_final_alignment: float,
    trigger_final_alignment: float,
    late_fraction: float = 0.2,
    cap_level: float = 0.9,
) -> str | None:
    """Failure mode of a closed neuron, by the rules stated in the report:

    * ``normalisation_cap`` — the write-layer alignment never exceeds ``cap_level`` over the dose
      grid, although the saturation curve goes to 1: a norm rescales the write;
    * ``too_little_depth`` — a late layer (last ``late_fraction`` of the stack) whose final-layer
      alignment never reaches ``trigger_final_alignment``, the readout alignment at which open
      training neurons triggered;
    * ``collapse_before_trigger`` — otherwise: the model collapses before the behaviour flips.
    Open neurons have no failure mode (``None``).
    """
    if verdict_ == "open":
        return None
    if not np.isnan(max_write_alignment) and max_write_alignment < cap_level:
        return "normalisation_cap"
    late = layer >= n_layers * (1.0 - late_fraction)
    if late and not np.isnan(trigger_final_alignment) and max_final_alignment < trigger_final_alignment:
        return "too_little_depth"
    return "collapse_before_trigger"


def generic_geometry(model, tokenizer, adapter, texts: Sequence[str], batch_size: int = 8,
                     max_length: int = 256, add_special_tokens: bool = True) -> pd.DataFrame:
    """Budgets and unsteered alignments from one generic forward pass, no rollouts.

    Returns one row per (layer, neuron): ``resid_norm`` (mean token norm of the residual after the
    layer over every real token of ``texts``), ``write_norm`` ``||v||``, ``budget`` ``B =
    resid_norm / write_norm`` and ``c0``, the mean over prompts of ``cos(r_l, v)`` at the last
    prompt token.
    """


    n_layers = adapter.n_layers
    norm_sum = np.zeros(n_layers)
    token_count = np.zeros(n_layers)
    last_resid: dict[int, list[np.ndarray]] = {l: [] for l in range(n_layers)}

    def on_resid(layer, hidden, ctx):
        h = hidden.detach().float()
        mask = ctx.mask("prompt")
        norm_sum[layer] += float(h.norm(dim=-1)[mask].sum())
        token_count[layer] += float(mask.sum())
        rows = torch.arange(h.shape[0], device=h.device)
        last_resid[layer].append(h[rows, ctx.last_prompt].cpu().numpy())

    device = next(model.parameters()).device
    tokenizer.padding_side = "right"
    with torch.inference_mode(), NeuronHooks(adapter, on_resid=on_resid):
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length,
                            add_special_tokens=add_special_tokens).to(device)
            adapter.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    frames = []
    for layer in range(n_layers):
        w = adapter.write_matrix(layer).detach().float().cpu().numpy()  # [d_model, n_neurons]
        write_norm = np.linalg.norm(w, axis=0)
        r = np.concatenate(last_resid[layer])  # [prompts, d_model]
        cos = (r @ w) / np.maximum(np.linalg.norm(r, axis=1, keepdims=True) * write_norm[None, :], 1e-30)
        resid_norm = norm_sum[layer] / max(token_count[layer], 1)
        frames.append(pd.DataFrame({
            "layer": layer,
            "neuron": np.arange(w.shape[1]),
            "resid_norm": resid_norm,
            "write_norm": write_norm,
            "budget": resid_norm / np.maximum(write_norm, 1e-30),
            "c0": cos.mean(axis=0),
        }))
    return pd.concat(frames, ignore_index=True)


def layer_band(layer: int, n_layers: int) -> str:
    """``early`` (first 20%), ``late`` (last 20%) or ``bulk``."""
    if layer < 0.2 * n_layers:
        return "early"
    if layer >= 0.8 * n_layers:
        return "late"
    return "bulk"


def pick_candidates(
    screens: Mapping[str, pd.DataFrame], n_candidates: int, n_random: int, n_layers: int,
    n_neurons: int, seed: int,
) -> pd.DataFrame:
    """Top screened neurons per behaviour (by |standardised δ|, universal excluded) plus random
    controls spread over early, bulk and late layers, assigned to behaviours in turn."""
    rows = []
    for behaviour, scores in screens.items():
        pool = scores[scores["screened"].astype(bool) & ~scores["universal"].astype(bool)]
        top = pool.reindex(pool["std_delta"].abs().sort_values(ascending=False).index).head(n_candidates)
        rows += [{"behaviour": behaviour, "layer": int(r.layer), "neuron": int(r.neuron), "kind": "screened",
                  "delta": float(r.delta), "std_delta": float(r.std_delta)} for r in top.itertuples()]
    rng = np.random.default_rng(seed)
    bands = {"early": [l for l in range(n_layers) if layer_band(l, n_layers) == "early"],
             "bulk": [l for l in range(n_layers) if layer_band(l, n_layers) == "bulk"],
             "late": [l for l in range(n_layers) if layer_band(l, n_layers) == "late"]}
    names, band_names = list(screens), [b for b in ("early", "bulk", "late") if bands[b]]
    taken = {(r["layer"], r["neuron"]) for r in rows}
    for j in range(n_random):
        behaviour = names[j % len(names)]
        layer = int(rng.choice(bands[band_names[j % len(band_names)]]))
        neuron = int(rng.integers(n_neurons))
        while (layer, neuron) in taken:
            neuron = int(rng.integers(n_neurons))
        taken.add((layer, neuron))
        s = screens[behaviour]
        match = s[(s["layer"] == layer) & (s["neuron"] == neuron)]
        delta = float(match["delta"].iloc[0]) if len(match) else float("nan")
        std = float(match["std_delta"].iloc[0]) if len(match) else float("nan")
        rows.append({"behaviour": behaviour, "layer": layer, "neuron": neuron, "kind": "random",
                     "delta": delta, "std_delta": std})
    out = pd.DataFrame(rows)
    out["band"] = [layer_band(l, n_layers) for l in out["layer"]]
    return out


def flips(oracle: str, responses: Sequence[str], rollout_types: Sequence[str], extras: Sequence[Mapping]) -> np.ndarray:
    """Did the behaviour flip? ``refusal``: a harmful prompt answered coherently (bypass or
    actionable); ``operator``/``format``: the oracle reads the behaviour label."""
    if oracle == "refusal":
        return np.array([t in ("coherent_bypass", "actionable") for t in rollout_types])

    o = get_oracle(oracle)
    return np.array([o.label(r, e) == o.behaviour for r, e in zip(responses, extras)])


def sweep_behaviour(model, tokenizer, adapter, judge, behaviour: str, spec: Mapping, neurons: pd.DataFrame,
                     prompts: pd.DataFrame, geometry: pd.DataFrame, x_grid: Sequence[float],
                     horizons: Sequence[int], chat_template: str, system_prompt: str | None,
                     row_batch_size: int) -> pd.DataFrame:

    geo = geometry.set_index(["layer", "neuron"])
    rows, meta = [], []
    for n in neurons.itertuples():
        budget = float(geo.loc[(n.layer, n.neuron), "budget"])
        for x in x_grid:
            for sign in (1.0, -1.0):
                rows.append((int(n.layer), int(n.neuron), sign * x * budget))
                meta.append({"layer": int(n.layer), "neuron": int(n.neuron), "kind": n.kind,
                             "sign": int(sign), "x": sign * x, "dose": sign * x * budget})
    texts = render_prompts(tokenizer, prompts["text"], chat_template, system_prompt)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True,
                    add_special_tokens=not uses_template(tokenizer, chat_template))
    device = next(model.parameters()).device
    horizon = max(horizons)
    t0 = time.perf_counter()
    result = generated_dose_sweep(model, adapter, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                  rows, max_new_tokens=horizon, row_batch_size=row_batch_size)
    log.info("%s: %d rows x %d prompts swept in %.1f s", behaviour, len(rows), len(prompts), time.perf_counter() - t0)
    tokens = result.tokens.cpu().numpy()
    lengths = result.lengths.cpu().numpy()
    entropy = result.entropy.cpu().numpy()
    prompt_tokens = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
    extra = extras(prompts).to_dict(orient="records")
    P, R = tokens.shape[:2]
    responses_ids = [tokens[p, r, : lengths[p, r]].tolist() for p in range(P) for r in range(R)]
    # every row of a prompt continues the same prompt: its KV cache is computed once per prompt
    logprob = []
    for p in range(P):
        logprob += shared_prompt_scores(model, prompt_tokens[p], responses_ids[p * R : (p + 1) * R],
                                        batch_size=32, pad_token_id=tokenizer.pad_token_id or 0).logprob
    frames = []
    for h in horizons:
        lens = [min(len(r), h) for r in responses_ids]
        texts_h = [tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(responses_ids, lens)]
        ppl = prefix_perplexity(logprob, lens)
        ent = prefix_means([entropy[p, r] for p in range(P) for r in range(R)], lens)
        rep = [repetition_ratio(r[:n]) for r, n in zip(responses_ids, lens)]
        metrics = pd.DataFrame({"repetition_ratio": rep, "perplexity": ppl, "entropy": ent})
        prompt_texts = [prompts["text"].iloc[p] for p in range(P) for _ in range(R)]
        types = judge.classify(prompt_texts, texts_h, metrics)
        flip = flips(spec["oracle"], texts_h, types, [extra[p] for p in range(P) for _ in range(R)])
        frame = pd.DataFrame([{**meta[r], "prompt_id": prompts["prompt_id"].iloc[p]}
                              for p in range(P) for r in range(R)])
        frame = frame.assign(behaviour=behaviour, horizon=h, response=texts_h, n_tokens=lens,
                             repetition_ratio=rep, perplexity=ppl, entropy=ent, rollout_type=types,
                             collapse=[t == "collapse" for t in types], flip=flip)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def single_pass_sweep(model, adapter, enc, neurons: pd.DataFrame, geometry: pd.DataFrame,
                 x_grid: Sequence[float]) -> pd.DataFrame:

    geo = geometry.set_index(["layer", "neuron"])
    rows, meta = [], []
    for n in neurons.drop_duplicates(["layer", "neuron"]).itertuples():
        budget = float(geo.loc[(n.layer, n.neuron), "budget"])
        for x in x_grid:
            for sign in (1.0, -1.0):
                rows.append((int(n.layer), int(n.neuron), sign * x * budget))
                meta.append({"layer": int(n.layer), "neuron": int(n.neuron), "x": sign * x})
    device = next(model.parameters()).device
    resp = single_pass_dose_response(model, adapter, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                     rows, positions="last_prompt")
    return pd.DataFrame(meta).assign(
        kl=resp.kl.mean(0).numpy(), entropy=resp.entropy.mean(0).numpy(),
        alignment_write=resp.alignment_write.mean(0).numpy(),
        alignment_readout=resp.alignment_readout.mean(0).numpy(),
    )


def window_table(sweeps: pd.DataFrame, single: pd.DataFrame, neurons: pd.DataFrame, geometry: pd.DataFrame,
                 horizons: Sequence[int], n_layers: int, n_heldout: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Per (behaviour, neuron, sign): budget, c0, measured ceiling and triggers, predictions,
    verdicts, failure mode, split; and the fitted predictor parameters."""
    final = max(horizons)
    keys = ["behaviour", "layer", "neuron", "sign"]
    at_final = sweeps[sweeps["horizon"] == final].assign(x_abs=lambda d: d["x"].abs())
    ceil = crossings(at_final.assign(x=at_final["x_abs"]), "collapse", keys).rename(columns={"collapse_x": "ceiling_x"})
    table = ceil
    for h in horizons:
        at = sweeps[sweeps["horizon"] == h]
        trig = crossings(at.assign(x=at["x"].abs()), "flip", keys).rename(columns={"flip_x": f"trigger_x_{h}"})
        table = table.merge(trig, on=keys, how="outer")
    geo = geometry.set_index(["layer", "neuron"])
    table["budget"] = [geo.loc[(l, n), "budget"] for l, n in zip(table["layer"], table["neuron"])]
    table["c0"] = [geo.loc[(l, n), "c0"] for l, n in zip(table["layer"], table["neuron"])]
    info = neurons.set_index(["behaviour", "layer", "neuron"])
    keys = list(zip(table["behaviour"], table["layer"], table["neuron"]))
    table["kind"] = [info.loc[k, "kind"] for k in keys]
    table["band"] = [layer_band(int(l), n_layers) for l in table["layer"]]
    split = split_neurons(sorted(set(keys)), n_heldout, seed)
    table["split"] = [split[k] for k in keys]
    # single-pass curves on generic prompts, per (neuron, sign)
    sp = single.assign(sign=np.sign(single["x"]).astype(int), x_abs=single["x"].abs())
    curves = {key: (g["x_abs"].to_numpy(), g["kl"].to_numpy()) for key, g in sp.groupby(["layer", "neuron", "sign"])}
    max_align = sp.groupby(["layer", "neuron", "sign"]).agg(
        max_write=("alignment_write", lambda a: float(np.nanmax(np.abs(a)))),
        max_readout=("alignment_readout", lambda a: float(np.nanmax(np.abs(a)))),
    )
    signed_ceiling = table["sign"] * table["ceiling_x"]
    table["ceiling_alignment"] = np.abs(saturation_curve(signed_ceiling, table["c0"]))
    train = table["split"] == "train"
    c_star = fit_critical_alignment(table.loc[train, "c0"], signed_ceiling[train])
    table["predicted_ceiling_x_alignment"] = predict_ceiling_from_alignment(c_star, table["c0"], table["sign"])
    ckey = lambda r: (int(r.layer), int(r.neuron), int(r.sign))  # noqa: E731
    tau = fit_kl_threshold({ckey(r): curves[ckey(r)] for r in table[train].itertuples()},
                               {ckey(r): r.ceiling_x for r in table[train].itertuples()})
    table["predicted_ceiling_x_kl"] = [kl_crossing(*curves[ckey(r)], tau) if not math.isnan(tau) else np.nan
                                       for r in table.itertuples()]
    trig = table[f"trigger_x_{final}"]
    table["verdict"] = [verdict(t, c) for t, c in zip(trig, table["ceiling_x"])]
    table["predicted_verdict"] = [verdict(t, c) for t, c in zip(trig, table["predicted_ceiling_x_alignment"])]
    table["max_alignment_write"] = [max_align.loc[ckey(r), "max_write"] for r in table.itertuples()]
    table["max_alignment_readout"] = [max_align.loc[ckey(r), "max_readout"] for r in table.itertuples()]
    # readout alignment at which open training neurons triggered
    sp_idx = sp.set_index(["layer", "neuron", "sign", "x_abs"])["alignment_readout"]
    trig_align = []
    for r in table[train & (table["verdict"] == "open")].itertuples():
        xs = sp.loc[(sp.layer == r.layer) & (sp.neuron == r.neuron) & (sp.sign == r.sign), "x_abs"]
        nearest = xs.iloc[(xs - trig[r.Index]).abs().argmin()] if len(xs) else np.nan
        if not np.isnan(nearest):
            trig_align.append(abs(sp_idx.loc[(r.layer, r.neuron, r.sign, nearest)]))
    trigger_alignment = float(np.median(trig_align)) if trig_align else float("nan")
    table["failure_mode"] = [
        classify_failure(v, int(l), n_layers, mw, mr, trigger_alignment)
        for v, l, mw, mr in zip(table["verdict"], table["layer"], table["max_alignment_write"],
                                table["max_alignment_readout"])
    ]
    fitted = {"c_star": c_star, "kl_threshold": tau, "trigger_readout_alignment": trigger_alignment}
    return table, fitted


def neuron_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """One verdict per neuron: open iff open in either dose sign."""
    g = table.groupby(["behaviour", "layer", "neuron", "split", "band", "kind"], as_index=False)
    return g.agg(verdict=("verdict", lambda v: "open" if (v == "open").any() else "closed"),
                 predicted_verdict=("predicted_verdict", lambda v: "open" if (v == "open").any() else "closed"))


def heldout_summary(table: pd.DataFrame, fitted: dict, n_boot: int, seed: int) -> dict:
    held = table[table["split"] == "heldout"]
    out: dict = {"fitted_on_training_neurons": fitted}
    for name, col in (("alignment", "predicted_ceiling_x_alignment"), ("kl", "predicted_ceiling_x_kl")):
        ok = held.dropna(subset=["ceiling_x"])
        err_x = (ok[col] - ok["ceiling_x"]).abs()
        meas_a = np.abs(saturation_curve(ok["sign"] * ok["ceiling_x"], ok["c0"]))
        pred_a = np.abs(saturation_curve(ok["sign"] * ok[col], ok["c0"]))
        err_a = np.abs(pred_a - meas_a)
        entry = {"n_with_measured_ceiling": int(len(ok)),
                 "n_prediction_missing": int(ok[col].isna().sum()),
                 "n_heldout_pairs": int(len(held))}
        for unit, err in (("x", err_x), ("alignment", err_a)):
            e = np.asarray(err, float)
            lo, hi = bootstrap_ci(e, n_boot=n_boot, seed=seed)
            entry[f"mae_{unit}"] = float(np.nanmean(e)) if np.isfinite(e).any() else None
            entry[f"mae_{unit}_ci95"] = [lo, hi]
            for band in ("bulk", "early", "late"):
                eb = e[(ok["band"] == band).to_numpy()]
                entry[f"mae_{unit}_{band}"] = float(np.nanmean(eb)) if np.isfinite(eb).any() else None
        out[f"predictor_{name}"] = entry
    verdicts = neuron_verdicts(table)
    hv = verdicts[verdicts["split"] == "heldout"]
    score = score_verdicts(hv["predicted_verdict"], hv["verdict"])
    out["verdicts"] = {
        "n_heldout_neurons": score.n, "correct": score.correct, "accuracy": score.accuracy,
        "majority_class": score.majority_class, "majority_correct": score.majority_correct,
        "binomial_p_value_vs_majority": score.p_value,
        "measured_open": int((hv["verdict"] == "open").sum()),
    }
    closed = table[(table["split"] == "heldout") & (table["verdict"] == "closed")]
    out["failure_modes_heldout"] = {m: int((closed["failure_mode"] == m).sum()) for m in FAILURE_MODES}
    out["published"] = {"heldout_neurons": 15, "mae": 0.14, "mae_bulk": 0.07, "verdicts_correct": 11,
                        "majority_baseline": 10}
    return out


def refusal_pivots(sweeps: pd.DataFrame, table: pd.DataFrame) -> list[dict]:
    """For each open refusal neuron: rollout-type fractions per horizon at its trigger dose."""
    out = []
    final = sweeps["horizon"].max()
    for r in table[(table["behaviour"] == "refusal") & (table["verdict"] == "open")].itertuples():
        x = getattr(r, f"trigger_x_{final}")
        at = sweeps[(sweeps.behaviour == "refusal") & (sweeps.layer == r.layer) & (sweeps.neuron == r.neuron)
                    & (sweeps.sign == r.sign) & np.isclose(sweeps.x.abs(), x)]
        by_h = {int(h): g["rollout_type"].value_counts(normalize=True).to_dict() for h, g in at.groupby("horizon")}
        actionable_from = next((h for h in sorted(by_h) if by_h[h].get("actionable", 0) > 0), None)
        out.append({"layer": int(r.layer), "neuron": int(r.neuron), "sign": int(r.sign), "trigger_x": float(x),
                    "type_fractions_by_horizon": by_h, "actionable_from_horizon": actionable_from,
                    "reach": "actionable" if actionable_from is not None else "coherent_bypass"})
    return out
