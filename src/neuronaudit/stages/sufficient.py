"""The sufficient stage (WASD, SCIENCE.md section 5; the method is
:mod:`neuronaudit.methods.sufficient`, the perturbations :mod:`neuronaudit.methods.perturbations`).

A *task* (``sufficient.tasks.<name>``) is a prompt set whose prompts the model answers with one
next token. Two kinds:

* ``set: <prompt set>``: every prompt carries its answer span (column ``span``, configurable);
  its perturbations keep the span verbatim and edit the text around it (substitutions, template
  paraphrases, fillers), so they keep the label that defines the target;
* ``behaviour: <behaviour>``: one of the study's behaviours; the explained prompts are its positive
  prompts, whose other positive prompts are the inputs that share the label (natural
  paraphrases), and its negative prompts lack it.

For each of ``n_explained`` prompts of a task (drawn with the seed), the target is the model's
current greedy next token there. Candidates are the top ``n_candidates`` neurons of two rankings on
that prompt: gradient × activation of ``log p(target)`` and the contrastive screen's δ on the
task's own inputs (mean last-token activation over perturbed inputs that keep the target minus
the mean over task prompts that lack it). The greedy search (:func:`~neuronaudit.methods.sufficient.
search_sufficient_set`) runs on ``n_search`` perturbed inputs; its set is checked on ``n_fresh``
perturbations it never saw, beside the top-|S| sets of each ranking; stability is the Jaccard
index against the set found on a disjoint set of perturbations and on perturbations drawn with
another seed (only when the search reached its bound: a set that is not sufficient has no
stability to measure), and across the explained prompts of a task. Control clamps the set onto task
prompts that lack the target (forcing rate against random same-layer sets of the same size) and
generates ``max_new_tokens`` from there, typed by the study's judge (collapse) and, for a behaviour
task, read by its oracle.

Writes ``sets.parquet`` (every set every search evaluated), ``precision.parquet``,
``control.parquet``, ``perturbations.parquet`` (every input used, with the edits that made it) and
``summary.json``.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.judge import make_judge
from neuronaudit.evaluation.metrics import repetition_ratio
from neuronaudit.evaluation.stats import wilson_interval
from neuronaudit.interventions.generation import encode_prompts, eos_ids, generate_tokens, pad_id
from neuronaudit.interventions.hooks import InterventionPlan
from neuronaudit.interventions.memory import RowLoad, split_on_oom
from neuronaudit.io import provenance, write_json, write_table
from neuronaudit.methods import sufficient as wasd
from neuronaudit.methods.perturbations import PerturbationSpec, perturb, perturbation_rows
from neuronaudit.methods.window import flips
from neuronaudit.models.loading import read_manifest
from neuronaudit.options import SufficientOptions
from neuronaudit.prompts import extras
from neuronaudit.stages.common import PROMPT_TOKENS, open_model, read_prompts, resolve_batch_sizes, weights_dtype

log = logging.getLogger("neuronaudit")

#: The sets checked on fresh perturbations and in control: the search's set and the top-|S| of
#: each ranking (the attribution-graph baseline).
CHECKED_SETS = ("found", "attribution", "screen")
#: Fewer inputs than this and a search cannot reach any useful bound: the prompt is skipped, and
#: the summary says so.
MIN_INPUTS = 8


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), *(zlib.crc32(p.encode("utf-8")) for p in parts)])


def perturbation_spec(task: Mapping) -> PerturbationSpec:
    """The task's perturbation settings (its config entry), defaults from the method module."""
    kw = {}
    for name in ("templates", "fillers", "droppable", "operations"):
        if task.get(name) is not None:
            kw[name] = tuple(task[name])
    if task.get("substitutions") is not None:
        kw["substitutions"] = tuple(tuple(g) for g in task["substitutions"])
    if task.get("max_edits") is not None:
        kw["max_edits"] = int(task["max_edits"])
    return PerturbationSpec(**kw)


