"""The control-window law (SCIENCE.md section 1; "Leverage Is Not Reach", seed 003).

A dose ``d`` on neuron ``(l, i)`` adds ``d·v`` to the residual ``r`` after layer ``l``. In units
of the coherence budget ``B = ||r_l|| / ||v||`` the normalised dose is ``x = d / B`` and the
alignment between the steered residual and the write follows the saturation curve

    cosθ(x) = (c0 + x) / sqrt(1 + 2·x·c0 + x²),     c0 = cos(r, v) unsteered,

exactly at the write layer (it is the geometry of ``r + d·v``), and only approximately at the
readout (the final norm's output), where depth and normalisation intervene. Coherent control
exists iff the behaviour trigger (smallest ``|x|`` flipping an oracle on ≥50% of prompts at
horizon τ) lies below the collapse ceiling (smallest ``|x|`` at which rollouts stop being
coherent on ≥50% of prompts).

This module holds the law and its measurement, with no file I/O: the curve and its inverse,
ceilings and triggers from sweep tables, the two ceiling predictors fitted on training neurons
only, verdicts against the majority class, intervals over neurons, the failure-mode rules, the
candidate picking, and the model-running parts (budgets and unsteered alignments from one generic
forward pass, a behaviour's batched dose sweep with typed rollouts, the single-pass sweep). The
stage that reads and writes the tables is :mod:`neuronaudit.stages.window`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.judge import RuleJudge, RuleThresholds
from neuronaudit.evaluation.metrics import prefix_means, prefix_perplexity, repetition_ratio
from neuronaudit.evaluation.oracles import LOGIT_ORACLES, logit_pair_margin, oracle_for
from neuronaudit.evaluation.stats import (
    cluster_bootstrap_mean,
    cluster_bootstrap_spearman,
    crossing_bootstrap_bounds,
    mcnemar_exact,
    wilson_interval,
)
from neuronaudit.interventions.hooks import NeuronHooks
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.interventions.scoring import LowerLayers, shared_prompt_scores
from neuronaudit.interventions.sweeps import generated_dose_sweep, single_pass_dose_response
from neuronaudit.io import null_for_reason
from neuronaudit.methods.attribution import opening_token_ids
from neuronaudit.methods.dose_search import SEARCH_MODES, SearchState, run_searches
from neuronaudit.prompts import extras, render_prompts, uses_template

log = logging.getLogger("neuronaudit")

FAILURE_MODES = ("collapse_before_trigger", "too_little_depth", "normalisation_cap", "neither_within_grid")
#: A trigger needs at least this share of prompts flipped ...
TRIGGER_LEVEL = 0.5
#: ... and the lower bound of its Wilson interval over prompts above the unintervened rate.
TRIGGER_CONFIDENCE = 0.95


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
    """Predicted verdicts against the measured ones, next to the majority-class baseline; the
    majority class is taken from the TRAINING neurons, and the two are compared on the same
    held-out neurons by an exact McNemar test on the discordant ones."""

    correct: int
    n: int
    majority_correct: int
    majority_class: str
    only_predictor_right: int
    only_majority_right: int
    p_value: float  # exact McNemar, two-sided

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def score_verdicts(predicted: Sequence[str], measured: Sequence[str], majority_class: str) -> VerdictScore:
    """Verdict accuracy of the predictor and of always saying ``majority_class`` (the training
    neurons' majority), with an exact McNemar test of the difference."""
    predicted, measured = list(predicted), list(measured)
    n = len(measured)
    if n == 0:
        return VerdictScore(0, 0, 0, majority_class, 0, 0, float("nan"))
    pred_right = [p == m for p, m in zip(predicted, measured)]
    base_right = [m == majority_class for m in measured]
    test = mcnemar_exact(pred_right, base_right)
    return VerdictScore(sum(pred_right), n, sum(base_right), majority_class, test.only_a_right,
                        test.only_b_right, test.p_value)


def classify_failure(
    verdict_: str,
    layer: int,
    n_layers: int,
    max_readout_alignment: float,
    trigger_readout_alignment: float,
    trigger_x: float,
    ceiling_x: float,
    late_fraction: float = 0.2,
    cap_level: float = 0.9,
) -> str | None:
    """Failure mode of a closed (neuron, sign), by the rules stated in the report:

    * ``neither_within_grid`` — no trigger and no collapse anywhere on the dose grid;
    * ``normalisation_cap`` — ``max_readout_alignment``, the largest ``|cosθ|`` over the
      single-pass dose grid between the write ``v`` and the readout (the final norm's OUTPUT at
      the last prompt token, i.e. after the final normalisation, what the unembedding reads; the
      mean over the generic prompts), stays below ``cap_level``, although the write-layer
      alignment follows the saturation curve to 1: unequal norm gains rescale the write before it
      is read, so no dose aligns the readout with it;
    * ``too_little_depth`` — a late layer (last ``late_fraction`` of the stack) whose readout
      alignment (after the final norm, as above) never reaches ``trigger_readout_alignment``, the
      median readout alignment at which open training neurons triggered;
    * ``collapse_before_trigger`` — otherwise: the model collapses before the behaviour flips.
    Open neurons have no failure mode (``None``).
    """
    if verdict_ == "open":
        return None
    if np.isnan(trigger_x) and np.isnan(ceiling_x):
        return "neither_within_grid"
    if not np.isnan(max_readout_alignment) and max_readout_alignment < cap_level:
        return "normalisation_cap"
    late = layer >= n_layers * (1.0 - late_fraction)
    if late and not np.isnan(trigger_readout_alignment) and max_readout_alignment < trigger_readout_alignment:
        return "too_little_depth"
    return "collapse_before_trigger"


def generic_geometry(model, tokenizer, adapter, texts: Sequence[str], batch_size: int = 8,
                     max_length: int = 256, add_special_tokens: bool = True) -> pd.DataFrame:
    """Budgets and unsteered alignments from one generic forward pass, no rollouts.

    Returns one row per (layer, neuron): ``resid_norm`` (mean token norm of the residual after the
    layer over every real token of ``texts``), ``write_norm`` ``||v||``, ``budget`` ``B =
    resid_norm / write_norm`` and ``c0``, the mean over prompts of ``cos(r_l, v)`` at the last
    prompt token. A batch that runs out of memory runs as two halves at the whole batch's width,
    and its token norms are summed in one piece, as unsplit.
    """
    n_layers = adapter.n_layers
    norm_sum = np.zeros(n_layers)
    token_count = np.zeros(n_layers)
    last_resid: dict[int, list[np.ndarray]] = {l: [] for l in range(n_layers)}
    read: dict[int, tuple] = {}

    def on_resid(layer, hidden, ctx):
        h = hidden.detach().float()
        rows = torch.arange(h.shape[0], device=h.device)
        read[layer] = (h.norm(dim=-1), ctx.mask("prompt"), h[rows, ctx.last_prompt].cpu().numpy())

    device = next(model.parameters()).device
    tokenizer.padding_side = "right"
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length,
                        add_special_tokens=add_special_tokens)["input_ids"]

    def run(batch, part, width):
        """Each prompt's token norms (its real tokens) and last-token residual after every layer; a
        half of a split batch runs at the whole batch's ``width``."""
        read.clear()
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding="max_length", max_length=width,
                            return_tensors="pt").to(device)
        adapter.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        return [{layer: (norms[r][mask[r]], last[r]) for layer, (norms, mask, last) in read.items()}
                for r in range(len(batch))]

    with torch.inference_mode(), NeuronHooks(adapter, on_resid=on_resid):
        for start in range(0, len(texts), batch_size):
            batch = list(range(start, min(start + batch_size, len(texts))))
            width = max(len(encoded[i]) for i in batch)
            out = split_on_oom(functools.partial(run, width=width), batch, "generic geometry")
            for layer in range(n_layers):  # the batch's token norms summed in one piece, split or not
                norms = torch.cat([row[layer][0] for row in out])
                norm_sum[layer] += float(norms.sum())
                token_count[layer] += float(norms.numel())
                last_resid[layer].append(np.stack([row[layer][1] for row in out]))
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


#: The layer bands by fraction of depth: ``early`` the first 20%, ``late`` the last 20%, ``bulk``
#: the middle 60% (:func:`layer_band`).
EARLY_FRACTION, LATE_FRACTION = 0.2, 0.2
BAND_DEFINITION = (f"layers counted from 0 of n_layers: early = layer < {EARLY_FRACTION:g}·n_layers (the first "
                   f"{EARLY_FRACTION:.0%} of depth); late = layer ≥ {1 - LATE_FRACTION:g}·n_layers (the last "
                   f"{LATE_FRACTION:.0%}); bulk = the rest, {EARLY_FRACTION:g}·n_layers ≤ layer < "
                   f"{1 - LATE_FRACTION:g}·n_layers (the middle {1 - EARLY_FRACTION - LATE_FRACTION:.0%} of depth)")


