"""Gradient versus forward attribution, neuron by neuron (SCIENCE.md section 2; seed 003).

The behaviour metric ``m`` is the log-probability mass on behaviour-opening tokens minus that on
default-opening tokens at the first answer position (the last prompt token):

    m = logsumexp(log p[behaviour tokens]) − logsumexp(log p[default tokens]).

Gradient scores are ``∂m/∂a_{l,i}`` at the last prompt token of each prompt ``p`` the caller
passes (the attribution stage passes the prompts the window stage sweeps), aggregated two ways:

* ``grad`` = mean over prompts of ``|∂m/∂a_p|`` (a neuron pushed up on some prompts and down on
  others scores by the size of its effects, which do not cancel);
* ``grad_signed`` = mean over prompts of the signed ``∂m/∂a_p`` (signs can cancel).

Attribution patching (AtP, arXiv 2403.00745) multiplies each prompt's gradient by a fixed
activation difference ``ā⁺ − ā⁻`` per neuron: ``atp`` = mean over prompts of
``|(ā⁺ − ā⁻)·∂m/∂a_p|`` and ``atp_signed`` = ``(ā⁺ − ā⁻)·mean ∂m/∂a_p``. The means ``ā⁺`` and
``ā⁻`` are whatever the caller passes; the attribution stage passes the screen's last-token means
over the discovery split of the behaviour's positive and negative prompt sets, while the
gradient is taken on the held-out swept prompts (the positive set for refusal, the negative set
for the mode switches): ``ā⁺ − ā⁻`` and ``∂m/∂a_p`` rest on different prompts. Gradients are taken only at the
MLP activation sites with ``torch.autograd.grad`` (no parameter gradients), batch by batch, and
only the per-neuron sums of ``∂m/∂a_p`` and ``|∂m/∂a_p|`` are kept, so memory stays bounded. A
batch that runs out of memory runs as two halves at the whole batch's width
(:func:`~neuronaudit.interventions.memory.split_on_oom`), and their rows are summed in one piece
as the whole batch's would be. A non-finite activation, metric or gradient stops the scoring,
naming its layer, neuron and prompt.

The comparison with measured control (:func:`compare`) reports, for every score, Spearman ρ of
``|score|`` with control strength, with ``n``, a permutation p-value and a paired BCa bootstrap CI
(:func:`neuronaudit.evaluation.stats.spearman_permutation_bca`); behaviours are pooled only after
ranking within each one.

The geometric explanation the law offers: a controller whose write ``v`` is nearly orthogonal to
the readout direction ``u = g ⊙ (mean W_U[behaviour] − mean W_U[default])`` (``g`` the final
norm's weight) has a near-zero first-order effect on ``m`` yet can steer it at rollout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError, NonFiniteError
from neuronaudit.evaluation.stats import spearman_permutation_bca
from neuronaudit.interventions.finite import check_finite, finite_checks
from neuronaudit.interventions.generation import padded_position_ids
from neuronaudit.interventions.hooks import NeuronHooks
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.io import null_for_reason


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
    """Gradient of ``m`` at the last prompt token of each of ``texts``, aggregated over prompts.

    Returns ``grad [n_layers, n_neurons]`` (mean over prompts of ``|∂m/∂a_p|``), ``grad_signed``
    (mean over prompts of ``∂m/∂a_p``), ``activation`` (mean ``a`` at the last prompt token) and
    ``metric`` (``m`` per prompt). Per-prompt gradients are reduced batch by batch.
    """
    device = next(model.parameters()).device
    n_layers, n = adapter.n_layers, adapter.n_neurons
    grad_sum = np.zeros((n_layers, n))
    abs_sum = np.zeros((n_layers, n))
    act_sum = np.zeros((n_layers, n))
    metrics: list[float] = []
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length,
                        add_special_tokens=add_special_tokens)["input_ids"]
    embed = model.get_input_embeddings()

    def run(batch: Sequence[int], part: tuple[int, ...], width: int) -> list[tuple]:
        """Gradient pass of the prompts ``batch`` padded to ``width`` (a half of a split batch runs at
        the whole batch's width); per prompt ``(layers, ∂m/∂a, a, m)`` at its last prompt token."""
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding="max_length", max_length=width,
                            return_tensors="pt").to(device)
        captured: dict[int, torch.Tensor] = {}
        last: dict[str, torch.Tensor] = {}

        def on_activation(layer, a, ctx):
            captured[layer] = a
            last["index"] = ctx.last_prompt

        handle = embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        try:
            with torch.enable_grad(), finite_checks(adapter), NeuronHooks(adapter, on_activation=on_activation):
                logits = model(**enc, position_ids=padded_position_ids(enc["attention_mask"]), use_cache=False).logits
                rows = torch.arange(logits.shape[0], device=device)
                m = behaviour_metric(logits[rows, last["index"]], _batch_ids(behaviour_ids, batch),
                                     _batch_ids(default_ids, batch))
                check_finite(m, "behaviour metric", dims=("row",))
                layers = sorted(captured)
                grads = torch.autograd.grad(m.sum(), [captured[l] for l in layers])
            with torch.no_grad():
                idx = last["index"]
                for layer, g in zip(layers, grads):
                    check_finite(g[rows, idx], "gradient of the behaviour metric", layer=layer)
        except NonFiniteError as err:
            err.at(prompt=f"{batch[err.row]} of the attribution prompts" if err.row is not None else None)
            raise
        finally:
            handle.remove()
        with torch.no_grad():
            g_last = [g[rows, idx] for g in grads]
            a_last = [captured[layer][rows, idx].detach() for layer in layers]
        values = m.detach().cpu().tolist()
        return [(layers, [g[r] for g in g_last], [a[r] for a in a_last], values[r]) for r in range(len(batch))]

    for start in range(0, len(texts), batch_size):
        batch = list(range(start, min(start + batch_size, len(texts))))
        width = max(len(encoded[i]) for i in batch)
        out = split_on_oom(functools.partial(run, width=width), batch, "attribution gradients")
        layers = out[0][0]
        with torch.no_grad():  # the batch's rows summed in one piece, split or not
            for j, layer in enumerate(layers):
                per_prompt = torch.stack([row[1][j] for row in out]).double()
                grad_sum[layer] += per_prompt.sum(0).cpu().numpy()
                abs_sum[layer] += per_prompt.abs().sum(0).cpu().numpy()
                act_sum[layer] += torch.stack([row[2][j] for row in out]).double().sum(0).cpu().numpy()
        metrics.extend(row[3] for row in out)
    count = max(len(metrics), 1)
    return {"grad": abs_sum / count, "grad_signed": grad_sum / count, "activation": act_sum / count,
            "metric": np.array(metrics)}