def cluster_mean(values, n_boot: int, seed: int) -> dict:
    """Mean of per-prompt values with a percentile bootstrap CI over prompts (the resampling
    unit: inputs are nested in prompts); ``n`` the prompts with a finite value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "low": None, "high": None, "n": 1}
    boots = _rng(seed, "cluster").choice(v, size=(n_boot, v.size), replace=True).mean(1)
    return {"mean": float(v.mean()), "low": float(np.quantile(boots, 0.025)),
            "high": float(np.quantile(boots, 0.975)), "n": int(v.size)}


class _Task:
    """A task's prompts as the model sees them and how their inputs are made."""

    def __init__(self, name: str, spec: Mapping, tables: Mapping[str, str | Path], options: SufficientOptions,
                 tokenizer):
        self.name, self.spec = name, dict(spec)
        o = options
        if spec.get("behaviour"):
            behaviour = o.behaviours.get(spec["behaviour"])
            if behaviour is None:
                raise NeuronAuditError(f"sufficient task {name!r}: behaviour {spec['behaviour']!r} is not configured")
            self.behaviour = dict(behaviour)
            self.kind = "behaviour"
            self.chat_template = spec.get("chat_template") or o.model.chat_template
            self.prompts = read_prompts(tables["positive"], "all", role=f"sufficient task {name!r} prompts")
            self.lacking_prompts = read_prompts(tables["negative"], "all", role=f"sufficient task {name!r} prompts")
            self.span_column = None
        else:
            self.behaviour = None
            self.kind = "set"
            self.chat_template = spec.get("chat_template") or "none"
            self.prompts = read_prompts(tables["set"], "all", role=f"sufficient task {name!r} prompts")
            self.lacking_prompts = None
            self.span_column = spec.get("span") or "span"
            columns = extras(self.prompts)
            if self.span_column not in columns or columns[self.span_column].isna().any():
                raise NeuronAuditError(f"sufficient task {name!r}: every prompt of set {spec['set']!r} needs a "
                                       f"{self.span_column!r} field (the span that carries its answer)")
            self.spans = list(columns[self.span_column])
            bad = [pid for pid, t, sp in zip(self.prompts["prompt_id"], self.prompts["text"], self.spans)
                   if sp not in t]
            if bad:
                raise NeuronAuditError(
                    f"sufficient task {name!r}: the span of prompt {bad[0]!r} does not occur in its text")
            self.perturbations = perturbation_spec(spec)
        self.tokenizer = tokenizer
        self.system_prompt = o.model.system_prompt

    def encode(self, texts) -> list[list[int]]:
        return encode_prompts(self.tokenizer, list(texts), self.chat_template, self.system_prompt)


def _greedy_tokens(model, adapter, inputs, batch_size, counter) -> np.ndarray:
    return wasd.ClampedPredictor(model, adapter, inputs, 0, 0, batch_size, counter).outputs([()]).top_token[0]