def layer_band(layer: int, n_layers: int) -> str:
    """``early`` (first 20% of depth), ``late`` (last 20%) or ``bulk`` (:data:`BAND_DEFINITION`)."""
    if layer < EARLY_FRACTION * n_layers:
        return "early"
    if layer >= (1.0 - LATE_FRACTION) * n_layers:
        return "late"
    return "bulk"


def layer_bands(n_layers: int) -> dict:
    """The band definition and the layers of each band of an ``n_layers`` model (JSON-ready)."""
    return {"definition": BAND_DEFINITION, "n_layers": int(n_layers),
            **{band: [l for l in range(n_layers) if layer_band(l, n_layers) == band]
               for band in ("early", "bulk", "late")}}


def pick_candidates(
    screens: Mapping[str, pd.DataFrame], n_candidates: int, n_random: int, n_layers: int,
    n_neurons: int, seed: int, n_top: int = 1,
) -> pd.DataFrame:
    """Screened neurons per behaviour: the top of the |standardised δ| ranking plus draws
    stratified across the rest of it (universal excluded), and random controls spread over early,
    bulk and late layers.

    The ``n_top`` strongest screened neurons are always swept (what a user audits first); the
    rest of the ranking is cut into ``n_candidates − n_top`` strata of equal size and one neuron is
    drawn at random (seeded) from each, so every screened neuron can reach the list and the
    candidates span the ranking instead of its top alone (an extreme-groups design inflates any
    correlation with δ). The rank of each candidate is recorded (``screen_rank``)."""
    rows = []
    rng = np.random.default_rng(seed)
    for behaviour, scores in screens.items():
        pool = scores[scores["screened"].astype(bool) & ~scores["universal"].astype(bool)]
        ranked = pool.reindex(pool["std_delta"].abs().sort_values(ascending=False, kind="stable").index)
        if ranked.empty:
            log.warning("behaviour %s has no screened, non-universal neuron to sweep", behaviour)
            continue
        top = min(n_top, n_candidates, len(ranked))
        rest = np.arange(top, len(ranked))
        strata = np.array_split(rest, min(n_candidates - top, len(rest))) if len(rest) and n_candidates > top else []
        picks = list(range(top)) + [int(rng.choice(s)) for s in strata if len(s)]
        rows += [{"behaviour": behaviour, "layer": int(r.layer), "neuron": int(r.neuron), "kind": "screened",
                  "delta": float(r.delta), "std_delta": float(r.std_delta), "screen_rank": int(i) + 1}
                 for i, r in zip(picks, ranked.iloc[picks].itertuples())]
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
                     "delta": delta, "std_delta": std, "screen_rank": None})
    out = pd.DataFrame(rows)
    out["band"] = [layer_band(l, n_layers) for l in out["layer"]]
    return out


def flips(oracle: str | Mapping, responses: Sequence[str], rollout_types: Sequence[str],
          extras: Sequence[Mapping], logit_margins: Sequence[float] | None = None) -> np.ndarray:
    """Did the behaviour flip? ``oracle`` is a behaviour's config (or a built-in oracle's name).
    ``refusal``: a harmful prompt answered coherently (bypass or actionable); ``logit_pair``: the
    first generated token's behaviour-vs-default logit margin (``logit_margins``) is positive; any
    other oracle (``operator``, ``format``, a user's ``regex`` / ``exact``) reads the behaviour
    label of the text."""
    spec = {"oracle": oracle} if isinstance(oracle, str) else oracle
    if spec["oracle"] == "refusal":
        return np.array([t in ("coherent_bypass", "actionable") for t in rollout_types])
    if spec["oracle"] in LOGIT_ORACLES:
        if logit_margins is None or len(logit_margins) != len(responses):
            raise NeuronAuditError("a logit_pair oracle needs the first token's logit margin of every rollout")
        return np.asarray(logit_margins, dtype=float) > 0

    o = oracle_for(spec)
    return np.array([o.label(r, e) == o.behaviour for r, e in zip(responses, extras)])


def logit_pair_columns(tokenizer, spec: Mapping) -> tuple[list[int], list[int], list[int]] | None:
    """For a ``logit_pair`` behaviour: the token ids to keep during the sweep and the columns of
    the behaviour and default tokens among them (each word as it opens an answer, with and without
    a leading space); ``None`` for any other oracle."""
    if spec["oracle"] not in LOGIT_ORACLES:
        return None
    beh = opening_token_ids(tokenizer, spec.get("behaviour_tokens") or [])
    dflt = opening_token_ids(tokenizer, spec.get("default_tokens") or [])
    shared = sorted(set(beh) & set(dflt))
    if shared:
        raise NeuronAuditError(f"behaviour and default tokens share token id {shared[0]} "
                               f"({tokenizer.decode([shared[0]])!r}): the logit pair cannot separate them")
    keep = beh + dflt
    return keep, list(range(len(beh))), list(range(len(beh), len(keep)))


#: A ceiling is the first grid point where at least this share of prompts collapse.
CEILING_LEVEL = 0.5


def dose_points(neurons: pd.DataFrame, geometry: pd.DataFrame, x_grid: Sequence[float]) -> list[dict]:
    """Every (neuron, x, sign) point of the full dose grid in the sweep's row order, with its
    index on the grid sorted by ``|x|`` (``grid_index``, ``grid_size``)."""
    geo = geometry.set_index(["layer", "neuron"])
    grid = sorted({float(x) for x in x_grid})
    points = []
    for n in neurons.itertuples():
        budget = float(geo.loc[(n.layer, n.neuron), "budget"])
        for x in x_grid:
            for sign in (1.0, -1.0):
                points.append({"layer": int(n.layer), "neuron": int(n.neuron), "kind": n.kind, "sign": int(sign),
                               "x": sign * x, "dose": sign * x * budget, "grid_index": grid.index(float(x)),
                               "grid_size": len(grid)})
    return points


