"""Gradient versus forward attribution, neuron by neuron (SCIENCE.md section 2; seed 003).

The behaviour metric ``m`` is the log-probability mass on behaviour-opening tokens minus that on
default-opening tokens at the first answer position (the last prompt token):

    m = logsumexp(log p[behaviour tokens]) − logsumexp(log p[default tokens]).

Gradient scores are ``∂m/∂a_{l,i}`` at the last prompt token, averaged over prompts, and
attribution patching (AtP, arXiv 2403.00745) ``(ā⁺ − ā⁻)·∂m/∂a`` evaluated on the negative
(default-behaviour) prompts. Gradients are taken only at the MLP activation sites with
``torch.autograd.grad`` (no parameter gradients), batch by batch, so memory stays bounded.

The geometric explanation the law offers: a controller whose write ``v`` is nearly orthogonal to
the readout direction ``u = g ⊙ (mean W_U[behaviour] − mean W_U[default])`` (``g`` the final
norm's weight) has a near-zero first-order effect on ``m`` yet can steer it at rollout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import spearman_ci
from neuronaudit.interventions.hooks import NeuronHooks


def opening_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """First token id of each opening word, as it would start an answer (no leading space) and
    after a space; de-duplicated. One-line error if a word yields no token."""
    ids: list[int] = []
    for word in words:
        for variant in (word, " " + word):
            toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if not toks:
                raise NeuronAuditError(f"opening word {word!r} has no tokens in this tokenizer")
            if toks[0] not in ids:
                ids.append(toks[0])
    return ids


def _token_mask(ids, batch: int, vocab: int, device) -> torch.Tensor:
    """``[batch, vocab]`` bool mask from one id list (shared) or one list per row."""
    mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    per_row = len(ids) > 0 and isinstance(ids[0], (list, tuple))
    for r in range(batch):
        mask[r, list(ids[r] if per_row else ids)] = True
    return mask


def behaviour_metric(logits: torch.Tensor, behaviour_ids, default_ids) -> torch.Tensor:
    """``m`` for next-token ``logits [batch, vocab]`` -> ``[batch]``; the id sets are shared
    lists or one list per row (e.g. each prompt's product vs sum tokens)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    b, v = logp.shape
    neg = torch.finfo(logp.dtype).min
    beh = torch.logsumexp(logp.masked_fill(~_token_mask(behaviour_ids, b, v, logp.device), neg), dim=-1)
    dflt = torch.logsumexp(logp.masked_fill(~_token_mask(default_ids, b, v, logp.device), neg), dim=-1)
    return beh - dflt


def gradient_scores(
    model, tokenizer, adapter, texts: Sequence[str], behaviour_ids: Sequence[int],
    default_ids: Sequence[int], batch_size: int = 8, max_length: int = 256,
    add_special_tokens: bool = True,
) -> dict[str, np.ndarray]:
    """Mean over prompts of ``∂m/∂a`` and of ``a`` at the last prompt token, and mean ``m``.

    Returns ``grad [n_layers, n_neurons]``, ``activation [n_layers, n_neurons]``, ``metric``
    (per prompt).
    """
    device = next(model.parameters()).device
    n_layers, n = adapter.n_layers, adapter.n_neurons
    grad_sum = np.zeros((n_layers, n))
    act_sum = np.zeros((n_layers, n))
    metrics: list[float] = []
    tokenizer.padding_side = "left"
    embed = model.get_input_embeddings()
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length,
                        add_special_tokens=add_special_tokens).to(device)
        captured: dict[int, torch.Tensor] = {}
        last: dict[str, torch.Tensor] = {}

        def on_activation(layer, a, ctx, captured=captured, last=last):
            captured[layer] = a
            last["index"] = ctx.last_prompt

        handle = embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        try:
            with torch.enable_grad(), NeuronHooks(adapter, on_activation=on_activation):
                logits = model(**enc, use_cache=False).logits
                rows = torch.arange(logits.shape[0], device=device)
                m = behaviour_metric(logits[rows, last["index"]], _batch_ids(behaviour_ids, start, len(rows)),
                                     _batch_ids(default_ids, start, len(rows)))
                layers = sorted(captured)
                grads = torch.autograd.grad(m.sum(), [captured[l] for l in layers])
        finally:
            handle.remove()
        with torch.no_grad():
            idx = last["index"]
            for layer, g in zip(layers, grads):
                grad_sum[layer] += g[rows, idx].double().sum(0).cpu().numpy()
                act_sum[layer] += captured[layer][rows, idx].double().sum(0).cpu().numpy()
        metrics.extend(m.detach().cpu().tolist())
    count = max(len(metrics), 1)
    return {"grad": grad_sum / count, "activation": act_sum / count, "metric": np.array(metrics)}