def _input_pools(task: _Task, p: int, n_search: int, n_fresh: int, seed: int) -> dict[str, list[dict]] | str:
    """The explained prompt's inputs: ``search``, ``disjoint`` (a second search set sharing no
    input with ``search``), ``reseeded`` (drawn with another seed) and ``fresh`` (never searched);
    each a list of perturbation rows. A string says why the prompt cannot be explained."""
    pid, text = task.prompts["prompt_id"].iloc[p], task.prompts["text"].iloc[p]
    need = 2 * n_search + n_fresh
    if task.kind == "set":
        span = task.spans[p]
        made = perturb(text, span, task.perturbations, need, seed)
        again = perturb(text, span, task.perturbations, n_search, seed + 1)
        rows = perturbation_rows(pid, span, made, seed, "pool")
        reseeded = perturbation_rows(pid, span, again, seed + 1, "reseeded")
    else:
        others = [k for k in range(len(task.prompts)) if k != p]
        order = _rng(seed, task.name, pid).permutation(others)
        rows = [{"prompt_id": pid, "perturbation_id": task.prompts["prompt_id"].iloc[k], "label": None,
                 "split": "pool", "seed": int(seed), "text": task.prompts["text"].iloc[k], "edits": "other prompt"}
                for k in order[:need]]
        again = _rng(seed + 1, task.name, pid).permutation(others)[:n_search]
        reseeded = [{**r, "split": "reseeded", "seed": int(seed + 1)} for r in
                    [{"prompt_id": pid, "perturbation_id": task.prompts["prompt_id"].iloc[k], "label": None,
                      "text": task.prompts["text"].iloc[k], "edits": "other prompt"} for k in again]]
    # the fresh inputs first claim their share, then the two disjoint search sets split the rest
    scale = min(1.0, len(rows) / need)
    n_f, n_s = int(n_fresh * scale), int(n_search * scale)
    if min(n_f, n_s, len(reseeded)) < MIN_INPUTS:
        return (f"only {len(rows)} distinct inputs could be made ({need} asked); a search needs at least "
                f"{MIN_INPUTS} per set")
    pools = {"fresh": rows[:n_f], "search": rows[n_f: n_f + n_s], "disjoint": rows[n_f + n_s: n_f + 2 * n_s],
             "reseeded": reseeded}
    if len(pools["disjoint"]) < MIN_INPUTS:
        pools["disjoint"] = []
    return {name: [{**r, "split": name} for r in part] for name, part in pools.items()}


def _rollouts(model, tokenizer, adapter, inputs, named_sets, judge, task: _Task, lacking_texts, lacking_extras,
              max_new_tokens, batch_size, target_id) -> dict[str, dict]:
    """Greedy continuations of the lacking inputs under each set's clamp (at the last prompt token):
    the share collapsed (the study's judge) and, for a behaviour task, the share showing the
    behaviour by its oracle (a collapsed rollout never counts), per set name."""
    # a set equal to another (the empty set found, and its empty baselines) is rolled out once
    first_of: dict[tuple, str] = {}
    alias = {name: first_of.setdefault(tuple(sorted((p.key, p.threshold) for p in s)), name)
             for name, s in named_sets.items()}
    unique = [name for name in named_sets if alias[name] == name]
    rows = [(name, j) for name in unique for j in range(len(inputs))]
    out: dict[str, list] = {name: [] for name in unique}

    def run(chunk, part, width):
        plan = InterventionPlan.per_row([p.edit(("last_prompt",)) for p in named_sets[name]] for name, _ in chunk)
        tokens, _, entropies = generate_tokens(
            model, [inputs[j] for _, j in chunk], max_new_tokens, adapter=adapter, plan=plan,
            eos_token_ids=eos_ids(model, tokenizer), pad_token_id=pad_id(tokenizer), width=width)
        return list(zip(tokens, entropies))

    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(inputs[j]) for _, j in chunk)  # a half of a split chunk keeps the chunk's width
        rolled = split_on_oom(functools.partial(run, width=width), chunk, "sufficient rollouts")
        for (name, j), (toks, ent) in zip(chunk, rolled):
            out[name].append((j, toks, ent))
    result = {}
    for name, parts in out.items():
        parts.sort(key=lambda t: t[0])
        texts = [tokenizer.decode(t, skip_special_tokens=True) for _, t, _ in parts]
        metrics = pd.DataFrame({"repetition_ratio": [repetition_ratio(t) for _, t, _ in parts],
                                "perplexity": np.nan,
                                "entropy": [float(e.mean()) if e.size else np.nan for _, _, e in parts]})
        types = judge.classify(list(lacking_texts), texts, metrics)
        collapsed = np.array([t == "collapse" for t in types])
        first = np.array([bool(t) and t[0] == target_id for _, t, _ in parts])
        behaviour = (flips(task.behaviour, texts, types, lacking_extras) & ~collapsed) if task.behaviour else None
        result[name] = {"n_rollouts": len(texts), "collapsed": int(collapsed.sum()),
                        "first_token_forced": int(first.sum()),
                        "behaviour_shown": None if behaviour is None else int(behaviour.sum()),
                        "example": texts[0] if texts else ""}
    return {name: result[alias[name]] for name in named_sets}