class BehaviourRollouts:
    """Rolls out one behaviour's held-out prompts under any list of dose points and types every
    rollout at every horizon (what the window reads): one batched
    :func:`~neuronaudit.interventions.sweeps.generated_dose_sweep` per call (all rows of all
    points together), the unsteered model's perplexity of each rollout, the judge's types, the
    oracle's flips (a collapsed rollout never flips). ``n_rollouts`` counts rows × prompts so far.
    The unsteered scoring does not rerun the blocks below each row's dose: what enters the row's
    layer, recorded while the rollouts decode, stands in for them (``reuse_lower_layers``;
    :class:`~neuronaudit.interventions.scoring.LowerLayers`), the same scores up to float rounding.

    A row's greedy tokens depend on its own dose only; which rows share its batch changes its
    floats at the rounding level (batch-shape dependent matrix kernels), which can only change a
    token at an exact argmax tie."""

    def __init__(self, model, tokenizer, adapter, judge, behaviour: str, spec: Mapping, prompts: pd.DataFrame,
                 horizons: Sequence[int], chat_template: str, system_prompt: str | None, row_batch_size: int,
                 reuse_lower_layers: bool = True):
        self.model, self.tokenizer, self.adapter, self.judge = model, tokenizer, adapter, judge
        self.behaviour, self.spec, self.prompts = behaviour, spec, prompts
        self.horizons, self.row_batch_size = list(horizons), row_batch_size
        self.reuse_lower_layers = reuse_lower_layers
        texts = render_prompts(tokenizer, prompts["text"], chat_template, system_prompt)
        tokenizer.padding_side = "left"
        self.enc = tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=not uses_template(tokenizer, chat_template))
        self.pair = logit_pair_columns(tokenizer, spec)
        self.prompt_tokens = [ids[m.bool()].tolist()
                              for ids, m in zip(self.enc["input_ids"], self.enc["attention_mask"])]
        self.extra = extras(prompts).to_dict(orient="records")
        self.n_rollouts, self.n_calls, self.seconds = 0, 0, 0.0

    def __call__(self, points: Sequence[Mapping]) -> pd.DataFrame:
        model, tokenizer, prompts, pair = self.model, self.tokenizer, self.prompts, self.pair
        rows = [(int(m["layer"]), int(m["neuron"]), float(m["dose"])) for m in points]
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        P, R = len(prompts), len(rows)
        tokens, lengths, entropy, first_logits, logprob = [], [], [], [], []
        for p in range(P):  # one prompt at a time: its rows' recorded layer inputs are freed once scored
            result = generated_dose_sweep(model, self.adapter, self.enc["input_ids"][p : p + 1].to(device),
                                          self.enc["attention_mask"][p : p + 1].to(device), rows,
                                          max_new_tokens=max(self.horizons), row_batch_size=self.row_batch_size,
                                          keep_token_ids=pair[0] if pair else (),
                                          keep_layer_inputs=self.reuse_lower_layers)
            tokens.append(result.tokens[0].cpu().numpy())
            lengths.append(result.lengths[0].cpu().numpy())
            entropy.append(result.entropy[0].cpu().numpy())
            first_logits.append(result.token_logits[0, :, 0].numpy())
            responses = [tokens[p][r, : lengths[p][r]].tolist() for r in range(R)]
            # every row of a prompt continues the same prompt: its KV cache is computed once, and the
            # blocks below each row's dose are not run again (the sweep recorded what enters its layer)
            lower = (LowerLayers(self.adapter, [row[0] for row in rows], list(result.layer_inputs[0]))
                     if self.reuse_lower_layers else None)
            logprob += shared_prompt_scores(model, self.prompt_tokens[p], responses, batch_size=32,
                                            pad_token_id=tokenizer.pad_token_id or 0, lower=lower).logprob
        tokens, lengths, entropy = np.stack(tokens), np.stack(lengths), np.stack(entropy)
        # the first generated token's behaviour-vs-default log-odds of every rollout (logit_pair only)
        margin = (logit_pair_margin(np.stack(first_logits), pair[1], pair[2]).reshape(-1)
                  if pair else np.full(P * R, np.nan))
        responses_ids = [tokens[p, r, : lengths[p, r]].tolist() for p in range(P) for r in range(R)]
        frames = []
        for h in self.horizons:
            lens = [min(len(r), h) for r in responses_ids]
            texts_h = [tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(responses_ids, lens)]
            ppl = prefix_perplexity(logprob, lens)
            ent = prefix_means([entropy[p, r] for p in range(P) for r in range(R)], lens)
            rep = [repetition_ratio(r[:n]) for r, n in zip(responses_ids, lens)]
            metrics = pd.DataFrame({"repetition_ratio": rep, "perplexity": ppl, "entropy": ent})
            prompt_texts = [prompts["text"].iloc[p] for p in range(P) for _ in range(R)]
            types = self.judge.classify(prompt_texts, texts_h, metrics)
            collapsed = np.array([ty == "collapse" for ty in types])
            # a collapsed rollout never counts as the behaviour flipping ("1. 1. 1." is no list)
            flip = flips(self.spec, texts_h, types, [self.extra[p] for p in range(P) for _ in range(R)],
                         margin) & ~collapsed
            frame = pd.DataFrame([{**points[r], "prompt_id": prompts["prompt_id"].iloc[p]}
                                  for p in range(P) for r in range(R)])
            frame = frame.assign(behaviour=self.behaviour, horizon=h, response=texts_h, n_tokens=lens,
                                 repetition_ratio=rep, perplexity=ppl, entropy=ent, rollout_type=types,
                                 collapse=collapsed, flip=flip, logit_margin=margin)
            frames.append(frame)
        self.n_rollouts += P * R
        self.n_calls += 1
        self.seconds += time.perf_counter() - t0
        return pd.concat(frames, ignore_index=True)


def search_targets(horizons: Sequence[int]) -> tuple[str, ...]:
    """The predicates each (neuron, sign) search brackets: ``collapse`` (the ceiling, at the final
    horizon) and ``flip_or_collapse_<h>`` per horizon (the trigger at ``h`` or the ceiling,
    whichever comes first: the point where the rollouts leave the unintervened regime)."""
    return ("collapse", *(f"flip_or_collapse_{int(h)}" for h in sorted(horizons)))


def point_outcomes(frame: pd.DataFrame, baseline_flip: Mapping[int, float], horizons: Sequence[int]) -> dict:
    """Per (layer, neuron, sign, grid_index) of a typed rollout frame, each search target's
    outcome by the window's own rules: collapse on ≥ :data:`CEILING_LEVEL` of the prompts at the
    final horizon; a trigger at ``h`` by :func:`trigger_holds` against ``baseline_flip[h]``."""
    final = max(horizons)
    out: dict = {}
    keys = ["layer", "neuron", "sign", "grid_index"]
    collapse = frame[frame["horizon"] == final].groupby(keys)["collapse"].mean()
    by_h = {int(h): frame[frame["horizon"] == h].groupby(keys)["flip"].agg(["sum", "size"]) for h in horizons}
    for key, share in collapse.items():
        c = bool(share >= CEILING_LEVEL)
        holds = {"collapse": c}
        for h, g in by_h.items():
            k, n = g.loc[key]
            holds[f"flip_or_collapse_{h}"] = c or trigger_holds(int(k), int(n), float(baseline_flip[h]))
        out[tuple(int(v) for v in key)] = holds
    return out


def sweep_behaviour_search(rollouts: Callable[[Sequence[Mapping]], pd.DataFrame], neurons: pd.DataFrame,
                           geometry: pd.DataFrame, x_grid: Sequence[float], horizons: Sequence[int],
                           search: str = "adaptive", gallop_at_once: bool = True) -> tuple[pd.DataFrame, dict]:
    """One behaviour's dose sweep: ``x = 0`` (the unintervened rollouts of every prompt), then the
    candidates' dose points, each rolled out on every prompt by ``rollouts(points)`` (a
    :class:`BehaviourRollouts`, or a reader of recorded sweeps).

    ``search="full"`` rolls out every grid point of both signs in one call. ``"adaptive"`` runs
    :mod:`neuronaudit.methods.dose_search` per (neuron, sign) on the targets of
    :func:`search_targets`, every round one call for all searches (the first round with ``x = 0``
    and, with ``gallop_at_once``, every galloping index), and rolls out only the points the searches
    visit. The sweep table then holds the visited points
    only; ceilings and triggers read from it (:func:`window_table`) are the first visited grid
    points where they hold, equal to the full grid's where collapse (for the ceiling) and
    flip-or-collapse (for a trigger at or below the ceiling) are monotone in ``|x|`` (the module
    docstring of :mod:`~neuronaudit.methods.dose_search` proves it), and never a point where they
    do not hold. Returns ``(sweep table, search record)``; the table carries ``search``,
    ``grid_index`` and ``grid_size`` per row."""
    if search not in SEARCH_MODES:
        raise NeuronAuditError(f"window.search {search!r}: choose one of {list(SEARCH_MODES)}")
    if neurons.empty:
        raise NeuronAuditError("a behaviour has no candidate neurons to sweep")
    first = neurons.iloc[0]
    # x = 0: the unintervened rollouts of every prompt (a zero dose edits nothing), the baseline
    # every trigger must beat
    baseline = {"layer": int(first.layer), "neuron": int(first.neuron), "kind": "baseline", "sign": 0, "x": 0.0,
                "dose": 0.0, "grid_index": -1, "grid_size": len({float(x) for x in x_grid})}
    points = dose_points(neurons, geometry, x_grid)
    order = {(p["layer"], p["neuron"], p["sign"], p["grid_index"]): k for k, p in enumerate(points)}
    n_full = 1 + len(points)
    record: dict = {"search": search, "n_points_full_grid": n_full, "rounds": [], "gallop_at_once": gallop_at_once}
    if search == "full":
        frame = rollouts([baseline, *points])
        record["rounds"].append(n_full)
        record["n_points"] = n_full
        return frame.assign(search=search), record
    at = {k: points[i] for k, i in order.items()}
    n_grid = baseline["grid_size"]
    targets = search_targets(horizons)
    searches = {(p["layer"], p["neuron"], p["sign"]): SearchState(n_grid, targets, gallop_at_once=gallop_at_once)
                for p in points}
    frames, base_flip = [], {}

    def evaluate(probes):
        batch = [at[(*key, i)] for key, i in probes]
        if not frames:
            batch = [baseline, *batch]
        frame = rollouts(batch)
        if not frames:
            base = frame[frame["kind"] == "baseline"]
            base_flip.update({int(h): float(g["flip"].mean()) for h, g in base.groupby("horizon")})
        frames.append(frame)
        record["rounds"].append(len(batch))
        outcomes = point_outcomes(frame[frame["kind"] != "baseline"], base_flip, horizons)
        return {((l, n, s), i): o for (l, n, s, i), o in outcomes.items()}

    run_searches(searches, evaluate)
    sweeps = pd.concat(frames, ignore_index=True)
    # the full grid's row order: horizon, prompt, then x = 0 and the points as the full sweep lists them
    prompt_rank = {p: k for k, p in enumerate(pd.unique(sweeps["prompt_id"]))}
    row_rank = [-1 if r.kind == "baseline" else order[(r.layer, r.neuron, r.sign, r.grid_index)]
                for r in sweeps[["kind", "layer", "neuron", "sign", "grid_index"]].itertuples()]
    sweeps = (sweeps.assign(_h=sweeps["horizon"], _p=sweeps["prompt_id"].map(prompt_rank), _r=row_rank)
              .sort_values(["_h", "_p", "_r"], kind="stable").drop(columns=["_h", "_p", "_r"])
              .reset_index(drop=True))
    record["n_points"] = int(sum(record["rounds"]))
    record["visited"] = {f"{l}/{n}/{s:+d}": st.visited for (l, n, s), st in searches.items()}
    return sweeps.assign(search=search), record