def _batch_ids(ids, rows: Sequence[int]):
    per_row = len(ids) > 0 and isinstance(ids[0], (list, tuple))
    return [ids[i] for i in rows] if per_row else ids


def attribution_patching(grad: np.ndarray, act_positive: np.ndarray, act_negative: np.ndarray) -> np.ndarray:
    """AtP estimate of moving each neuron from its negative to its positive mean: ``(ā⁺ − ā⁻)·∂m/∂a``,
    for whatever gradient ``grad`` is passed (one prompt's, or a mean over prompts)."""
    return (act_positive - act_negative) * grad


def attribution_patching_scores(grad_abs, grad_signed, act_positive, act_negative) -> tuple:
    """``(atp, atp_signed)`` from the two gradient aggregates of :func:`gradient_scores`.

    ``ā⁺ − ā⁻`` is one number per neuron, so the mean over prompts of ``|(ā⁺ − ā⁻)·∂m/∂a_p|`` is
    ``|ā⁺ − ā⁻| · mean |∂m/∂a_p|`` exactly, and the signed mean is ``(ā⁺ − ā⁻) · mean ∂m/∂a_p``.
    """
    diff = np.asarray(act_positive, float) - np.asarray(act_negative, float)
    return np.abs(diff) * np.asarray(grad_abs, float), diff * np.asarray(grad_signed, float)


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


#: Gradient scores: mean over prompts of |per-prompt attribution| and the signed mean of each.
GRADIENT_SCORES = ("grad", "grad_signed", "atp", "atp_signed")


FORWARD_SCORES = ("delta", "std_delta", "dose_response")