def explain_prompt(model, tokenizer, adapter, task: _Task, p: int, targets: np.ndarray, options: SufficientOptions,
                   judge, counter: wasd.ForwardCounter) -> dict:
    """Search, check and control for one explained prompt; returns its table rows and summary."""
    o = options
    pid = task.prompts["prompt_id"].iloc[p]
    source = task.encode([task.prompts["text"].iloc[p]])[0]
    target = int(targets[p])
    target_text = tokenizer.decode([target])
    seed = int(o.seed) + zlib.crc32(f"{task.name}/{pid}".encode()) % 100_000
    head = {"task": task.name, "prompt_id": pid, "target": target_text, "target_id": target}
    pools = _input_pools(task, p, o.n_search, o.n_fresh, seed)
    if isinstance(pools, str):
        log.warning("sufficient %s/%s skipped: %s", task.name, pid, pools)
        return {"skipped": {**head, "reason": pools}}
    encoded = {name: task.encode([r["text"] for r in rows]) for name, rows in pools.items()}
    # the task's prompts that lack the target: the screen's contrast and the control inputs
    if task.kind == "set":
        lacking_idx = [k for k in range(len(task.prompts)) if k != p and targets[k] != target]
        lacking_table = task.prompts
        lacking_tokens = None
    else:
        lacking_table = task.lacking_prompts
        lacking_tokens = task.lacking_targets
        lacking_idx = [k for k in range(len(lacking_table)) if lacking_tokens[k] != target]
    lacking_idx = sorted(_rng(seed, "lacking").permutation(lacking_idx)[: o.n_control].tolist())
    if len(lacking_idx) < 2:
        reason = f"only {len(lacking_idx)} task prompts lack the target {target_text!r}: no contrast and no control"
        log.warning("sufficient %s/%s skipped: %s", task.name, pid, reason)
        return {"skipped": {**head, "reason": reason}}
    lacking_texts = list(lacking_table["text"].iloc[lacking_idx])
    lacking_inputs = task.encode(lacking_texts)

    activation, attribution = wasd.target_attribution(model, adapter, source, target)
    search = wasd.ClampedPredictor(model, adapter, encoded["search"], target, pad_id(tokenizer), o.batch_size, counter)
    kept = search([()])[0]
    keeping = [encoded["search"][j] for j in np.flatnonzero(kept)]
    acts_search = wasd.last_token_matrix(model, adapter, [source, *keeping], o.batch_size, counter)
    acts_lacking = wasd.last_token_matrix(model, adapter, lacking_inputs, o.batch_size, counter)
    screen = wasd.contrast_score(acts_search, acts_lacking)
    del acts_search, acts_lacking
    neurons = wasd.candidate_neurons([attribution, screen], o.n_candidates)
    candidates = wasd.predicates_from_activation(activation, neurons, o.fraction)

    t0 = time.perf_counter()
    calls0, tokens0 = counter.forward_calls, counter.tokens

    def run(predictor):
        return wasd.search_sufficient_set(predictor, candidates, len(predictor.inputs), delta=o.delta,
                                          confidence=o.confidence, max_size=o.max_size, beam_width=o.beam_width)

    results = {"search": run(search)}
    # stability compares sufficient sets: a search that found none within max_size has nothing to
    # compare (its Jaccard is missing), and its repeats would cost the most of all
    for name in ("disjoint", "reseeded"):
        if encoded[name] and results["search"].reached:
            results[name] = run(wasd.ClampedPredictor(model, adapter, encoded[name], target, pad_id(tokenizer),
                                                      o.batch_size, counter))
    search_seconds = time.perf_counter() - t0
    found = results["search"].predicates
    k = len(found)
    sets = {
        "found": tuple(found),
        "attribution": tuple(wasd.predicates_from_activation(activation, wasd.top_neurons(attribution, k), o.fraction)),
        "screen": tuple(wasd.predicates_from_activation(activation, wasd.top_neurons(screen, k), o.fraction)),
    }
    fresh = wasd.ClampedPredictor(model, adapter, encoded["fresh"], target, pad_id(tokenizer), o.batch_size, counter)
    precision = wasd.precision_table(model, adapter, fresh, sets, o.confidence)
    random_sets = wasd.random_same_layer_sets(found, activation, o.fraction, o.n_random, seed) if k else []
    lacking = wasd.ClampedPredictor(model, adapter, lacking_inputs, target, pad_id(tokenizer), o.batch_size, counter)
    control = wasd.control_table(lacking, found, random_sets, o.confidence,
                                 baselines={n: s for n, s in sets.items() if n != "found"})
    # continuations under every checked set and the first random set (all random sets enter the
    # next-token forcing rate; the control rows of the others carry no rollout figures)
    named = {"none": (), **sets, **{f"random{r}": s for r, s in enumerate(random_sets[:1])}}
    lacking_extras = extras(lacking_table.iloc[lacking_idx]).to_dict(orient="records")
    rolled = _rollouts(model, tokenizer, adapter, lacking_inputs, named, judge, task, lacking_texts, lacking_extras,
                       o.max_new_tokens, o.batch_size, target)
    control["rollout_set"] = [("none" if s == "none" else f"random{int(r)}" if s == "random" else s)
                              for s, r in zip(control["set"], control["replicate"])]
    for column in ("n_rollouts", "collapsed", "behaviour_shown"):
        control[column] = [rolled[name][column] if name in rolled else None for name in control["rollout_set"]]
    control["collapse_rate"] = [np.nan if n is None else c / n for c, n in zip(control["collapsed"],
                                                                               control["n_rollouts"])]
    control["behaviour_rate"] = [np.nan if b is None or n is None else b / n
                                 for b, n in zip(control["behaviour_shown"], control["n_rollouts"])]
    control = control.drop(columns=["rollout_set"])

    main = results["search"]
    jac = {name: wasd.jaccard(main.predicates, r.predicates) for name, r in results.items() if name != "search"}
    trace = pd.concat([wasd.trace_table(r).assign(search=name) for name, r in results.items()], ignore_index=True)
    precision = precision.assign(**head, reached=main.reached, search_precision=main.precision,
                                 search_low=main.low, baseline_precision=main.baseline.precision,
                                 n_candidates=len(candidates), jaccard_disjoint=jac.get("disjoint", np.nan),
                                 jaccard_reseeded=jac.get("reseeded", np.nan))
    perturbations = pd.DataFrame([{**r, "task": task.name} for rows in pools.values() for r in rows])
    return {
        "sets": trace.assign(**head), "precision": precision, "control": control.assign(**head),
        "perturbations": perturbations,
        "prompt": {**head, "size": k, "reached": bool(main.reached), "neurons": [list(n) for n in main.neurons],
                   "baseline_precision": main.baseline.precision, "search_precision": main.precision,
                   "n_search": main.n, "jaccard": jac, "sets": {n: [list(p.key) for p in s] for n, s in sets.items()},
                   "search_seconds": search_seconds, "search_forward_calls": counter.forward_calls - calls0,
                   "search_token_positions": counter.tokens - tokens0,
                   "rollout_examples": {n: rolled[n]["example"] for n in ("none", "found")}},
    }