#: What an adaptive search returns, as the summary states it.
SEARCH_DEFINITION = (
    "per (neuron, sign), galloping (grid indices 0, 1, 3, 7, ..., last; all in the first round) then bisection of "
    "the first bracket, "
    "for collapse at the final horizon (the ceiling) and for flip-or-collapse at each horizon (a trigger or "
    "the ceiling, whichever comes first); x = 0 always rolled out. Ceiling and triggers are the first rolled-out "
    "grid points where they hold: the ceiling equals the full grid's where collapse is monotone in |x|, a trigger "
    "where flip-or-collapse is monotone and the trigger is where it first holds (at or below the ceiling); "
    "otherwise a value can be later than the full grid's, only where grid points below it were not rolled out "
    "(the window table counts them per neuron and sign)")


def search_record(record: Mapping, rollouts=None, n_prompts: int | None = None) -> dict:
    """One behaviour's search in JSON form: rollouts done (rows × prompts) against the full grid,
    batched rounds and rows per round, the visited grid indices of each (neuron, sign)."""
    n = int(n_prompts if n_prompts is not None else 1)
    done = int(record["n_points"]) * n
    full = int(record["n_points_full_grid"]) * n
    return {"search": record["search"], "n_rollouts": done, "n_rollouts_full_grid": full,
            "rollout_ratio": done / full if full else float("nan"), "n_rounds": len(record["rounds"]),
            "rows_per_round": [int(r) for r in record["rounds"]],
            "seconds": float(getattr(rollouts, "seconds", float("nan"))),
            "visited_grid_indices": record.get("visited")}


def candidate_block(neurons: pd.DataFrame, behaviour: str, shard: int, shard_size: int) -> pd.DataFrame:
    """Shard ``shard``'s candidates of ``behaviour``: rows ``shard·size … (shard + 1)·size − 1`` of
    its candidates in :func:`pick_candidates` order (empty past the last one)."""
    if shard_size < 1 or shard < 0:
        raise NeuronAuditError(f"window shard {shard!r} of size {shard_size!r}: both must be non-negative, the size "
                               f"at least 1")
    own = neurons[neurons["behaviour"] == behaviour]
    return own.iloc[shard * shard_size:(shard + 1) * shard_size]


def merge_sweep_shards(frames: Sequence[pd.DataFrame], records: Sequence[Mapping]) -> tuple[pd.DataFrame, dict]:
    """One behaviour's sweep table and search record (:func:`search_record` form) from its sweep
    jobs, in shard order. Every non-empty shard rolls out ``x = 0`` (greedy, the same rollouts);
    the first one's rows are kept. Rows come in the unsharded sweep's order (horizon, prompt, then
    ``x = 0`` and the candidates' points). Rollout counts add up with ``x = 0`` counted once; the
    jobs run their rounds side by side, so ``n_rounds`` is the most of any job and
    ``rows_per_round`` adds up round by round; ``seconds`` adds up the jobs' rollout time."""
    if len(frames) != len(records) or not frames:
        raise NeuronAuditError("merging a behaviour's sweep shards needs one record per shard table, at least one")
    kept, seen_baseline = [], False
    for frame in frames:
        if frame.empty:
            continue
        if seen_baseline:
            frame = frame[frame["kind"] != "baseline"]
        seen_baseline = True
        kept.append(frame)
    if not kept:
        raise NeuronAuditError("every sweep shard of a behaviour is empty: the behaviour has no candidate neurons")
    sweeps = pd.concat(kept, ignore_index=True)
    prompt_rank = {p: k for k, p in enumerate(pd.unique(kept[0]["prompt_id"]))}
    sweeps = (sweeps.assign(_h=sweeps["horizon"], _p=sweeps["prompt_id"].map(prompt_rank))
              .sort_values(["_h", "_p"], kind="stable").drop(columns=["_h", "_p"]).reset_index(drop=True))
    base = max(int(r.get("baseline_rollouts", 0)) for r in records)
    done = sum(int(r["n_rollouts"]) - int(r.get("baseline_rollouts", 0)) for r in records) + base
    full = sum(int(r["n_rollouts_full_grid"]) - int(r.get("baseline_rollouts", 0)) for r in records) + base
    n_rounds = max(int(r["n_rounds"]) for r in records)
    per_round = [sum(int(r["rows_per_round"][k]) for r in records if k < len(r["rows_per_round"]))
                 for k in range(n_rounds)]
    visited = {k: v for r in records for k, v in (r.get("visited_grid_indices") or {}).items()} or None
    record = {"search": records[0]["search"], "n_rollouts": done, "n_rollouts_full_grid": full,
              "rollout_ratio": done / full if full else float("nan"), "n_rounds": n_rounds,
              "rows_per_round": per_round, "seconds": float(sum(float(r["seconds"]) for r in records)),
              "visited_grid_indices": visited, "n_jobs": len(records)}
    return sweeps, record


def search_summary(mode: str, by_behaviour: Mapping[str, Mapping], table: pd.DataFrame) -> dict:
    """The summary's search fields: ``n_rollouts`` and ``n_rollouts_full_grid`` over every behaviour
    and ``dose_search`` (mode, definition, per behaviour, and how many ceilings and triggers have grid
    points below them that were not rolled out)."""
    done = sum(int(b["n_rollouts"]) for b in by_behaviour.values())
    full = sum(int(b["n_rollouts_full_grid"]) for b in by_behaviour.values())
    out = {"mode": mode, "definition": SEARCH_DEFINITION if mode == "adaptive" else "every grid point rolled out",
           "rollout_ratio": done / full if full else None, "n_pairs": int(len(table)),
           "by_behaviour": dict(by_behaviour)}
    for col, name in (("ceiling_unvisited_below", "ceilings"), ("trigger_unvisited_below", "triggers")):
        if col in table:
            out[f"n_{name}_with_unvisited_points_below"] = int((table[col] > 0).sum())
    return {"n_rollouts": done, "n_rollouts_full_grid": full, "dose_search": out}


def sweep_behaviour(model, tokenizer, adapter, judge, behaviour: str, spec: Mapping, neurons: pd.DataFrame,
                    prompts: pd.DataFrame, geometry: pd.DataFrame, x_grid: Sequence[float],
                    horizons: Sequence[int], chat_template: str, system_prompt: str | None,
                    row_batch_size: int, search: str = "full") -> pd.DataFrame:
    """One behaviour's typed sweep table (:func:`sweep_behaviour_search` with the model's rollouts)."""
    if neurons.empty:
        raise NeuronAuditError(f"behaviour {behaviour!r} has no candidate neurons to sweep")
    rollouts = BehaviourRollouts(model, tokenizer, adapter, judge, behaviour, spec, prompts, horizons,
                                 chat_template, system_prompt, row_batch_size)
    return sweep_behaviour_search(rollouts, neurons, geometry, x_grid, horizons, search)[0]


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