#: Every score compared with measured control (each as |score|).
SCORES = (*GRADIENT_SCORES, *FORWARD_SCORES)


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
    ceiling (final horizon, either sign) and whether the neuron controls (verdict open).

    The maximum is over the doses rolled out. After an adaptive dose search some grid points below
    the ceiling were not, and the figure is a lower bound of the full grid's:
    ``control_strength_exact`` is true only when every grid point below the ceiling, in both signs,
    was rolled out (the window table's ``ceiling_unvisited_below`` is 0; tables without it come
    from full sweeps)."""
    final = sweeps.groupby("behaviour")["horizon"].transform("max")  # each behaviour at its own horizon
    at = sweeps[sweeps["horizon"] == final]
    keys = ["behaviour", "layer", "neuron", "sign"]
    frac = at.groupby([*keys, "x"], as_index=False)[["flip", "collapse"]].mean()
    frac = frac.merge(window[[*keys, "ceiling_x"]], on=keys)
    coherent = frac[frac["ceiling_x"].isna() | (frac["x"].abs() < frac["ceiling_x"])]
    strength = coherent.groupby(["behaviour", "layer", "neuron"])["flip"].max().rename("control_strength")
    controls = (window.groupby(["behaviour", "layer", "neuron"])["verdict"]
                .agg(lambda v: bool((v == "open").any())).rename("controls"))
    if "ceiling_unvisited_below" in window:
        exact = (window.assign(e=window["ceiling_unvisited_below"].fillna(0) == 0)
                 .groupby(["behaviour", "layer", "neuron"])["e"].all().rename("control_strength_exact"))
    else:
        exact = controls.rename("control_strength_exact").map(lambda _: True)
    out = pd.concat([strength, controls, exact], axis=1).reset_index()
    out["control_strength"] = out["control_strength"].fillna(0.0)
    out["control_strength_exact"] = out["control_strength_exact"].fillna(True).astype(bool)
    return out


def precision_at_k(score: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    """Precision and recall of the top-k by |score| at recovering ``truth`` (k = number true)."""
    k = int(truth.sum())
    if k == 0:
        return float("nan"), float("nan"), 0
    top = np.argsort(-np.abs(score), kind="stable")[:k]
    hits = int(truth[top].sum())
    return hits / k, hits / k, k


#: What each compared score is (the comparison ranks every score by its absolute value).
SCORE_DESCRIPTIONS = {
    "grad": "mean over prompts of |dm/da| at the last prompt token",
    "grad_signed": "mean over prompts of the signed dm/da (signs can cancel); compared as |mean|",
    "atp": "mean over prompts of |(mean_pos - mean_neg) * dm/da|",
    "atp_signed": "(mean_pos - mean_neg) * mean over prompts of dm/da (signs can cancel); compared as |.|",
    "delta": "screen delta = mean_pos - mean_neg; compared as |delta|",
    "std_delta": "screen delta / pooled std; compared as |std_delta|",
    "dose_response": ("single-pass change of m under +-1 budget unit (half the difference of the signs); "
                      "compared as |.|"),
}


def within_behaviour_ranks(table: pd.DataFrame, column: str, absolute: bool = True) -> pd.Series:
    """Percentile rank (average ties, in (0, 1]) of ``column`` (its absolute value by default)
    within each behaviour; NaN stays NaN."""
    values = table[column].astype(float)
    if absolute:
        values = values.abs()
    return values.groupby(table["behaviour"]).rank(pct=True, method="average")


def _spearman_entry(x, y, n_permutations: int, n_boot: int, seed: int) -> dict:
    r = spearman_permutation_bca(x, y, n_permutations=n_permutations, n_boot=n_boot, seed=seed)
    entry = {"n": r.n, "spearman_rho": r.rho, "p_value": r.p_value, "rho_ci95": [r.ci_low, r.ci_high],
             "ci_method": r.ci_method, "ci_fallback_reason": r.ci_fallback_reason,
             "n_degenerate_resamples": r.n_degenerate_resamples, "n_boot": r.n_boot,
             "n_permutations": r.n_permutations}
    if r.ci_method == "none":  # ρ undefined: fewer than 3 pairs or a constant side
        null_for_reason(entry, ("spearman_rho", "p_value", "rho_ci95"), f"undefined: {r.ci_fallback_reason}")
    else:
        null_for_reason(entry, "rho_ci95", f"every bootstrap resample was degenerate ({r.n_degenerate_resamples} "
                                           f"of {r.n_boot} with a constant side)")
    return entry


def _varies(values: pd.Series) -> bool:
    finite = values[np.isfinite(values.to_numpy(float))]
    return finite.nunique() > 1


def compare(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0, n_permutations: int = 9999) -> dict:
    """Agreement of each score with measured control, per behaviour and pooled (``'all'``).

    Per behaviour, for every score in :data:`SCORES`: Spearman ρ of ``|score|`` with control
    strength over the neurons with both values finite (``n``), its two-sided permutation p-value
    (``n_permutations`` permutations of one side, seeded), its paired BCa bootstrap 95% CI over
    neurons (``n_boot`` resamples, seeded; ``ci_method`` says when BCa was not computable and the
    percentile interval is given instead, ``ci_fallback_reason`` why, ``n_degenerate_resamples``
    how many resamples had a constant side), and precision@k / recall@k of the top-k by |score|
    at recovering the controllers (k = their number).

    Pooled: each score's |value| and the control strength are first turned into percentile ranks
    within their behaviour, so a behaviour whose scores and controls are both larger on the whole
    cannot create a correlation by itself; the pooled ranks are then correlated as above, over the
    behaviours where both sides vary (``behaviours_pooled``). Precision@k pooled ranks neurons by
    their within-behaviour rank of |score|.
    """
    out = {}
    for name, g in [("all", table), *table.groupby("behaviour")]:
        pooled = name == "all"
        entry = {"n_neurons": int(len(g)), "n_controllers": int(g["controls"].sum())}
        if pooled:
            entry["pooling"] = "within-behaviour percentile ranks of |score| and of control strength"
        for score in SCORES:
            if pooled:
                x = within_behaviour_ranks(g, score)
                y = within_behaviour_ranks(g, "control_strength", absolute=False)
                keep = [b for b, gb in g.groupby("behaviour")
                        if _varies(gb[score].abs()) and _varies(gb["control_strength"])]
                mask = g["behaviour"].isin(keep).to_numpy()
                stat = _spearman_entry(x.to_numpy(float)[mask], y.to_numpy(float)[mask], n_permutations, n_boot,
                                       seed)
                stat["behaviours_pooled"] = sorted(str(b) for b in keep)
                ranking = x.to_numpy(float)
            else:
                ranking = g[score].to_numpy(float)
                stat = _spearman_entry(np.abs(ranking), g["control_strength"].to_numpy(float), n_permutations,
                                       n_boot, seed)
            prec, rec, k = precision_at_k(ranking, g["controls"].to_numpy(bool))
            entry[score] = null_for_reason({**stat, "precision_at_k": prec, "recall_at_k": rec, "k": k},
                                           ("precision_at_k", "recall_at_k"), "no measured controller (k = 0)")
        cos = np.abs(g["readout_cos"].to_numpy(float))
        ctrl = g["controls"].to_numpy(bool)
        entry["abs_readout_cos"] = {
            "controllers_median": float(np.median(cos[ctrl])) if ctrl.any() else None,
            "others_median": float(np.median(cos[~ctrl])) if (~ctrl).any() else None,
        }
        out[name] = entry
    return out


def missed_by_gradient(table: pd.DataFrame) -> list[dict]:
    """Controllers in the bottom half of ``grad`` (mean over prompts of |∂m/∂a|) that are in the
    top half of |std_delta|, per behaviour."""
    out = []
    for b, g in table.groupby("behaviour"):
        grad_rank = g["grad"].abs().rank(ascending=False)
        fwd_rank = g["std_delta"].abs().rank(ascending=False)
        half = len(g) / 2
        for i in g.index[g["controls"] & (grad_rank > half) & (fwd_rank <= half)]:
            r = g.loc[i]
            row = {"behaviour": b, "layer": int(r.layer), "neuron": int(r.neuron), "grad": float(r.grad)}
            if "grad_signed" in g:
                row["grad_signed"] = float(r.grad_signed)
            row.update({"std_delta": float(r.std_delta), "readout_cos": float(r.readout_cos)})
            out.append(row)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _rho_text(e: Mapping) -> str:
    """``ρ = …, 95% CI …–… (BCa), p = …, n = …`` for one comparison entry."""
    lo, hi = (e.get("rho_ci95") or [math.nan, math.nan])[:2]
    ci = (f"95% CI {lo:.2f}–{hi:.2f} ({e.get('ci_method')})" if _finite(lo) and _finite(hi)
          else "no CI")
    p = e.get("p_value", math.nan)
    return f"{e['spearman_rho']:.2f} ({ci}, permutation p = {p:.2g}, n = {e.get('n')})"


def statement(comparison: dict) -> str:
    """One sentence on the anti-prediction, from the pooled ``grad`` (mean |∂m/∂a| over prompts)."""
    e = comparison.get("all", {})
    g, f, s = e.get("grad", {}), e.get("std_delta", {}), e.get("grad_signed", {})
    rg = g.get("spearman_rho", math.nan)
    if not _finite(rg):
        return "Not measurable here: too few neurons with variation in measured control."
    lo, hi = (g.get("rho_ci95") or [math.nan, math.nan])[:2]
    if not (_finite(lo) and _finite(hi)):
        verdict = "neither reproduces nor refutes it: the CI of ρ for |gradient| cannot be computed"
    elif hi < 0:
        verdict = "reproduces the anti-prediction (ρ of |gradient| with control is negative, CI below 0)"
    elif lo > 0:
        verdict = "does not reproduce it: |gradient| predicts control positively (CI above 0)"
    else:
        verdict = "neither reproduces nor refutes it: the CI of ρ for |gradient| includes 0"
    parts = [f"This model {verdict}; ρ(|∂m/∂a|, control) = {_rho_text(g)}, with |∂m/∂a| averaged over prompts"]
    if _finite(s.get("spearman_rho", math.nan)):
        parts.append(f"ρ(|mean signed ∂m/∂a|, control) = {_rho_text(s)}")
    if _finite(f.get("spearman_rho", math.nan)):
        parts.append(f"ρ(|standardised δ|, control) = {_rho_text(f)}")
    return ("; ".join(parts) + f"; pooled over behaviours after ranking within each, over {e['n_neurons']} "
            f"neurons of which {e['n_controllers']} control.")