def _pooled(table: pd.DataFrame, hits: str, n: str, confidence: float) -> dict:
    k, total = int(table[hits].sum()), int(table[n].sum())
    low, high = wilson_interval(k, total, confidence) if total else (None, None)
    return {"hits": k, "n": total, "rate": k / total if total else None, "low": low, "high": high}


def task_summary(name: str, prompts: list[dict], skipped: list[dict], precision: pd.DataFrame, control: pd.DataFrame,
                 options: SufficientOptions) -> dict:
    """One task's figures: per set kind the mean over explained prompts (bootstrap CI over prompts)
    of fresh precision, coverage and size, forcing and collapse in control, and stability."""
    o = options
    out: dict = {"n_explained": len(prompts), "skipped": skipped, "prompts": prompts}
    if not prompts:
        return out
    by_set = {}
    for kind in CHECKED_SETS:
        rows = precision[precision["set"] == kind]
        by_set[kind] = {
            "size": cluster_mean(rows["size"], o.n_boot, o.seed),
            "precision": cluster_mean(rows["precision"], o.n_boot, o.seed),
            "coverage": cluster_mean(rows["coverage"], o.n_boot, o.seed),
            "pooled_precision": _pooled(rows, "hits", "n", o.confidence),
        }
    forcing = {}
    for kind in ("none", *CHECKED_SETS, "random"):
        rows = control[control["set"] == kind]
        if rows.empty:
            continue
        per_prompt = rows.groupby("prompt_id")[["forcing_rate", "collapse_rate", "behaviour_rate"]].mean()
        forcing[kind] = {"forcing_rate": cluster_mean(per_prompt["forcing_rate"], o.n_boot, o.seed),
                         "collapse_rate": cluster_mean(per_prompt["collapse_rate"], o.n_boot, o.seed),
                         "behaviour_rate": cluster_mean(per_prompt["behaviour_rate"], o.n_boot, o.seed),
                         "n_prompts": int(per_prompt.shape[0]), "n_inputs_per_prompt": int(rows["n"].max())}
    found = precision[precision["set"] == "found"]
    same_target: list[float] = []
    every: list[float] = []
    across = {}
    for kind in CHECKED_SETS:
        rows = precision[precision["set"] == kind]
        pairs = [(a, b) for i, a in enumerate(rows.itertuples()) for b in list(rows.itertuples())[i + 1:]]
        values = [wasd.jaccard(map(tuple, a.neurons), map(tuple, b.neurons)) for a, b in pairs]
        across[kind] = {"mean": float(np.mean(values)) if values else None, "n_pairs": len(values)}
        if kind == "found":
            every = values
            same_target = [v for (a, b), v in zip(pairs, values) if a.target_id == b.target_id]
    out.update({
        "sets": by_set,
        "control": forcing,
        "reached": int(found["reached"].sum()),
        "empty_set_sufficient": int((found["size"] == 0).sum()),
        "stability": {
            "jaccard_disjoint": cluster_mean(found["jaccard_disjoint"], o.n_boot, o.seed),
            "jaccard_reseeded": cluster_mean(found["jaccard_reseeded"], o.n_boot, o.seed),
            "jaccard_across_prompts": across,
            "jaccard_across_prompts_same_target": {"mean": float(np.mean(same_target)) if same_target else None,
                                                   "n_pairs": len(same_target)},
            "jaccard_across_prompts_all_found": {"mean": float(np.mean(every)) if every else None,
                                                 "n_pairs": len(every)},
        },
    })
    return out