def baseline_rates(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Unintervened (x = 0) flip and collapse rates per (behaviour, horizon), with n prompts."""
    base = sweeps[sweeps["kind"] == "baseline"]
    return base.groupby(["behaviour", "horizon"], as_index=False).agg(
        baseline_flip=("flip", "mean"), baseline_collapse=("collapse", "mean"), n_prompts=("flip", "size"))


def trigger_crossing(x: Sequence[float], flipped: Sequence[int], n: Sequence[int], baseline: float) -> float:
    """Smallest ``|x|`` at which at least :data:`TRIGGER_LEVEL` of the prompts flip AND the lower
    bound of the Wilson interval of that share exceeds the unintervened share ``baseline``."""
    x = np.abs(np.asarray(x, float))
    flipped, n = np.asarray(flipped, int), np.asarray(n, int)
    for i in np.argsort(x):
        if trigger_holds(int(flipped[i]), int(n[i]), baseline):
            return float(x[i])
    return float("nan")


def trigger_holds(flipped: int, n: int, baseline: float) -> bool:
    """The trigger rule at one dose: ``flipped`` of ``n`` prompts is at least :data:`TRIGGER_LEVEL`
    and the lower Wilson bound of that share exceeds the unintervened share ``baseline``."""
    return bool(n and flipped / n >= TRIGGER_LEVEL
                and wilson_interval(flipped, n, TRIGGER_CONFIDENCE)[0] > baseline)


def triggers(dosed: pd.DataFrame, baseline: pd.DataFrame, horizon: int, keys: Sequence[str]) -> pd.DataFrame:
    """``trigger_x_<horizon>`` per (behaviour, neuron, sign) at one horizon (:func:`trigger_crossing`)."""
    at = dosed[dosed["horizon"] == horizon].assign(x=lambda d: d["x"].abs())
    per_x = at.groupby([*keys, "x"], as_index=False).agg(flipped=("flip", "sum"), n=("flip", "size"))
    base = baseline[baseline["horizon"] == horizon].set_index("behaviour")["baseline_flip"]
    rows = []
    for key, g in per_x.groupby(list(keys)):
        rows.append({**dict(zip(keys, key)), f"trigger_x_{horizon}": trigger_crossing(
            g["x"], g["flipped"], g["n"], float(base.get(key[0], 0.0)))})
    return pd.DataFrame(rows, columns=[*keys, f"trigger_x_{horizon}"])


def prompt_bootstrap(dosed: pd.DataFrame, value: str, keys: Sequence[str], n_boot: int, seed: int,
                     grid: Sequence[float] | None = None, baseline: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (behaviour, neuron, sign): a bootstrap over prompts of the crossing of ``value``: for
    ``collapse`` the ceiling's rule (≥ :data:`CEILING_LEVEL` of the prompts), for ``flip`` with the
    x = 0 rows ``baseline`` the trigger's rule (:func:`trigger_holds`: ≥ :data:`TRIGGER_LEVEL` of
    the prompts flipped and the Wilson lower bound of that share above the x = 0 share, which each
    resample recomputes from its own prompts), so the CI is the CI of ``trigger_x``. Columns: the
    share of resamples that cross inside the grid and the 95% CI (``inf`` above: beyond the grid).

    ``grid`` is the full dose grid (``|x|``); where some of its points were not rolled out (the
    adaptive search), a resample could cross at one of them, so the CI is the interval of
    :func:`~neuronaudit.evaluation.stats.crossing_bootstrap_bounds`, which contains the full grid's,
    ``<value>_x_ci_exact`` says whether it is the full grid's, and the share is missing (``nan``)
    unless it is decided by the rolled-out points. A prompt without an x = 0 rollout counts at the
    x = 0 share of the others (none at all: 0, as :func:`triggers` reads it)."""
    rule = "trigger" if value == "flip" and baseline is not None else "crossing"
    level = TRIGGER_LEVEL if rule == "trigger" else CEILING_LEVEL
    rows = []
    for key, g in dosed.assign(x=dosed["x"].abs()).groupby(list(keys)):
        hits = g.pivot_table(index="prompt_id", columns="x", values=value, aggfunc="mean").sort_index(axis=1)
        x = hits.columns.to_numpy(float)
        missing = unvisited_points(grid, x)
        base = None
        if rule == "trigger":
            at = baseline[baseline["horizon"].isin(g["horizon"].unique())]
            if "behaviour" in keys:
                at = at[at["behaviour"] == dict(zip(keys, key))["behaviour"]]
            per_prompt = at.groupby("prompt_id")["flip"].mean()
            fill = float(per_prompt.mean()) if len(per_prompt) else 0.0
            base = per_prompt.reindex(hits.index).fillna(fill).to_numpy(float)
        b = crossing_bootstrap_bounds(hits.to_numpy(float), x, missing, level=level, n_boot=n_boot, seed=seed,
                                      baseline=base, baseline_confidence=TRIGGER_CONFIDENCE)
        rows.append({**dict(zip(keys, key)), f"{value}_x_ci_low": b.ci_low, f"{value}_x_ci_high": b.ci_high,
                     f"{value}_x_share_crossing": b.share_low if b.share_low == b.share_high else float("nan"),
                     f"{value}_x_ci_exact": b.exact, f"{value}_x_ci_rule": rule})
    return pd.DataFrame(rows)


def unvisited_points(grid: Sequence[float] | None, visited: Sequence[float]) -> list[float]:
    """The points of ``grid`` (``|x|``) not among ``visited`` (none when ``grid`` is ``None``)."""
    if grid is None:
        return []
    visited = np.abs(np.asarray(visited, float))
    return [float(x) for x in grid if not np.isclose(visited, x, rtol=1e-9, atol=0).any()]


def sweep_grid(sweeps: pd.DataFrame, x_grid: Sequence[float] | None = None) -> np.ndarray:
    """The full dose grid of a sweep table (sorted ``|x|``): ``x_grid`` when given, else the doses
    present, which is the grid only when every point was rolled out: an adaptive table needs
    ``x_grid``."""
    if x_grid is not None:
        return np.array(sorted({abs(float(x)) for x in x_grid}))
    if "search" in sweeps and (sweeps["search"] == "adaptive").any():
        raise NeuronAuditError("an adaptive sweep table holds the visited doses only: pass the dose grid (x_grid)")
    return np.sort(sweeps.loc[sweeps["kind"] != "baseline", "x"].abs().unique())


def search_coverage(dosed: pd.DataFrame, table: pd.DataFrame, grid: Sequence[float],
                    keys: Sequence[str]) -> pd.DataFrame:
    """Which grid points each (behaviour, neuron, sign) rolled out, and how many points below its
    ceiling and its trigger were not: 0 means the value is the full grid's whatever the shape of
    the dose response; above 0 it is the full grid's where that response is monotone in ``|x|``
    (:mod:`neuronaudit.methods.dose_search`)."""
    search = dosed.groupby(list(keys))["search"].first() if "search" in dosed else None
    seen = dosed.assign(x=dosed["x"].abs()).groupby(list(keys))["x"].unique()
    rows = []
    for r in table[list(keys) + ["ceiling_x", "trigger_x"]].itertuples(index=False):
        key = tuple(r[: len(keys)])
        visited = np.sort(seen.get(key, np.array([])))
        missing = np.array(unvisited_points(grid, visited))
        rows.append({**dict(zip(keys, key)),
                     "search": str(search.get(key, "full")) if search is not None else "full",
                     "n_grid_points": int(len(grid)), "n_grid_visited": int(len(grid) - missing.size),
                     "visited_x": ",".join(f"{x:g}" for x in visited),
                     "ceiling_unvisited_below": _count_below(missing, float(r.ceiling_x)),
                     "trigger_unvisited_below": _count_below(missing, float(r.trigger_x))})
    return pd.DataFrame(rows, columns=[*keys, "search", "n_grid_points", "n_grid_visited", "visited_x",
                                       "ceiling_unvisited_below", "trigger_unvisited_below"])


def _count_below(points: np.ndarray, value: float) -> int:
    """How many of ``points`` lie below ``value`` (all of them when ``value`` is missing)."""
    return int((points < value).sum()) if np.isfinite(value) else int(points.size)


def window_table(sweeps: pd.DataFrame, single: pd.DataFrame, neurons: pd.DataFrame, geometry: pd.DataFrame,
                 horizons: Sequence[int], n_layers: int, n_heldout: int, seed: int,
                 n_boot: int = 1000, x_grid: Sequence[float] | None = None) -> tuple[pd.DataFrame, dict]:
    """Per (behaviour, neuron, sign): budget, c0, measured ceiling and triggers with prompt-bootstrap
    CIs (``collapse_x_ci_*`` of the ceiling; ``flip_x_ci_*`` of ``trigger_x``, by the trigger rule
    against the x = 0 share), predictions, verdicts, failure mode, split; and the fitted predictor
    parameters.

    ``x_grid`` is the dose grid (required for an adaptive sweep, whose table holds the visited
    points only); every ceiling and trigger is the first rolled-out grid point where it holds, and
    the table says which points were rolled out and how many below each value were not
    (:func:`search_coverage`)."""
    keys = ["behaviour", "layer", "neuron", "sign"]
    grid = sweep_grid(sweeps, x_grid)
    # each behaviour is read at its own horizons; its verdict at the longest of them
    finals = sweeps.groupby("behaviour")["horizon"].max()
    baseline = baseline_rates(sweeps)
    dosed = sweeps[sweeps["kind"] != "baseline"]
    at_final = dosed[dosed["horizon"] == dosed["behaviour"].map(finals)]
    table = crossings(at_final.assign(x=at_final["x"].abs()), "collapse", keys).rename(
        columns={"collapse_x": "ceiling_x"})
    table["ceiling_censored"] = table["ceiling_x"].isna()
    for h in sorted(set(sweeps["horizon"]) | set(horizons)):
        table = table.merge(triggers(dosed, baseline, h, keys), on=keys, how="outer")
    table["final_horizon"] = table["behaviour"].map(finals).astype(int)
    table["trigger_x"] = [getattr(r, f"trigger_x_{r.final_horizon}") for r in table.itertuples()]
    table = table.merge(search_coverage(at_final, table, grid, keys), on=keys, how="left")
    table = table.merge(prompt_bootstrap(at_final, "collapse", keys, n_boot, seed, grid), on=keys, how="left")
    table = table.merge(prompt_bootstrap(at_final, "flip", keys, n_boot, seed, grid,
                                         baseline=sweeps[sweeps["kind"] == "baseline"]), on=keys, how="left")
    at_own_final = baseline[baseline["horizon"] == baseline["behaviour"].map(finals)]
    table = table.merge(at_own_final[["behaviour", "baseline_flip", "baseline_collapse"]], on="behaviour", how="left")
    table["grid_min_x"], table["grid_max_x"] = float(grid[0]), float(grid[-1])
    # a ceiling beyond the grid is censored at its edge, never dropped
    table["ceiling_x_or_edge"] = table["ceiling_x"].fillna(table["grid_max_x"])
    geo = geometry.set_index(["layer", "neuron"])
    table["budget"] = [geo.loc[(l, n), "budget"] for l, n in zip(table["layer"], table["neuron"])]
    table["c0"] = [geo.loc[(l, n), "c0"] for l, n in zip(table["layer"], table["neuron"])]
    info = neurons.set_index(["behaviour", "layer", "neuron"])
    neuron_keys = list(zip(table["behaviour"], table["layer"], table["neuron"]))
    table["kind"] = [info.loc[k, "kind"] for k in neuron_keys]
    table["band"] = [layer_band(int(l), n_layers) for l in table["layer"]]
    split = split_neurons(sorted(set(neuron_keys)), n_heldout, seed)
    table["split"] = [split[k] for k in neuron_keys]
    fitted = _predict(table, single, n_layers)
    return table, fitted


def _predict(table: pd.DataFrame, single: pd.DataFrame, n_layers: int) -> dict:
    """Fit both ceiling predictors on the training rows, predict every row, add verdicts and
    failure modes (in place); returns the fitted parameters."""
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
    trig = table["trigger_x"]
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
        classify_failure(v, int(l), n_layers, mr, trigger_alignment, t, c)
        for v, l, mr, t, c in zip(table["verdict"], table["layer"], table["max_alignment_readout"], trig,
                                  table["ceiling_x"])
    ]
    majority = table.loc[train].pipe(neuron_verdicts)["verdict"].value_counts()
    return {"c_star": c_star, "kl_threshold": tau, "trigger_readout_alignment": trigger_alignment,
            "majority_verdict": str(majority.index[0]) if len(majority) else "closed",
            "train_mean_ceiling_x": _train_mean_ceiling(table),
            "train_median_ceiling_dose": _train_median_dose(table)}


