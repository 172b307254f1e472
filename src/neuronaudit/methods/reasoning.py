"""Reasoning-critical neurons (SCIENCE.md section 6; seed 001, AdaRAS, arXiv 2601.19847).

The model solves problems with exact answers (:mod:`neuronaudit.methods.reasoning_tasks`); each
solution is graded. A neuron's activation is averaged over the positions that predict the
solution (:data:`SCORE_POSITIONS`: the last question token, which predicts the first answer
token, and every solution token, read by a teacher-forced forward over question + solution,
:func:`mean_activations`). Over solutions,

    g = mean over correct solutions,   b = mean over incorrect ones,
    w = g − b,                         rel = |w| / (|g| + |b| + ε),

and neurons rank by the key ``(rel, |w|)`` (:func:`critical_scores`, :func:`rank_neurons`):
lexicographic as the spec writes it, or with ``rel`` binned to ``rel_resolution`` so that |w|
orders neurons of about the same relative effect (a choice, off by default). The top-n scores
get percentile bootstrap CIs with *problems* as the resampling unit: all solutions of a drawn
problem enter together (:func:`bootstrap_top_scores`), with the share of resamples that keep
each neuron in the top n.

Causal test (:func:`ablation_edits`, :func:`random_same_layer`, :func:`outcomes_table`):
zero- or mean-ablate the top n and random same-layer sets of the same size, and compare each
condition's accuracy (Wilson CI) with the unedited run on the same problems: the accuracy
difference with a paired bootstrap CI over problems and an exact McNemar test on the
discordant problems.

Steering at the positions that predict the solution (:func:`steering_edits`): additive
``a ← a + s·w`` (a dose) or the template blend ``a ← (1 − s)·a + s·g`` (the ``blend`` edit of
:mod:`neuronaudit.interventions.hooks`). Random-neuron controls take the same strength
(:func:`random_steering_edits`). ``s`` and n are chosen on validation problems only
(:func:`choose_setting`).

Adaptive gate (early warning, :class:`FailureProbe`): an L2-regularised logistic regression on
the critical neurons' activations at the question's last token predicts failure before any
token is generated; fitted on discovery problems (scipy's L-BFGS), its AUC is the Mann–Whitney
statistic with a bootstrap CI over problems (:func:`auc_with_ci`). Gated steering edits only the
rows the probe flags (:func:`gated_row_edits`).

Transfer (:func:`map_neurons`): neurons of two models (any families, widths and depths) are
matched by the Pearson correlation of their per-prompt mean activations on shared prompts,
only between layers of matching relative depth (``|l/(L−1) − l'/(L'−1)| ≤ window``), by the
Hungarian assignment (one target per source, scipy's ``linear_sum_assignment`` on −|r|) or by
the top correlation; :func:`random_mapping` is the baseline of the same size and depth rule,
and :func:`carry_steering` moves ``w`` and ``g`` onto the target neurons in units of each
neuron's own spread.

A first reading on the embedded model (SmolLM2-135M-Instruct, 24 discovery problems at the
default difficulties, greedy, 8 of 24 correct, every layer scored, ε = 1e-6): all ten top-ranked
neurons had rel = 1.000, i.e. g and b of opposite signs, so among them the key is decided by
``|g| + |b|`` (= |w|); nine of the ten sat in the last layer; the bootstrap over problems kept each
in the top ten in 17–75% of resamples and most |w| intervals crossed 0. Wall time on two shared
CPU cores: generation 232 s, teacher-forced activations 21 s, bootstrap (1000 resamples, with
top-share) 11 s. ``rel_resolution`` and ``eps`` are the knobs that make rel discriminate.

Everything here is a pure function of arrays except :func:`solve`, :func:`sample_solutions` and
:func:`mean_activations`, which run the model in batches through the intervention engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import optimize, stats

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import (
    MIN_RESAMPLES,
    bootstrap_ci,
    count_matrix,
    mcnemar_exact,
    paired_bootstrap_ci,
    wilson_interval,
)
from neuronaudit.interventions.capture import length_sorted_batches
from neuronaudit.interventions.generation import generate_tokens
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks, StopForward
from neuronaudit.interventions.memory import part_seed, split_on_oom
from neuronaudit.io import null_for_reason

Neuron = tuple[int, int]  # (layer, neuron)

#: Positions whose forward predicts a solution token: scores are averaged and steering applied here.
SCORE_POSITIONS: tuple[str, ...] = ("last_prompt", "generated")
#: Positions of an ablation: the whole question and solution.
ABLATION_POSITIONS: tuple[str, ...] = ("prompt", "generated")
STEERING_MODES: tuple[str, ...] = ("add", "blend")


# --------------------------------------------------------------------------------------------
# running the model: solutions and teacher-forced activations
# --------------------------------------------------------------------------------------------


def solve(model, adapter, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
          eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
          edits: Sequence[NeuronEdit] = (), row_edits: Sequence[Sequence[NeuronEdit]] | None = None,
          batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
          seed: int = 0) -> list[list[int]]:
    """Generated token ids (EOS excluded) for every prompt, in prompt order.

    ``edits`` apply to every row; ``row_edits[k]`` (one tuple per prompt, possibly empty) to
    prompt ``k`` alone (a gate). Prompts run in batches of similar length; a sampled batch draws
    from the seed :func:`~neuronaudit.interventions.generation.batch_seed` ``(seed, batch)``. A batch
    that runs out of memory runs as two halves at the whole batch's width
    (:func:`~neuronaudit.interventions.memory.split_on_oom`; a sampled half from its own seed).
    """
    if row_edits is not None and len(row_edits) != len(prompt_ids):
        raise NeuronAuditError(f"{len(row_edits)} rows of edits for {len(prompt_ids)} prompts")
    if batch_size < 1:
        raise NeuronAuditError(f"batch_size {batch_size!r} must be at least 1")
    out: list[list[int]] = [[] for _ in prompt_ids]
    for b, batch in enumerate(length_sorted_batches([len(p) for p in prompt_ids], batch_size)):
        width = max(len(prompt_ids[k]) for k in batch)

        def run(part_rows, part, b=b, width=width):
            # a half of a split batch keeps the whole batch's width; a sampled half draws from its own seed
            rows = [tuple(edits) + tuple(row_edits[k] if row_edits is not None else ()) for k in part_rows]
            plan = InterventionPlan.per_row(rows) if any(rows) else None
            tokens, _, _ = generate_tokens(
                model, [prompt_ids[k] for k in part_rows], max_new_tokens, adapter=adapter, plan=plan,
                eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, do_sample=do_sample,
                temperature=temperature, top_p=top_p, seed=part_seed(seed, b, part) if do_sample else None,
                width=width,
            )
            return tokens

        for k, t in zip(batch, split_on_oom(run, batch, "reasoning solutions")):
            out[k] = list(t)
    return out


def sample_solutions(model, adapter, prompt_ids: Sequence[Sequence[int]], n_samples: int, max_new_tokens: int,
                     *, temperature: float = 0.0, **kw) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """``n_samples`` solutions per prompt: greedy when ``temperature`` is 0 (then one per prompt),
    sampled otherwise. Returns ``(problem_index [n_solutions], sample [n_solutions], tokens)``."""
    if n_samples < 1:
        raise NeuronAuditError(f"n_samples {n_samples!r} must be at least 1")
    n_samples = 1 if temperature == 0 else n_samples
    index = np.tile(np.arange(len(prompt_ids)), n_samples)
    sample = np.repeat(np.arange(n_samples), len(prompt_ids))
    tokens = solve(model, adapter, [prompt_ids[k] for k in index], max_new_tokens, do_sample=temperature > 0,
                   temperature=temperature if temperature > 0 else 1.0, **kw)
    return index, sample, tokens


def mean_activations(model, adapter, prompt_ids: Sequence[Sequence[int]],
                     continuation_ids: Sequence[Sequence[int]] | None = None,
                     positions: Sequence[str] = SCORE_POSITIONS, layers: Sequence[int] | None = None,
                     batch_size: int = 16, pad_token_id: int = 0) -> np.ndarray:
    """Mean MLP activation of every neuron over ``positions`` of each row, ``[n_rows, n_layers,
    n_neurons]`` (float32; NaN for a row without such positions).

    Row ``k`` is the teacher-forced sequence ``prompt_ids[k] + continuation_ids[k]``: ``prompt``
    and ``last_prompt`` are positions of the prompt, ``generated`` those of the continuation (a
    generated solution). Rows are right-padded and batched by length; the forward stops after the
    highest layer read. A batch that runs out of memory runs as two halves at the whole batch's width.
    """
    layers = adapter.check_layers(range(adapter.n_layers) if layers is None else layers)
    conts = continuation_ids if continuation_ids is not None else [[] for _ in prompt_ids]
    if len(conts) != len(prompt_ids):
        raise NeuronAuditError(f"{len(conts)} continuations for {len(prompt_ids)} prompts")
    if any(len(p) == 0 for p in prompt_ids):
        raise NeuronAuditError("every prompt needs at least one token")
    column = {layer: c for c, layer in enumerate(layers)}
    out = np.full((len(prompt_ids), len(layers), adapter.n_neurons), np.nan, dtype=np.float32)
    device = next(model.parameters()).device
    sequences = [list(p) + list(c) for p, c in zip(prompt_ids, conts)]
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        width = max(len(sequences[k]) for k in batch)

        def run(part_rows, part, width=width):
            """Mean activations of the rows ``part_rows``, right-padded to the batch's ``width``."""
            ids = torch.full((len(part_rows), width), int(pad_token_id), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, k in enumerate(part_rows):
                ids[r, : len(sequences[k])] = torch.tensor(sequences[k])
                mask[r, : len(sequences[k])] = 1
            prompt_length = torch.tensor([len(prompt_ids[k]) for k in part_rows])
            got = np.full((len(part_rows), len(layers), adapter.n_neurons), np.nan, dtype=np.float32)

            def on_activation(layer, a, ctx):
                where = torch.zeros_like(ctx.valid)
                for kind in positions:
                    where |= ctx.mask(kind)
                # selected, not multiplied by a 0/1 mask: a NaN at an unselected position stays out
                total = torch.where(where[..., None], a.float(), 0.0).sum(1)
                count = where.sum(1, keepdim=True).float()
                mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
                got[:, column[layer]] = mean.cpu().numpy()

            try:
                with torch.inference_mode(), NeuronHooks(adapter, on_activation=on_activation, layers=layers,
                                                         stop_after_layer=max(layers), prompt_length=prompt_length):
                    adapter.base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except StopForward:
                pass
            return list(got)

        out[np.asarray(batch)] = np.stack(split_on_oom(run, batch, "reasoning activations"))
    return out


# --------------------------------------------------------------------------------------------
# critical-neuron scores
# --------------------------------------------------------------------------------------------


@dataclass
class CriticalScores:
    """``g``, ``b``, ``w = g − b`` and ``rel`` of every neuron, each ``[n_layers, n_neurons]``
    (rows are ``layers``), from ``n_correct`` and ``n_incorrect`` solutions."""

    layers: list[int]
    good: np.ndarray
    bad: np.ndarray
    w: np.ndarray
    rel: np.ndarray
    n_correct: int
    n_incorrect: int
    eps: float
    n_dropped: int = 0  # solutions without a finite activation row (no scored position)

    def row(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise NeuronAuditError(f"layer {layer} was not scored; scored layers: {self.layers}") from None

    def at(self, neuron: Neuron) -> dict:
        r, i = self.row(neuron[0]), int(neuron[1])
        return {"g": float(self.good[r, i]), "b": float(self.bad[r, i]), "w": float(self.w[r, i]),
                "rel": float(self.rel[r, i])}


def relative_difference(good: np.ndarray, bad: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(w, rel)``: ``w = g − b`` and ``rel = |w| / (|g| + |b| + ε)``."""
    w = good - bad
    return w, np.abs(w) / (np.abs(good) + np.abs(bad) + eps)


def critical_scores(activations: np.ndarray, correct: Sequence[bool], eps: float = 1e-6,
                    layers: Sequence[int] | None = None) -> CriticalScores:
    """Scores from per-solution activations ``[n_solutions, n_layers, n_neurons]`` and the grades
    ``correct [n_solutions]``; solutions whose row is not finite are left out (counted)."""
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, None, :]
    correct = np.asarray(correct, dtype=bool)
    if a.shape[0] != correct.shape[0]:
        raise NeuronAuditError(f"{a.shape[0]} activation rows for {correct.shape[0]} grades")
    if eps < 0:
        raise NeuronAuditError(f"eps {eps!r} must be non-negative")
    finite = np.isfinite(a).all(axis=(1, 2))
    good_rows, bad_rows = finite & correct, finite & ~correct
    if not good_rows.any() or not bad_rows.any():
        raise NeuronAuditError(
            f"critical scores need correct and incorrect solutions; got {int(good_rows.sum())} correct and "
            f"{int(bad_rows.sum())} incorrect"
        )
    good, bad = a[good_rows].mean(axis=0), a[bad_rows].mean(axis=0)
    w, rel = relative_difference(good, bad, eps)
    return CriticalScores(list(range(a.shape[1])) if layers is None else [int(x) for x in layers], good, bad, w,
                          rel, int(good_rows.sum()), int(bad_rows.sum()), float(eps), int((~finite).sum()))


def rank_key(w: np.ndarray, rel: np.ndarray, rel_resolution: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``(primary, secondary)`` keys of the ranking, larger first: ``rel`` (binned to
    ``rel_resolution`` when given) then ``|w|``; non-finite scores rank last."""
    rel = np.where(np.isfinite(rel), rel, -np.inf)
    if rel_resolution is not None:
        if rel_resolution <= 0:
            raise NeuronAuditError(f"rel_resolution {rel_resolution!r} must be positive")
        rel = np.floor(rel / rel_resolution + 1e-9)
    absw = np.abs(w)
    return rel, np.where(np.isfinite(absw), absw, -np.inf)


def rank_neurons(scores: CriticalScores, n: int | None = None, rel_resolution: float | None = None) -> list[Neuron]:
    """The top ``n`` neurons (all when ``None``) by ``(rel, |w|)``, best first; ties by layer,
    then neuron."""
    primary, secondary = rank_key(scores.w, scores.rel, rel_resolution)
    order = np.lexsort((np.arange(primary.size), -secondary.ravel(), -primary.ravel()))
    width = scores.w.shape[1]
    order = order[: n if n is not None else order.size]
    return [(scores.layers[int(k // width)], int(k % width)) for k in order]


def scores_table(scores: CriticalScores, neurons: Sequence[Neuron]) -> pd.DataFrame:
    """One row per neuron, in the given order: ``rank``, ``layer``, ``neuron``, ``g``, ``b``, ``w``,
    ``rel``."""
    return pd.DataFrame([{"rank": r + 1, "layer": int(n[0]), "neuron": int(n[1]), **scores.at(n)}
                         for r, n in enumerate(neurons)])


def bootstrap_top_scores(activations: np.ndarray, correct: Sequence[bool], problem_index: Sequence[int],
                         neurons: Sequence[Neuron], layers: Sequence[int] | None = None, eps: float = 1e-6,
                         n_boot: int = MIN_RESAMPLES, seed: int = 0, level: float = 0.95,
                         rel_resolution: float | None = None, stability: bool = True,
                         chunk_elements: int = 1 << 22) -> pd.DataFrame:
    """Percentile CIs of ``g``, ``b``, ``w`` and ``rel`` of ``neurons`` with *problems* resampled
    (every solution of a drawn problem counts, as often as the problem is drawn).

    ``activations [n_solutions, n_layers, n_neurons]``, ``correct`` and ``problem_index`` are per
    solution. Resamples without a correct or without an incorrect solution define no score and
    are dropped (``n_defined``). With ``stability``, ``top_share`` is the share of defined
    resamples in which the neuron is among the resample's own top ``len(neurons)``.
    """
    if n_boot < MIN_RESAMPLES:
        raise NeuronAuditError(f"n_boot {n_boot!r} is below the {MIN_RESAMPLES} resamples the study requires")
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, None, :]
    layers = list(range(a.shape[1])) if layers is None else [int(x) for x in layers]
    correct = np.asarray(correct, dtype=bool)
    finite = np.isfinite(a).all(axis=(1, 2))
    a, correct = a[finite], correct[finite]
    problems, inverse = np.unique(np.asarray(problem_index)[finite], return_inverse=True)
    n_problems, width = len(problems), a.shape[2]
    flat = a.reshape(a.shape[0], -1)
    onehot = np.zeros((n_problems, flat.shape[0]))
    onehot[inverse, np.arange(flat.shape[0])] = 1.0
    sum_good, sum_bad = onehot @ (flat * correct[:, None]), onehot @ (flat * ~correct[:, None])
    n_good, n_bad = onehot @ correct.astype(float), onehot @ (~correct).astype(float)
    rng = np.random.default_rng(seed)
    counts = count_matrix(rng.integers(0, n_problems, size=(n_boot, n_problems)), n_problems)  # [n_boot, P]
    cg, cb = counts @ n_good, counts @ n_bad
    defined = (cg > 0) & (cb > 0)
    cols = np.array([layers.index(int(layer)) * width + int(i) for layer, i in neurons], dtype=int)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = (counts @ sum_good[:, cols]) / cg[:, None]
        b = (counts @ sum_bad[:, cols]) / cb[:, None]
    g, b = g[defined], b[defined]
    w, rel = relative_difference(g, b, eps)
    alpha = 100 * (1 - level) / 2
    rows = []
    top_share = np.full(len(cols), np.nan)
    if stability and defined.any():
        hits = np.zeros(len(cols))
        target = set(cols.tolist())
        step = max(1, chunk_elements // max(1, flat.shape[1]))
        boot_rows = np.flatnonzero(defined)
        for start in range(0, len(boot_rows), step):
            chunk = boot_rows[start: start + step]
            with np.errstate(invalid="ignore", divide="ignore"):
                gg = counts[chunk] @ sum_good / cg[chunk, None]
                bb = counts[chunk] @ sum_bad / cb[chunk, None]
            ww, rr = relative_difference(gg, bb, eps)
            primary, secondary = rank_key(ww, rr, rel_resolution)
            for r in range(len(chunk)):
                top = np.lexsort((np.arange(primary.shape[1]), -secondary[r], -primary[r]))[: len(cols)]
                chosen = target.intersection(top.tolist())
                hits += np.isin(cols, list(chosen))
        top_share = hits / len(boot_rows)
    point = critical_scores(a, correct, eps, layers)
    for k, neuron in enumerate(neurons):
        row = {"rank": k + 1, "layer": int(neuron[0]), "neuron": int(neuron[1]), **point.at(neuron)}
        for name, dist in (("g", g[:, k]), ("b", b[:, k]), ("w", w[:, k]), ("rel", rel[:, k])):
            lo, hi = (np.percentile(dist, [alpha, 100 - alpha]) if dist.size else (np.nan, np.nan))
            row[f"{name}_low"], row[f"{name}_high"] = float(lo), float(hi)
        row["top_share"] = float(top_share[k])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["n_problems"], table["n_boot"], table["n_defined"] = n_problems, n_boot, int(defined.sum())
    table["seed"] = seed
    return table


# --------------------------------------------------------------------------------------------
# causal test and steering edits
# --------------------------------------------------------------------------------------------


def ablation_edits(neurons: Sequence[Neuron], mode: str = "zero", means: Mapping[Neuron, float] | None = None,
                   positions: Sequence[str] = ABLATION_POSITIONS) -> list[NeuronEdit]:
    """Zero-ablation (``a ← 0``) or mean-ablation (``a ← mean``, ``means[neuron]``) of ``neurons``."""
    if mode == "zero":
        return [NeuronEdit.ablate(int(layer), int(i), tuple(positions)) for layer, i in neurons]
    if mode == "mean":
        if means is None:
            raise NeuronAuditError("mean-ablation needs each neuron's mean activation")
        return [NeuronEdit.mean_ablate(int(layer), int(i), float(means[(layer, i)]), tuple(positions))
                for layer, i in neurons]
    raise NeuronAuditError(f"ablation mode {mode!r} must be 'zero' or 'mean'")


def random_same_layer(neurons: Sequence[Neuron], n_neurons: int, n_sets: int, seed: int,
                      exclude: Sequence[Neuron] = ()) -> list[list[Neuron]]:
    """``n_sets`` random sets shaped like ``neurons``: for each, a distinct other neuron of the same
    layer (none of ``neurons`` nor ``exclude``)."""
    rng = np.random.default_rng(seed)
    taken = {tuple(map(int, n)) for n in (*neurons, *exclude)}
    sets = []
    for _ in range(n_sets):
        chosen: list[Neuron] = []
        for layer, _i in neurons:
            free = [i for i in range(n_neurons) if (layer, i) not in taken and (layer, i) not in chosen]
            if not free:
                raise NeuronAuditError(f"layer {layer} has no neuron left for a random set of size {len(neurons)}")
            chosen.append((int(layer), int(rng.choice(free))))
        sets.append(chosen)
    return sets


def steering_edits(neurons: Sequence[Neuron], scores: CriticalScores, strength: float, mode: str = "add",
                   positions: Sequence[str] = SCORE_POSITIONS) -> list[NeuronEdit]:
    """``add``: ``a ← a + s·w``; ``blend``: ``a ← (1 − s)·a + s·g`` on each neuron."""
    if mode not in STEERING_MODES:
        raise NeuronAuditError(f"steering mode {mode!r} must be one of {STEERING_MODES}")
    out = []
    for neuron in neurons:
        sc = scores.at(neuron)
        layer, i = int(neuron[0]), int(neuron[1])
        if mode == "add":
            out.append(NeuronEdit.dose(layer, i, strength * sc["w"], tuple(positions)))
        else:
            out.append(NeuronEdit.blend(layer, i, sc["g"], strength, tuple(positions)))
    return out


def random_steering_edits(random_neurons: Sequence[Neuron], critical: Sequence[Neuron], scores: CriticalScores,
                          strength: float, mode: str = "add",
                          positions: Sequence[str] = SCORE_POSITIONS) -> list[NeuronEdit]:
    """The control of :func:`steering_edits` at the same strength: ``add`` gives each random
    neuron the dose of the critical neuron it stands for (``s·w``, the same displacement);
    ``blend`` blends each toward its own template ``g`` with the same ``s``."""
    if len(random_neurons) != len(critical):
        raise NeuronAuditError(f"{len(random_neurons)} random neurons for {len(critical)} critical ones")
    if mode == "blend":
        return steering_edits(random_neurons, scores, strength, "blend", positions)
    if mode != "add":
        raise NeuronAuditError(f"steering mode {mode!r} must be one of {STEERING_MODES}")
    return [NeuronEdit.dose(int(r[0]), int(r[1]), strength * scores.at(c)["w"], tuple(positions))
            for r, c in zip(random_neurons, critical)]


# --------------------------------------------------------------------------------------------
# accuracy and paired comparisons
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Graded replies of one condition on a fixed list of problems (same order in every outcome)."""

    condition: str
    correct: np.ndarray
    parsed: np.ndarray
    replicate: int = 0
    details: dict = field(default_factory=dict)  # strength, mode, n, fired share, ...


def accuracy_summary(correct: Sequence[bool], parsed: Sequence[bool] | None = None,
                     confidence: float = 0.95) -> dict:
    """``n``, ``n_correct``, ``accuracy`` with its Wilson interval, and the parsed share with its own."""
    correct = np.asarray(correct, bool)
    parsed = np.ones_like(correct) if parsed is None else np.asarray(parsed, bool)
    n, k, p = int(correct.size), int(correct.sum()), int(parsed.sum())
    low, high = wilson_interval(k, n, confidence)
    p_low, p_high = wilson_interval(p, n, confidence)
    return {"n": n, "n_correct": k, "accuracy": k / n if n else math.nan, "accuracy_low": low,
            "accuracy_high": high, "parsed_share": p / n if n else math.nan, "parsed_low": p_low,
            "parsed_high": p_high}


def paired_difference(reference: Sequence[bool], condition: Sequence[bool], n_boot: int = MIN_RESAMPLES,
                      seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy change ``condition − reference`` on the same problems: the difference, its paired
    bootstrap CI over problems, and the exact McNemar test on the discordant problems."""
    ref, cond = np.asarray(reference, bool), np.asarray(condition, bool)
    diff = cond.astype(float) - ref.astype(float)
    low, high = bootstrap_ci(diff, np.mean, n_boot, seed, level) if np.ptp(diff) > 0 else (diff.mean(),) * 2
    test = mcnemar_exact(cond, ref)
    return {"delta": float(diff.mean()) if diff.size else math.nan, "delta_low": float(low),
            "delta_high": float(high), "only_condition_right": test.only_a_right,
            "only_reference_right": test.only_b_right, "mcnemar_p": test.p_value}


def outcomes_table(reference: Outcome, outcomes: Sequence[Outcome], n_boot: int = MIN_RESAMPLES, seed: int = 0,
                   confidence: float = 0.95) -> pd.DataFrame:
    """One row per outcome (the reference first): accuracy with its Wilson CI and parsed share,
    and the paired change against ``reference`` (:func:`paired_difference`), plus ``details``."""
    rows = []
    for o in (reference, *outcomes):
        if o.correct.shape != reference.correct.shape:
            raise NeuronAuditError(f"condition {o.condition!r} graded {o.correct.size} problems, the reference "
                                   f"{reference.correct.size}")
        row = {"condition": o.condition, "replicate": o.replicate, **accuracy_summary(o.correct, o.parsed, confidence)}
        row.update(paired_difference(reference.correct, o.correct, n_boot, seed, confidence))
        row["reference"] = reference.condition
        row.update(o.details)
        rows.append(row)
    return pd.DataFrame(rows)


def solved_retention(reference: Sequence[bool], condition: Sequence[bool], confidence: float = 0.95) -> dict:
    """On the problems the reference solves: how many the condition still solves (the gate's
    do-no-harm check), with a Wilson interval; null, with the reason, when it solves none."""
    ref, cond = np.asarray(reference, bool), np.asarray(condition, bool)
    n, k = int(ref.sum()), int((ref & cond).sum())
    low, high = wilson_interval(k, n, confidence)
    entry = {"n_solved": n, "still_solved": k, "retention": k / n if n else math.nan, "retention_low": low,
             "retention_high": high}
    return null_for_reason(entry, ["retention", "retention_low", "retention_high"],
                           "the reference solves none of these problems: nothing to retain")


def choose_setting(table: pd.DataFrame, by: Sequence[str] = ("n_top", "strength"),
                   score: str = "accuracy") -> dict:
    """The row of a validation grid with the highest ``score``; ties go to the smallest values of
    ``by`` (the fewest neurons, then the weakest strength)."""
    if table.empty:
        raise NeuronAuditError("no validation results to choose a setting from")
    ordered = table.sort_values([score, *by], ascending=[False, *([True] * len(by))], kind="stable")
    return {k: ordered.iloc[0][k] for k in (*by, score)}


# --------------------------------------------------------------------------------------------
# the adaptive gate: a failure probe on the question's activations
# --------------------------------------------------------------------------------------------


@dataclass
class FailureProbe:
    """Logistic regression ``p(fail | x) = σ(((x − mean)/scale)·coef + intercept)``."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    l2: float
    threshold: float = 0.5
    converged: bool = True

    def probability(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, float) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def fires(self, x: np.ndarray) -> np.ndarray:
        """Rows the probe predicts to fail (probability at least ``threshold``)."""
        return self.probability(x) >= self.threshold


def fit_failure_probe(x: np.ndarray, failed: Sequence[bool], l2: float = 1.0, threshold: float = 0.5) -> FailureProbe:
    """Fit :class:`FailureProbe` on features ``x [n, k]`` (standardised) and labels ``failed``:
    mean log-loss plus ``l2/(2n)·‖coef‖²`` (the intercept unpenalised), minimised by L-BFGS."""
    x = np.asarray(x, float)
    y = np.asarray(failed, float)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise NeuronAuditError(f"probe features {x.shape} do not match {y.shape[0]} labels")
    if y.min() == y.max():
        raise NeuronAuditError("the failure probe needs failed and solved problems to learn from")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    n, k = z.shape

    def loss(theta):
        coef, b = theta[:k], theta[k]
        logits = z @ coef + b
        value = np.mean(np.logaddexp(0.0, logits) - y * logits) + l2 / (2 * n) * coef @ coef
        resid = 1.0 / (1.0 + np.exp(-logits)) - y
        grad = np.concatenate([z.T @ resid / n + l2 / n * coef, [resid.mean()]])
        return value, grad

    res = optimize.minimize(loss, np.zeros(k + 1), jac=True, method="L-BFGS-B")
    return FailureProbe(mean, scale, res.x[:k], float(res.x[k]), float(l2), float(threshold), bool(res.success))


def roc_auc(score: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (the Mann–Whitney U over
    ``n₊·n₋``; ties count half); NaN with one class."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return math.nan
    u = stats.mannwhitneyu(score[positive], score[~positive], alternative="two-sided").statistic
    return float(u / (positive.sum() * (~positive).sum()))


def auc_with_ci(score: Sequence[float], positive: Sequence[bool], n_boot: int = MIN_RESAMPLES, seed: int = 0,
                level: float = 0.95) -> tuple[float, float, float]:
    """``(auc, ci_low, ci_high)``: problems resampled with their labels; a resample with one class
    defines no AUC and is dropped."""
    if n_boot < MIN_RESAMPLES:
        raise NeuronAuditError(f"n_boot {n_boot!r} is below the {MIN_RESAMPLES} resamples the study requires")
    score, positive = np.asarray(score, float), np.asarray(positive, float)

    def statistic(s, p):
        return roc_auc(s, p > 0.5)

    low, high = paired_bootstrap_ci(score, positive, statistic, n_boot, seed, level)
    return roc_auc(score, positive > 0.5), low, high


def probe_auc(score: Sequence[float], failed: Sequence[bool], n_boot: int = MIN_RESAMPLES, seed: int = 0,
              level: float = 0.95) -> dict:
    """``auc``, ``auc_low``, ``auc_high`` of the failure probe's ``score`` on held-out problems
    (:func:`auc_with_ci`), each undefined one written as null with its reason in ``null_reasons``:
    every problem failed or none did (a model that solves nothing), or no resample held both."""
    auc, low, high = auc_with_ci(score, failed, n_boot, seed, level)
    entry = {"auc": auc, "auc_low": low, "auc_high": high}
    n_failed, n = int(np.sum(np.asarray(failed, bool))), len(failed)
    if n_failed in (0, n):
        return null_for_reason(entry, list(entry), f"{n_failed} of {n} held-out problems failed: an AUC needs "
                                                   "failed and solved problems")
    return null_for_reason(entry, ["auc_low", "auc_high"], "no bootstrap resample of the held-out problems held "
                                                           "both failed and solved ones")


def roc_points(score: Sequence[float], positive: Sequence[bool]) -> pd.DataFrame:
    """The ROC curve: ``threshold``, ``fpr``, ``tpr`` (a row flags positive when ``score ≥ threshold``),
    from the strictest threshold to the loosest."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    thresholds = np.concatenate([[np.inf], np.unique(score)[::-1]])
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    rows = [{"threshold": float(t), "fpr": float(((score >= t) & ~positive).sum() / n_neg),
             "tpr": float(((score >= t) & positive).sum() / n_pos)} for t in thresholds]
    return pd.DataFrame(rows)


def youden_threshold(score: Sequence[float], positive: Sequence[bool]) -> float:
    """The threshold that maximises ``tpr − fpr`` (Youden's J); ties take the strictest."""
    roc = roc_points(score, positive)
    j = (roc["tpr"] - roc["fpr"]).to_numpy()
    return float(roc["threshold"].iloc[int(np.argmax(j))])


def gated_row_edits(fires: Sequence[bool], edits: Sequence[NeuronEdit]) -> list[tuple[NeuronEdit, ...]]:
    """Per-problem edits of gated steering: ``edits`` where the probe fires, nothing elsewhere."""
    return [tuple(edits) if bool(f) else () for f in fires]


# --------------------------------------------------------------------------------------------
# transfer between two models
# --------------------------------------------------------------------------------------------


def relative_depth(layer: int, n_layers: int) -> float:
    """``l / (L − 1)``: 0 for the first layer, 1 for the last (0 for a one-layer model)."""
    return 0.0 if n_layers <= 1 else float(layer) / (n_layers - 1)


def depth_matched_layers(layer: int, n_source_layers: int, n_target_layers: int, window: float = 0.1) -> list[int]:
    """Target layers within ``window`` of the source layer's relative depth (the nearest one when
    none is)."""
    depth = relative_depth(layer, n_source_layers)
    gaps = np.array([abs(relative_depth(t, n_target_layers) - depth) for t in range(n_target_layers)])
    inside = [int(t) for t in np.flatnonzero(gaps <= window + 1e-12)]
    return inside or [int(np.argmin(gaps))]


def correlation_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``x [n, A]`` with every column of ``y [n, B]``,
    ``[A, B]``; a constant column correlates 0 with everything."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape[0] != y.shape[0] or x.shape[0] < 3:
        raise NeuronAuditError(f"correlation needs the same ≥ 3 prompts on both sides, got {x.shape[0]} and "
                               f"{y.shape[0]}")

    def standard(m):
        c = m - m.mean(axis=0)
        norm = np.sqrt((c * c).sum(axis=0))
        return np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)

    return standard(x).T @ standard(y)


def map_neurons(source: np.ndarray, target: np.ndarray, neurons: Sequence[Neuron], method: str = "hungarian",
                window: float = 0.1) -> pd.DataFrame:
    """Match ``neurons`` of the source model to target neurons by activation correlation.

    ``source [n_prompts, L_s, N_s]`` and ``target [n_prompts, L_t, N_t]`` are per-prompt mean
    activations on the same prompts (all layers). Each source neuron may match only target layers
    of :func:`depth_matched_layers`; ``hungarian`` assigns distinct targets maximising the total
    ``|r|``, ``top`` takes each neuron's best ``|r|`` (targets may repeat). Rows: ``source_layer``,
    ``source_neuron``, ``target_layer``, ``target_neuron``, ``correlation`` (signed), ``abs_correlation``.
    """
    if method not in ("hungarian", "top"):
        raise NeuronAuditError(f"matching method {method!r} must be 'hungarian' or 'top'")
    source, target = np.asarray(source, float), np.asarray(target, float)
    n_src_layers, (n_tgt_layers, n_tgt) = source.shape[1], target.shape[1:]
    x = np.stack([source[:, layer, i] for layer, i in neurons], axis=1)
    r = correlation_matrix(x, target.reshape(target.shape[0], -1))  # [n_sel, L_t * N_t]
    allowed = np.zeros_like(r, dtype=bool)
    for k, (layer, _) in enumerate(neurons):
        for t in depth_matched_layers(layer, n_src_layers, n_tgt_layers, window):
            allowed[k, t * n_tgt: (t + 1) * n_tgt] = True
    score = np.where(allowed, np.abs(r), -1.0)
    if method == "top":
        chosen = score.argmax(axis=1)
    else:
        rows, cols = optimize.linear_sum_assignment(-score)
        chosen = np.empty(len(neurons), dtype=int)
        chosen[rows] = cols
    return pd.DataFrame([
        {"source_layer": int(layer), "source_neuron": int(i), "target_layer": int(c // n_tgt),
         "target_neuron": int(c % n_tgt), "correlation": float(r[k, c]), "abs_correlation": float(abs(r[k, c]))}
        for k, ((layer, i), c) in enumerate(zip(neurons, chosen))
    ])


def random_mapping(source: np.ndarray, target: np.ndarray, neurons: Sequence[Neuron], n_sets: int, seed: int,
                   window: float = 0.1) -> pd.DataFrame:
    """The baseline of :func:`map_neurons`: each source neuron mapped to a random target neuron of
    its depth-matched layers (distinct within a set), ``n_sets`` times, with the same columns and a
    ``replicate`` column."""
    source, target = np.asarray(source, float), np.asarray(target, float)
    rng = np.random.default_rng(seed)
    n_src_layers, (n_tgt_layers, n_tgt) = source.shape[1], target.shape[1:]
    x = np.stack([source[:, layer, i] for layer, i in neurons], axis=1)
    flat = target.reshape(target.shape[0], -1)
    rows = []
    for rep in range(n_sets):
        used: set[int] = set()
        for k, (layer, i) in enumerate(neurons):
            pool = [t * n_tgt + j for t in depth_matched_layers(layer, n_src_layers, n_tgt_layers, window)
                    for j in range(n_tgt) if t * n_tgt + j not in used]
            c = int(rng.choice(pool))
            used.add(c)
            r = float(correlation_matrix(x[:, [k]], flat[:, [c]])[0, 0])
            rows.append({"replicate": rep, "source_layer": int(layer), "source_neuron": int(i),
                         "target_layer": c // n_tgt, "target_neuron": c % n_tgt, "correlation": r,
                         "abs_correlation": abs(r)})
    return pd.DataFrame(rows)


def carry_steering(matches: pd.DataFrame, scores: CriticalScores, source: np.ndarray,
                   target: np.ndarray) -> pd.DataFrame:
    """``w`` and ``g`` of each matched source neuron carried onto its target neuron in units of each
    neuron's spread on the shared prompts (``source``/``target`` as in :func:`map_neurons`), the
    sign flipped for a negative correlation: ``w' = sign(r)·w·σ_t/σ_s`` and
    ``g' = μ_t + sign(r)·(g − μ_s)·σ_t/σ_s``. Adds ``w`` and ``g`` columns for the target neurons."""
    out = matches.copy()
    ws, gs = [], []
    for _, m in matches.iterrows():
        s_act = np.asarray(source)[:, int(m.source_layer), int(m.source_neuron)].astype(float)
        t_act = np.asarray(target)[:, int(m.target_layer), int(m.target_neuron)].astype(float)
        sign = -1.0 if m.correlation < 0 else 1.0
        ratio = t_act.std() / s_act.std() if s_act.std() > 0 else 0.0
        sc = scores.at((int(m.source_layer), int(m.source_neuron)))
        ws.append(sign * sc["w"] * ratio)
        gs.append(t_act.mean() + sign * (sc["g"] - s_act.mean()) * ratio)
    out["w"], out["g"] = ws, gs
    return out


def carried_edits(carried: pd.DataFrame, strength: float, mode: str = "add",
                  positions: Sequence[str] = SCORE_POSITIONS) -> list[NeuronEdit]:
    """Steering edits on the target model from :func:`carry_steering`'s table."""
    if mode not in STEERING_MODES:
        raise NeuronAuditError(f"steering mode {mode!r} must be one of {STEERING_MODES}")
    out = []
    for _, m in carried.iterrows():
        layer, i = int(m.target_layer), int(m.target_neuron)
        if mode == "add":
            out.append(NeuronEdit.dose(layer, i, strength * float(m.w), tuple(positions)))
        else:
            out.append(NeuronEdit.blend(layer, i, float(m.g), strength, tuple(positions)))
    return out