def run_sufficient(
    task_tables: Mapping[str, Mapping[str, str | Path]],
    manifest: str | Path,
    out_sets: str | Path,
    out_precision: str | Path,
    out_control: str | Path,
    out_perturbations: str | Path,
    out_summary_json: str | Path,
    options: SufficientOptions,
    threads: int | None = None,
    loaded=None,
) -> dict:
    """The sufficient stage end to end. ``task_tables``: per task its prepared prompt tables
    (``set``, or ``positive`` and ``negative`` for a behaviour task)."""
    o = options
    unknown = sorted(set(task_tables) - set(o.tasks))
    if unknown:
        raise NeuronAuditError(f"sufficient: prompt tables given for unknown task {unknown[0]!r}")
    man = read_manifest(manifest)
    if loaded is None:
        opened = open_model(manifest, o.model, threads)
        model, tokenizer, adapter = opened.model, opened.tokenizer, opened.adapter
    else:
        model, tokenizer, adapter = loaded
    # a row: an input's forward, or one rolled out under a clamp (its cache and new tokens)
    load = RowLoad(tokens=PROMPT_TOKENS, cached=PROMPT_TOKENS + o.max_new_tokens)
    o = resolve_batch_sizes(model, adapter, o, {"sufficient.batch_size": load})
    judge = make_judge(o.judge.judge_config())
    counter = wasd.ForwardCounter()
    t_start = time.perf_counter()
    frames: dict[str, list[pd.DataFrame]] = {k: [] for k in ("sets", "precision", "control", "perturbations")}
    tasks_summary = {}
    for name, spec in o.tasks.items():
        task = _Task(name, spec, task_tables[name], o, tokenizer)
        t0 = time.perf_counter()
        targets = _greedy_tokens(model, adapter, task.encode(task.prompts["text"]), o.batch_size, counter)
        if task.kind == "behaviour":
            task.lacking_targets = _greedy_tokens(model, adapter, task.encode(task.lacking_prompts["text"]),
                                                  o.batch_size, counter)
        explained = _rng(o.seed, name).permutation(len(task.prompts))[: o.n_explained]
        prompts, skipped = [], []
        precision_rows, control_rows = [], []
        for p in sorted(int(i) for i in explained):
            result = explain_prompt(model, tokenizer, adapter, task, p, targets, o, judge, counter)
            if "skipped" in result:
                skipped.append(result["skipped"])
                continue
            for key in frames:
                frames[key].append(result[key])
            precision_rows.append(result["precision"])
            control_rows.append(result["control"])
            prompts.append(result["prompt"])
            log.info("sufficient %s/%s: target %r, |S| = %d, reached %s, fresh precision %.2f",
                     name, result["prompt"]["prompt_id"], result["prompt"]["target"], result["prompt"]["size"],
                     result["prompt"]["reached"], float(result["precision"].iloc[0]["precision"]))
        precision = pd.concat(precision_rows, ignore_index=True) if precision_rows else pd.DataFrame()
        control = pd.concat(control_rows, ignore_index=True) if control_rows else pd.DataFrame()
        tasks_summary[name] = {"kind": task.kind, "chat_template": task.chat_template,
                               "n_prompts": len(task.prompts), "seconds": time.perf_counter() - t0,
                               **task_summary(name, prompts, skipped, precision, control, o)}
    prov = provenance(
        stage="sufficient", method="sufficient neuron sets (WASD, arXiv 2603.18474)", model_id=man.get("source"),
        weight_sha256=man.get("weight_sha256"), dtype=weights_dtype(model),
        tasks={n: dict(s) for n, s in o.tasks.items()},
        n_explained=o.n_explained, n_search=o.n_search, n_fresh=o.n_fresh, n_candidates=o.n_candidates,
        fraction=o.fraction, delta=o.delta, confidence=o.confidence, max_size=o.max_size, beam_width=o.beam_width,
        n_random=o.n_random, n_control=o.n_control, max_new_tokens=o.max_new_tokens, seed=o.seed,
        judge=judge.describe(), clamp_positions=["last_prompt"],
        precision="share of inputs whose greedy next token is the target with the set clamped",
    )
    for key, path in (("sets", out_sets), ("precision", out_precision), ("control", out_control),
                      ("perturbations", out_perturbations)):
        table = (pd.concat(frames[key], ignore_index=True) if frames[key]
                 else pd.DataFrame({"task": pd.Series(dtype=str)}))
        write_table(pa.Table.from_pandas(table, preserve_index=False), path, prov)
    summary = {"provenance": prov, "tasks": tasks_summary, "seconds": time.perf_counter() - t_start,
               "cost": {"forward_calls": counter.forward_calls, "sequences": counter.sequences,
                        "token_positions": counter.tokens}}
    write_json(summary, out_summary_json)
    return summary