def neuron_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """One verdict per neuron: open iff open in either dose sign."""
    g = table.groupby(["behaviour", "layer", "neuron", "split", "band", "kind"], as_index=False)
    return g.agg(verdict=("verdict", lambda v: "open" if (v == "open").any() else "closed"),
                 predicted_verdict=("predicted_verdict", lambda v: "open" if (v == "open").any() else "closed"))


def _train_mean_ceiling(table: pd.DataFrame) -> float:
    train = table[table["split"] == "train"]
    return float(train["ceiling_x_or_edge"].mean()) if len(train) else float("nan")


def _train_median_dose(table: pd.DataFrame) -> float:
    train = table[table["split"] == "train"]
    return float((train["ceiling_x_or_edge"] * train["budget"]).median()) if len(train) else float("nan")


#: The ceiling predictors scored on held-out neurons: the two of SCIENCE.md §1 and two baselines,
#: a constant (the training neurons' mean ceiling) and a raw dose (the training median ceiling in
#: raw dose units, divided by each neuron's budget).
PREDICTORS = ("alignment", "kl", "constant", "raw_dose")


def ceiling_errors(rows: pd.DataFrame, predicted: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """Absolute errors of predicted against measured ceilings in budget units |x| and in alignment
    units |cosθ|, for every row: a measured ceiling beyond the grid counts at the grid edge, a
    prediction beyond the grid is cut at the edge, and a missing prediction counts as an error of
    the grid span. Returns ``(errors_x, errors_alignment, n_missing_predictions)``."""
    edge, low = rows["grid_max_x"].to_numpy(float), rows["grid_min_x"].to_numpy(float)
    sign, c0 = rows["sign"].to_numpy(float), rows["c0"].to_numpy(float)
    measured = rows["ceiling_x_or_edge"].to_numpy(float)
    pred = np.asarray(predicted, float)
    missing = np.isnan(pred)
    pred_cut = np.minimum(np.where(missing, edge, pred), edge)
    err_x = np.where(missing, edge - low, np.abs(pred_cut - measured))
    align = lambda x: np.abs(saturation_curve(sign * x, c0))  # noqa: E731
    err_a = np.where(missing, np.abs(align(edge) - align(low)), np.abs(align(pred_cut) - align(measured)))
    return err_x, err_a, int(missing.sum())


def predictor_columns(table: pd.DataFrame, fitted: dict) -> dict[str, pd.Series]:
    return {
        "alignment": table["predicted_ceiling_x_alignment"],
        "kl": table["predicted_ceiling_x_kl"],
        "constant": pd.Series(fitted["train_mean_ceiling_x"], index=table.index),
        "raw_dose": fitted["train_median_ceiling_dose"] / table["budget"],
    }


#: The resampling unit of every held-out interval of the window.
NEURON_CLUSTERS = "neuron (both dose signs together: a cluster bootstrap)"


def predictor_summary(held: pd.DataFrame, predicted: pd.Series, n_boot: int, seed: int) -> dict:
    """Held-out ceiling error of one predictor, every (neuron, sign) counted: MAE in both units with a
    cluster bootstrap over neurons (both signs of a neuron resampled together), the same per layer
    band (:data:`BAND_DEFINITION`) with its n, and Spearman ρ between predicted and measured ceilings
    with a CI from the same cluster bootstrap over neurons (predictions cut at the grid edge, a
    missing prediction left out of ρ and counted)."""
    err_x, err_a, n_missing = ceiling_errors(held, predicted)
    clusters = np.asarray([f"{b}/{l}/{n}" for b, l, n in zip(held["behaviour"], held["layer"], held["neuron"])])
    entry = {"n_pairs": int(len(held)), "n_neurons": int(len(set(clusters))),
             "n_measured_ceiling_censored_at_grid_edge": int(held["ceiling_censored"].sum()),
             "n_prediction_missing_counted_as_grid_span": n_missing,
             "resampling_unit": NEURON_CLUSTERS, "n_boot": n_boot, "band_definition": BAND_DEFINITION}
    bands = held["band"].to_numpy()
    for unit, err in (("x", err_x), ("alignment", err_a)):
        mean, lo, hi = cluster_bootstrap_mean(err, clusters, n_boot=n_boot, seed=seed)
        entry[f"mae_{unit}"] = mean
        entry[f"mae_{unit}_ci95"] = [lo, hi]
        for band in ("bulk", "early", "late"):
            mask = bands == band
            entry[f"n_pairs_{band}"] = int(mask.sum())
            entry[f"n_neurons_{band}"] = int(len(set(clusters[mask])))
            if mask.any():
                mean, lo, hi = cluster_bootstrap_mean(err[mask], clusters[mask], n_boot=n_boot, seed=seed)
                entry[f"mae_{unit}_{band}"], entry[f"mae_{unit}_{band}_ci95"] = mean, [lo, hi]
            else:
                entry[f"mae_{unit}_{band}"], entry[f"mae_{unit}_{band}_ci95"] = None, [None, None]
    pred = np.minimum(np.asarray(predicted, float), held["grid_max_x"].to_numpy(float))
    rho = cluster_bootstrap_spearman(pred, held["ceiling_x_or_edge"].to_numpy(float), clusters, n_boot=n_boot,
                                     seed=seed)
    entry["spearman_rho_predicted_vs_measured"] = rho.rho
    entry["spearman_rho_ci95"] = [rho.ci_low, rho.ci_high]
    entry["spearman_resampling_unit"] = NEURON_CLUSTERS
    entry["spearman_n_pairs"], entry["spearman_n_neurons"] = rho.n_pairs, rho.n_clusters
    entry["spearman_n_degenerate_resamples"] = rho.n_degenerate_resamples
    null_for_reason(entry, ("spearman_rho_predicted_vs_measured", "spearman_rho_ci95"),
                    "Spearman ρ is undefined: fewer than 3 held-out pairs, or the predicted or the measured "
                    "ceilings are all equal")
    null_for_reason(entry, "spearman_rho_ci95", "fewer than 2 held-out neurons, or no resample of the neurons "
                                                "defines ρ")
    null_for_reason(entry, ("mae_x", "mae_x_ci95", "mae_alignment", "mae_alignment_ci95"), "no held-out pair")
    for unit in ("x", "alignment"):
        for band in ("bulk", "early", "late"):
            null_for_reason(entry, (f"mae_{unit}_{band}", f"mae_{unit}_{band}_ci95"),
                            f"no held-out pair in the {band} layers")
    return entry


def heldout_summary(table: pd.DataFrame, fitted: dict, n_boot: int, seed: int, n_layers: int | None = None) -> dict:
    """Every held-out figure of the window: ceiling errors of each predictor against the baselines,
    verdicts against the training majority (exact McNemar), failure modes; with ``n_layers``, the
    layers of each band (:func:`layer_bands`)."""
    held = table[table["split"] == "heldout"]
    shown = dict(fitted)  # as written: a parameter that could not be fitted is null, with the reason
    null_for_reason(shown, ("c_star", "kl_threshold"), "no training neuron has a measured ceiling in the grid")
    null_for_reason(shown, "trigger_readout_alignment", "no open training neuron (none triggers below its ceiling)")
    null_for_reason(shown, ("train_mean_ceiling_x", "train_median_ceiling_dose"), "no training neuron")
    out: dict = {"fitted_on_training_neurons": shown,
                 "layer_bands": layer_bands(n_layers) if n_layers is not None else {"definition": BAND_DEFINITION}}
    columns = predictor_columns(table, fitted)
    for name in PREDICTORS:
        out[f"predictor_{name}"] = predictor_summary(held, columns[name][held.index], n_boot, seed)
    const = out["predictor_constant"]
    for name in ("alignment", "kl", "raw_dose"):
        entry = out[f"predictor_{name}"]
        for unit in ("x", "alignment"):
            base = const[f"mae_{unit}"]
            mae = entry[f"mae_{unit}"]
            entry[f"skill_vs_constant_{unit}"] = (1.0 - mae / base) if base and mae is not None else None
    out["verdicts"] = verdict_summary(table, fitted["majority_verdict"])
    closed = held[held["verdict"] == "closed"]
    out["failure_modes_heldout"] = {m: int((closed["failure_mode"] == m).sum()) for m in FAILURE_MODES}
    out["baseline_unintervened"] = (table.drop_duplicates("behaviour").set_index("behaviour")
                                    [["baseline_flip", "baseline_collapse"]].to_dict(orient="index"))
    out["published"] = {"heldout_neurons": 15, "mae_alignment": 0.14, "mae_alignment_bulk": 0.07,
                        "units": "alignment cosθ at the ceiling, held-out neurons, Llama-3.1-8B",
                        "verdicts_correct": 11, "majority_baseline": 10}
    return out


def verdict_summary(table: pd.DataFrame, majority: str) -> dict:
    """Held-out neuron verdicts (open iff open in either sign) against always saying the training
    majority, with an exact McNemar test; and the accuracy on neurons that have a trigger at all."""
    verdicts = neuron_verdicts(table)
    triggered = (table.assign(t=table["trigger_x"].notna())
                 .groupby(["behaviour", "layer", "neuron"])["t"].any().rename("has_trigger").reset_index())
    hv = verdicts[verdicts["split"] == "heldout"].merge(triggered, on=["behaviour", "layer", "neuron"], how="left")
    score = score_verdicts(hv["predicted_verdict"], hv["verdict"], majority)
    with_trigger = hv[hv["has_trigger"].fillna(False).astype(bool)]
    t_score = score_verdicts(with_trigger["predicted_verdict"], with_trigger["verdict"], majority)
    out = {
        "n_heldout_neurons": score.n, "correct": score.correct, "accuracy": score.accuracy,
        "majority_class_from_training": majority, "majority_correct": score.majority_correct,
        "only_predictor_right": score.only_predictor_right, "only_majority_right": score.only_majority_right,
        "mcnemar_exact_p_value": score.p_value,
        "measured_open": int((hv["verdict"] == "open").sum()),
        "n_with_trigger": t_score.n, "correct_with_trigger": t_score.correct,
        "majority_correct_with_trigger": t_score.majority_correct,
        "only_predictor_right_with_trigger": t_score.only_predictor_right,
        "only_majority_right_with_trigger": t_score.only_majority_right,
        "mcnemar_exact_p_value_with_trigger": t_score.p_value,
    }
    null_for_reason(out, ("accuracy", "mcnemar_exact_p_value"), "no held-out neuron")
    return null_for_reason(out, "mcnemar_exact_p_value_with_trigger", "no held-out neuron has a trigger")


def refusal_pivots(sweeps: pd.DataFrame, table: pd.DataFrame) -> list[dict]:
    """One entry per refusal neuron that opens in either sign: the rollout-type fractions per
    horizon at its trigger dose, and its reach: ``actionable`` iff at least :data:`TRIGGER_LEVEL`
    of the prompts' rollouts are actionable at some horizon (the rule every other figure uses),
    else ``coherent_bypass``. When both signs open, the sign with the larger actionable share is
    reported."""
    out = []
    open_rows = table[(table["behaviour"] == "refusal") & (table["verdict"] == "open")]
    for (layer, neuron), rows in open_rows.groupby(["layer", "neuron"]):
        best = None
        for r in rows.itertuples():
            x = r.trigger_x
            at = sweeps[(sweeps.behaviour == "refusal") & (sweeps.layer == layer) & (sweeps.neuron == neuron)
                        & (sweeps.sign == r.sign) & np.isclose(sweeps.x.abs(), x)]
            by_h = {int(h): g["rollout_type"].value_counts(normalize=True).to_dict() for h, g in at.groupby("horizon")}
            actionable_from = next((h for h in sorted(by_h) if by_h[h].get("actionable", 0) >= TRIGGER_LEVEL), None)
            share = max((f.get("actionable", 0.0) for f in by_h.values()), default=0.0)
            entry = {"layer": int(layer), "neuron": int(neuron), "sign": int(r.sign), "trigger_x": float(x),
                     "type_fractions_by_horizon": by_h, "max_actionable_share": share,
                     "actionable_from_horizon": actionable_from,
                     "reach": "actionable" if actionable_from is not None else "coherent_bypass"}
            if best is None or share > best["max_actionable_share"]:
                best = entry
        out.append(best)
    return out


# --- sensitivity of the measured ceilings to the collapse thresholds ---------------------------

#: Factors applied together to the collapse thresholds of the judge in
#: :func:`ceiling_threshold_sensitivity`. All three are maxima (a rollout collapses at or above
#: them), so ×0.75 is stricter (more rollouts collapse, ceilings can only come down) and ×1.25
#: looser.
THRESHOLD_SCALES: tuple[float, ...] = (0.75, 1.25)
#: The thresholds of :class:`~neuronaudit.evaluation.judge.RuleThresholds` that define collapse.
COLLAPSE_THRESHOLDS: tuple[str, ...] = ("max_repetition_ratio", "max_perplexity", "max_entropy")
_KEYS = ["behaviour", "layer", "neuron", "sign"]


def scaled_thresholds(thresholds: RuleThresholds, scale: float) -> RuleThresholds:
    """``thresholds`` with the three collapse thresholds multiplied by ``scale`` (the repetition
    ratio capped at 1, where it can no longer be crossed by a ratio below 1)."""
    values = asdict(thresholds)
    for name in COLLAPSE_THRESHOLDS:
        values[name] = values[name] * scale
    values["max_repetition_ratio"] = min(values["max_repetition_ratio"], 1.0)
    return RuleThresholds(**values)


def retype_collapse(sweeps: pd.DataFrame, thresholds: RuleThresholds,
                    behaviours: Mapping[str, Mapping] | None = None,
                    prompts: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The sweep rollouts re-read with other collapse thresholds: ``collapse`` from the rule
    judge's collapse rule on the stored metrics and response, and ``flip`` as the window reads it
    (a collapsed rollout never flips).

    A rollout that stays coherent keeps its stored flip; one that now collapses loses it. One that
    was collapsed and is coherent now has no stored oracle reading, so the oracle is read again
    (:func:`flips`): refusal from the rule judge's type with the new thresholds, ``logit_pair``
    from the stored margin, any other oracle from the response (and the prompt's fields where the
    oracle needs them, e.g. the operands of ``operator``). This needs the behaviour's spec in
    ``behaviours`` (a behaviour named ``refusal`` defaults to the refusal oracle) and, for the
    prompt text and fields, its prompt table (``prompt_id``, ``text``, ``extra``) in ``prompts``;
    a rollout that cannot be re-read counts as not flipped and is marked in ``flip_not_reread``.
    The refusal oracle is re-read with the rule judge even when the study typed with a judge
    model. Adds the columns ``collapse_before`` and ``flip_before``.
    """
    judge = RuleJudge(thresholds)
    out = sweeps.copy()
    out["collapse_before"], out["flip_before"] = out["collapse"].astype(bool), out["flip"].astype(bool)
    metrics = out[["repetition_ratio", "perplexity", "entropy"]].to_dict(orient="records")
    collapse = np.array([judge.collapse_reason("" if r is None else str(r), m) is not None
                         for r, m in zip(out["response"], metrics)])
    flip = out["flip_before"].to_numpy() & ~collapse
    not_reread = np.zeros(len(out), dtype=bool)
    freed = out["collapse_before"].to_numpy() & ~collapse
    behaviours, prompts = behaviours or {}, prompts or {}
    for behaviour in pd.unique(out.loc[freed, "behaviour"]):
        idx = np.flatnonzero(freed & (out["behaviour"] == behaviour).to_numpy())
        spec = behaviours.get(behaviour) or ({"oracle": "refusal"} if behaviour == "refusal" else None)
        table = prompts.get(behaviour)
        texts = table.set_index("prompt_id")["text"].to_dict() if table is not None else {}
        fields = (dict(zip(table["prompt_id"], extras(table).to_dict(orient="records")))
                  if table is not None and "extra" in table else {})
        needs_fields = (spec is not None and spec["oracle"] not in ("refusal", *LOGIT_ORACLES)
                        and bool(oracle_for(spec).fields))
        if spec is None or (needs_fields and not fields):
            not_reread[idx] = True
            continue
        rows = out.iloc[idx]
        types = judge.classify([texts.get(p, "") for p in rows["prompt_id"]], [str(r) for r in rows["response"]],
                               [metrics[i] for i in idx])
        margins = rows["logit_margin"].to_numpy(float) if "logit_margin" in rows else None
        flip[idx] = flips(spec, [str(r) for r in rows["response"]], types,
                          [fields.get(p, {}) for p in rows["prompt_id"]], margins)
    return out.assign(collapse=collapse, flip=flip, flip_not_reread=not_reread)


def ceilings_and_verdicts(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Per (behaviour, layer, neuron, sign), as :func:`window_table` reads them: the measured
    ceiling (smallest ``|x|`` collapsing ≥50% of prompts at the behaviour's final horizon), the
    trigger at that horizon (:func:`triggers`, against the unintervened rate) and the verdict."""
    finals = sweeps.groupby("behaviour")["horizon"].max()
    baseline = baseline_rates(sweeps)
    dosed = sweeps[sweeps["kind"] != "baseline"]
    final_of = dosed["behaviour"].map(finals)
    at_final = dosed[dosed["horizon"] == final_of]
    table = crossings(at_final.assign(x=at_final["x"].abs()), "collapse", _KEYS).rename(
        columns={"collapse_x": "ceiling_x"})
    trig = pd.concat([triggers(dosed[final_of == h], baseline, int(h), _KEYS)
                      .rename(columns={f"trigger_x_{int(h)}": "trigger_x"}) for h in sorted(set(finals))],
                     ignore_index=True)
    table = table.merge(trig, on=_KEYS, how="outer")
    table["verdict"] = [verdict(t, c) for t, c in zip(table["trigger_x"], table["ceiling_x"])]
    return table


def _json_float(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def ceiling_threshold_sensitivity(sweeps: pd.DataFrame, thresholds: RuleThresholds | Mapping | None = None,
                                  behaviours: Mapping[str, Mapping] | None = None,
                                  prompts: Mapping[str, pd.DataFrame] | None = None,
                                  scales: Sequence[float] = THRESHOLD_SCALES,
                                  x_grid: Sequence[float] | None = None) -> dict:
    """How the measured ceilings, and the verdicts, move when the collapse thresholds move.

    The stored sweep rollouts (``window/sweeps.parquet``) are re-typed with the collapse
    thresholds (:data:`COLLAPSE_THRESHOLDS` of ``thresholds``, the judge's) all multiplied by each
    of ``scales`` (:func:`retype_collapse`), and ceilings, triggers and verdicts are read again
    with the window's rules (:func:`ceilings_and_verdicts`) and compared with those of the stored
    rollouts. Per scale: how many ceilings move (a ceiling that enters or leaves the dose grid
    counts), the median ``|Δ ceiling_x|`` over the moved ones (a ceiling beyond the grid counted at
    the grid edge, as ``ceiling_x_or_edge``), how many triggers move, and every (neuron, sign)
    whose verdict changes. A JSON-ready dict.

    An adaptive sweep (``x_grid`` its dose grid) was searched for the thresholds it was typed with:
    re-read with other thresholds, a ceiling or trigger is the first *rolled-out* point where it
    holds, and the full grid could put it lower wherever grid points below it were not rolled out;
    each scale counts those (``n_ceilings_with_unvisited_points_below``,
    ``n_triggers_with_unvisited_points_below``; 0 for a full sweep).
    """
    if thresholds is None:
        thresholds = RuleThresholds()
    elif not isinstance(thresholds, RuleThresholds):
        thresholds = RuleThresholds.from_dict(thresholds)
    base = ceilings_and_verdicts(sweeps)
    grid = sweep_grid(sweeps, x_grid)
    edge = float(grid[-1])
    search = str(sweeps["search"].iloc[0]) if "search" in sweeps and len(sweeps) else "full"
    out: dict = {
        "scales": [float(s) for s in scales],
        "thresholds_scaled": list(COLLAPSE_THRESHOLDS),
        "base_thresholds": {k: float(getattr(thresholds, k)) for k in COLLAPSE_THRESHOLDS},
        "rule": ("collapse thresholds (all maxima) multiplied together: below 1 stricter, above 1 looser; "
                 "ceilings, triggers and verdicts re-read at each behaviour's final horizon with the "
                 "≥50%-of-prompts rule"),
        "n_pairs": int(len(base)), "n_open_at_base": int((base["verdict"] == "open").sum()),
        "grid_max_x": edge, "search": search, "by_scale": [],
    }
    for scale in scales:
        th = scaled_thresholds(thresholds, float(scale))
        retyped = retype_collapse(sweeps, th, behaviours, prompts)
        new = ceilings_and_verdicts(retyped)
        both = base.merge(new, on=_KEYS, how="outer", suffixes=("_before", "_after"))
        cb, ca = both["ceiling_x_before"].to_numpy(float), both["ceiling_x_after"].to_numpy(float)
        moved = ~((np.isnan(cb) & np.isnan(ca)) | np.isclose(cb, ca))
        delta = np.abs(np.where(np.isnan(ca), edge, ca) - np.where(np.isnan(cb), edge, cb))[moved]
        tb, ta = both["trigger_x_before"].to_numpy(float), both["trigger_x_after"].to_numpy(float)
        t_moved = ~((np.isnan(tb) & np.isnan(ta)) | np.isclose(tb, ta))
        changed = both[both["verdict_before"] != both["verdict_after"]]
        dosed = retyped[retyped["kind"] != "baseline"]
        final = dosed[dosed["horizon"] == dosed["behaviour"].map(dosed.groupby("behaviour")["horizon"].max())]
        coverage = search_coverage(final, new, grid, _KEYS)
        out["by_scale"].append({
            "scale": float(scale), "direction": "stricter" if scale < 1 else "looser" if scale > 1 else "same",
            "thresholds": {k: float(getattr(th, k)) for k in COLLAPSE_THRESHOLDS},
            "n_rollouts_collapse_changed": int((retyped["collapse"] != retyped["collapse_before"]).sum()),
            "n_rollouts_flip_not_reread": int(retyped["flip_not_reread"].sum()),
            "n_ceilings_moved": int(moved.sum()),
            "n_ceilings_entered_grid": int((np.isnan(cb) & ~np.isnan(ca)).sum()),
            "n_ceilings_left_grid": int((~np.isnan(cb) & np.isnan(ca)).sum()),
            "median_abs_delta_ceiling_x": _json_float(float(np.median(delta))) if delta.size else None,
            "n_triggers_moved": int(t_moved.sum()),
            "n_ceilings_with_unvisited_points_below": int((coverage["ceiling_unvisited_below"] > 0).sum()),
            "n_triggers_with_unvisited_points_below": int((coverage["trigger_unvisited_below"] > 0).sum()),
            "n_open": int((both["verdict_after"] == "open").sum()),
            "n_verdicts_changed": int(len(changed)),
            "verdict_changes": [
                {"behaviour": str(r.behaviour), "layer": int(r.layer), "neuron": int(r.neuron), "sign": int(r.sign),
                 "verdict_before": r.verdict_before, "verdict_after": r.verdict_after,
                 "ceiling_x_before": _json_float(r.ceiling_x_before), "ceiling_x_after": _json_float(r.ceiling_x_after),
                 "trigger_x_before": _json_float(r.trigger_x_before), "trigger_x_after": _json_float(r.trigger_x_after)}
                for r in changed.itertuples()
            ],
        })
    return out