def _batch_ids(ids, start: int, n: int):
    per_row = len(ids) > 0 and isinstance(ids[0], (list, tuple))
    return ids[start : start + n] if per_row else ids


def attribution_patching(grad_negative: np.ndarray, act_positive: np.ndarray, act_negative: np.ndarray) -> np.ndarray:
    """AtP estimate of moving each neuron from its negative to its positive mean: ``(ā⁺ − ā⁻)·∂m/∂a``."""
    return (act_positive - act_negative) * grad_negative


def readout_direction(adapter, behaviour_ids: Sequence[int], default_ids: Sequence[int]) -> torch.Tensor:
    """``u = g ⊙ (mean W_U[behaviour] − mean W_U[default])`` ``[d_model]``; ``g`` the final norm's
    weight (1 where the norm has none)."""
    W = adapter.unembed.detach().float()
    flat = lambda ids: sorted({i for x in ids for i in (x if isinstance(x, (list, tuple)) else [x])})  # noqa: E731
    u = W[flat(behaviour_ids)].mean(0) - W[flat(default_ids)].mean(0)
    weight = getattr(adapter.final_norm, "weight", None)
    if weight is not None:
        w = weight.detach().float()
        # Gemma-style norms scale by (1 + weight)
        if adapter.family.startswith("gemma"):
            w = 1.0 + w
        u = u * w
    return u


def readout_alignment(adapter, behaviour_ids: Sequence[int], default_ids: Sequence[int]) -> np.ndarray:
    """``cos(v_{l,i}, u_readout)`` for every neuron ``[n_layers, n_neurons]``."""
    u = readout_direction(adapter, behaviour_ids, default_ids)
    out = np.zeros((adapter.n_layers, adapter.n_neurons))
    for layer in range(adapter.n_layers):
        w = adapter.write_matrix(layer).detach().float()
        cos = (u @ w) / (u.norm() * w.norm(dim=0)).clamp(min=1e-30)
        out[layer] = cos.cpu().numpy()
    return out


SCORES = ("grad", "atp", "delta", "std_delta", "dose_response")


GRADIENT_SCORES = ("grad", "atp")


FORWARD_SCORES = ("delta", "std_delta", "dose_response")


def metric_token_ids(tokenizer, spec: Mapping, extras: pd.DataFrame) -> tuple[list, list]:
    """Behaviour and default opening tokens: from config, or per prompt for the operator switch
    (first token of the product vs of the sum)."""
    if spec["oracle"] == "operator":
        first = lambda n: tokenizer(str(int(n)), add_special_tokens=False)["input_ids"][:1]  # noqa: E731
        return [first(p) for p in extras["product"]], [first(s) for s in extras["sum"]]
    return (opening_token_ids(tokenizer, spec.get("behaviour_tokens") or []),
            opening_token_ids(tokenizer, spec.get("default_tokens") or []))


def control_strength(sweeps: pd.DataFrame, window: pd.DataFrame) -> pd.DataFrame:
    """Per (behaviour, layer, neuron): the largest flip fraction over doses below the measured
    ceiling (final horizon, either sign) and whether the neuron controls (verdict open)."""
    final = sweeps["horizon"].max()
    at = sweeps[sweeps["horizon"] == final]
    keys = ["behaviour", "layer", "neuron", "sign"]
    frac = at.groupby([*keys, "x"], as_index=False)[["flip", "collapse"]].mean()
    frac = frac.merge(window[[*keys, "ceiling_x"]], on=keys)
    coherent = frac[frac["ceiling_x"].isna() | (frac["x"].abs() < frac["ceiling_x"])]
    strength = coherent.groupby(["behaviour", "layer", "neuron"])["flip"].max().rename("control_strength")
    controls = (window.groupby(["behaviour", "layer", "neuron"])["verdict"]
                .agg(lambda v: bool((v == "open").any())).rename("controls"))
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
            rho, (lo, hi) = spearman_ci(x, y, n_boot=n_boot, seed=seed)
            prec, rec, k = precision_at_k(g[score].to_numpy(float), g["controls"].to_numpy(bool))
            entry[score] = {"spearman_rho": rho, "rho_ci95": [lo, hi], "precision_at_k": prec, "recall_at_k": rec,
                            "k": k}
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
