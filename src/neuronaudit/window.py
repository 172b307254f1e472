"""The control-window law (SCIENCE.md section 1; "Leverage Is Not Reach", seed 003).

A dose ``d`` on neuron ``(l, i)`` adds ``d·v`` to the residual ``r`` after layer ``l``. In units
of the coherence budget ``B = ||r_l|| / ||v||`` the normalised dose is ``x = d / B`` and the
alignment between the steered residual and the write follows the saturation curve

    cosθ(x) = (c0 + x) / sqrt(1 + 2·x·c0 + x²),     c0 = cos(r, v) unsteered,

exactly at the write layer (it is the geometry of ``r + d·v``), and only approximately at the
readout, where depth and normalisation intervene. Coherent control exists iff the behaviour
trigger (smallest ``|x|`` flipping an oracle on ≥50% of prompts at horizon τ) lies below the
collapse ceiling (smallest ``|x|`` at which rollouts stop being coherent on ≥50% of prompts).

This module holds the pure parts: the curve and its inverse, ceilings and triggers from sweep
tables, the two ceiling predictors fitted on training neurons only, verdicts with a binomial
test against the majority class, bootstrap intervals over neurons, and the failure-mode rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

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


def bootstrap_ci(values: Sequence[float], statistic=np.mean, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the values (``nan`` if fewer than 2)."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    res = stats.bootstrap((values,), statistic, n_resamples=n_boot, confidence_level=level,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


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
    p = stats.binomtest(correct, n, p=min(rate, 1 - 1e-12), alternative="greater").pvalue
    return VerdictScore(correct, n, majority_correct, majority_class, float(p))


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
    import torch

    from neuronaudit.interventions import NeuronHooks

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
