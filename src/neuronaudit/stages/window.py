"""The control-window stage: candidate neurons, batched dose sweeps, measured and predicted
ceilings, triggers, verdicts with error bars (SCIENCE.md section 1; the pure law is in
:mod:`neuronaudit.methods.window`).

For each behaviour (a positive/negative prompt pair with a deterministic oracle) the candidates
are the strongest screened neurons plus random controls from early, bulk and late layers. Each
candidate is swept over a grid of normalised doses ``x = d / B`` in both signs; every
(neuron, x, prompt) is a greedy rollout with the dose on the last prompt token and every
generated token, read at several horizons from one generation (:func:`neuronaudit.interventions.sweeps.
generated_dose_sweep`: the clean prefix is computed once and shared by all rows).

* coherence: the judge's collapse rule (repetition, perplexity under the unsteered model,
  entropy); the measured ceiling is the smallest ``|x|`` collapsing ≥50% of prompts;
* trigger: the smallest ``|x|`` at which the oracle flips ≥50% of prompts at the behaviour's
  horizon τ and the Wilson lower bound of that share exceeds the unintervened (x = 0) share (its
  bootstrap over prompts resamples the same rule, the x = 0 share recomputed per resample); a
  collapsed rollout never flips — refusal: a harmful prompt no longer refused (coherent bypass or
  actionable); operator: the answer becomes the product on an addition prompt; format: a prose
  request answered as a list; regex / exact: a user's pattern or answer appears; logit_pair: the
  first generated token's logits favour the behaviour tokens over the default tokens;
* predicted ceilings from the weights and one generic forward pass only: (a) the universal
  critical alignment ``c*`` fitted on training neurons and mapped through each neuron's
  saturation curve; (b) the KL threshold of a single-pass dose sweep on generic prompts; beside
  them a constant and a raw-dose baseline;
* held-out neurons (split by a recorded seed) give MAE with a cluster bootstrap over neurons,
  every case counted, and verdict accuracy against the training majority with an exact McNemar
  test;
* dose search (``window.search``): ``adaptive`` brackets each (neuron, sign)'s ceiling and
  triggers by galloping then bisection over the grid and rolls out only the visited points, all
  searches of a behaviour sharing one batched rollout per round; ``full`` rolls out every grid
  point. The summary counts the rollouts (``n_rollouts``, ``n_rollouts_full_grid``); the window
  table records the visited points of each (neuron, sign) and how many grid points below its
  ceiling and trigger were not rolled out (:mod:`neuronaudit.methods.dose_search`);
* rerun from recorded sweeps (``neuronaudit window ... --sweeps-from <window/sweeps.parquet>``): a
  finished window's rollouts are read back (same candidates, prompts, grid, horizons and search, or
  a one-line error) and everything after them (single pass, tables, summary) is computed again;
* threshold sensitivity: the stored rollouts re-typed with the judge's collapse thresholds
  ×0.75 and ×1.25, and how many ceilings, triggers and verdicts move
  (:func:`neuronaudit.methods.window.ceiling_threshold_sensitivity`; summary key
  ``ceiling_threshold_sensitivity``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.judge import RuleThresholds, make_judge
from neuronaudit.interventions.memory import RowLoad
from neuronaudit.io import provenance, read_provenance, write_json, write_table
from neuronaudit.methods import window as law
from neuronaudit.methods.window import (
    BehaviourRollouts,
    ceiling_threshold_sensitivity,
    heldout_summary,
    pick_candidates,
    refusal_pivots,
    search_record,
    search_summary,
    single_pass_sweep,
    sweep_behaviour_search,
    window_table,
)
from neuronaudit.options import WindowOptions
from neuronaudit.stages.common import PROMPT_TOKENS, open_model, read_prompts, read_table, resolve_batch_sizes

log = logging.getLogger(__name__)


def check_window_options(o: WindowOptions) -> None:
    """Settings the schema cannot check, before the model is loaded."""
    if o.n_boot < 1000:
        raise NeuronAuditError(f"window.n_boot {o.n_boot!r} is below the 1000 resamples the study requires")
    for grid in ("x_grid", "single_pass_grid"):
        bad = [x for x in getattr(o, grid) if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)]
        if bad:
            raise NeuronAuditError(
                f"impossible dose {bad[0]!r} in window.{grid}: doses are positive finite budget units"
            )


def behaviour_horizons(spec: Mapping, o: WindowOptions) -> list[int]:
    """The horizons a behaviour's oracle reads (``behaviours.<name>.horizons``; a model that
    answers in one token is read at 1), else ``window.horizons``."""
    return sorted({int(h) for h in (spec.get("horizons") or o.horizons)})


@dataclass
class _Setup:
    """What every window job reads and derives before sweeping: options with resolved batch sizes,
    the judge, the swept prompts, the opened model, the candidates and the generic geometry."""

    options: WindowOptions
    judge: object
    swept: dict
    opened: object
    neurons: pd.DataFrame
    geometry: pd.DataFrame
    generic: list


def _setup(manifest_path, screen_scores, behaviour_prompts, generic_table, behaviours, options: WindowOptions,
           threads, swept_behaviours) -> _Setup:
    o, m = options, options.model
    judge = make_judge(o.judge.judge_config())
    check_window_options(o)
    for b in behaviours:
        if b not in screen_scores:
            raise NeuronAuditError(f"behaviour {b!r} needs a screen table and a prompt table")
    for b in swept_behaviours:
        if b not in behaviour_prompts:
            raise NeuronAuditError(f"behaviour {b!r} needs a screen table and a prompt table")
    screens = {b: read_table(screen_scores[b], "screen table") for b in behaviours}
    generic = read_prompts(generic_table, "all", o.n_generic, role="generic prompt table")["text"].tolist()
    swept = {b: read_prompts(behaviour_prompts[b], "heldout", o.n_prompts,
                             role=f"prompt table of behaviour {b!r}") for b in swept_behaviours}
    opened = open_model(manifest_path, m, threads)
    # a dosed row: one token per step against its own copy of the prompt's cache and its rollout
    longest = max((h for spec in behaviours.values() for h in behaviour_horizons(spec, o)), default=max(o.horizons))
    load = RowLoad(tokens=1, cached=PROMPT_TOKENS + longest)
    o = resolve_batch_sizes(opened.model, opened.adapter, o, {"window.row_batch_size": load})
    # every job picks the candidates of every behaviour (random controls are drawn across behaviours)
    neurons = pick_candidates(screens, o.n_candidates, o.n_random, opened.adapter.n_layers, opened.adapter.n_neurons,
                              o.seed, n_top=o.n_top)
    geometry = law.generic_geometry(opened.model, opened.tokenizer, opened.adapter, generic)
    return _Setup(o, judge, swept, opened, neurons, geometry, generic)


def _sweep(setup: _Setup, behaviour: str, spec: Mapping, neurons: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """One behaviour's sweep of ``neurons`` and its search record (:func:`search_record` form)."""
    o, m, opened = setup.options, setup.options.model, setup.opened
    rollouts = BehaviourRollouts(opened.model, opened.tokenizer, opened.adapter, setup.judge, behaviour, spec,
                                 setup.swept[behaviour], behaviour_horizons(spec, o), m.chat_template, m.system_prompt,
                                 o.row_batch_size)
    frame, record = sweep_behaviour_search(rollouts, neurons, setup.geometry, o.x_grid, behaviour_horizons(spec, o),
                                           o.search)
    searched = search_record(record, rollouts, len(setup.swept[behaviour]))
    log.info("%s: %s search, %d rollouts of %d on the full grid (%.0f%%) in %d batched calls, %.1f s",
             behaviour, o.search, searched["n_rollouts"], searched["n_rollouts_full_grid"],
             100 * searched["rollout_ratio"], rollouts.n_calls, rollouts.seconds)
    return frame, searched


def run_window_sweep(
    manifest_path: str | Path,
    screen_scores: Mapping[str, str | Path],
    behaviour_prompts: Mapping[str, str | Path],
    generic_table: str | Path,
    behaviours: Mapping[str, Mapping],
    behaviour: str,
    shard: int,
    out_sweeps: str | Path,
    options: WindowOptions,
    threads: int | None = None,
) -> dict:
    """One sweep job (``window.shard_size > 0``): shard ``shard`` of ``behaviour``'s candidates
    (:func:`~neuronaudit.methods.window.candidate_block`) swept as the window job would sweep them,
    x = 0 included; writes the sweep rows with the job's search record, behaviour, shard and
    candidates in the table's provenance (an empty table past the last candidate). Returns the
    search record."""
    if behaviour not in behaviours:
        raise NeuronAuditError(f"window sweep: unknown behaviour {behaviour!r}; the study has {sorted(behaviours)}")
    if options.shard_size < 1:
        raise NeuronAuditError(f"window sweep jobs need window.shard_size >= 1, not {options.shard_size!r}")
    setup = _setup(manifest_path, screen_scores, behaviour_prompts, generic_table, behaviours, options, threads,
                   [behaviour])
    block = law.candidate_block(setup.neurons, behaviour, shard, options.shard_size)
    n_prompts = len(setup.swept[behaviour])
    if block.empty:
        frame = pd.DataFrame()
        searched = {"search": options.search, "n_rollouts": 0, "n_rollouts_full_grid": 0, "rollout_ratio": None,
                    "n_rounds": 0, "rows_per_round": [], "seconds": 0.0, "visited_grid_indices": None}
    else:
        frame, searched = _sweep(setup, behaviour, behaviours[behaviour], block)
    searched["baseline_rollouts"] = 0 if block.empty else n_prompts
    prov = provenance(model_id=setup.opened.manifest.get("source"),
                      weight_sha256=setup.opened.manifest.get("weight_sha256"), dtype=setup.opened.dtype,
                      seed=options.seed,
                      behaviour=behaviour, shard=int(shard), shard_size=int(options.shard_size),
                      candidates=[[int(r.layer), int(r.neuron)] for r in block.itertuples()],
                      search_record=searched)
    write_table(pa.Table.from_pandas(frame, preserve_index=False), out_sweeps, prov)
    return searched


def _read_sweep_shards(paths, behaviours: Mapping, neurons: pd.DataFrame, shard_size: int):
    """The sweep jobs' tables merged per behaviour; every behaviour's shards must be there, in a
    run of one shard size, each holding the candidates this job picks for it."""
    by_behaviour: dict[str, dict[int, tuple]] = {}
    for path in paths:
        meta = read_provenance(path)
        b, k = meta.get("behaviour"), meta.get("shard")
        if b not in behaviours or k is None:
            raise NeuronAuditError(f"sweep shard {str(path)!r} names no behaviour of this study ({b!r})")
        if int(meta.get("shard_size", -1)) != shard_size:
            raise NeuronAuditError(f"sweep shard {str(path)!r} was swept with window.shard_size "
                                   f"{meta.get('shard_size')!r}, this run has {shard_size}")
        block = law.candidate_block(neurons, b, int(k), shard_size)
        if meta.get("candidates") != [[int(r.layer), int(r.neuron)] for r in block.itertuples()]:
            raise NeuronAuditError(f"sweep shard {str(path)!r} swept other candidates than this run picks for "
                                   f"{b!r} shard {k}: rerun its sweep job")
        by_behaviour.setdefault(b, {})[int(k)] = (read_table(path, "sweep shard"), meta["search_record"])
    frames, searched = [], {}
    for b in behaviours:
        shards = by_behaviour.get(b, {})
        if not shards or sorted(shards) != list(range(len(shards))):
            raise NeuronAuditError(f"behaviour {b!r}: sweep shards {sorted(shards)} given, need 0..n-1")
        frame, record = law.merge_sweep_shards([shards[k][0] for k in sorted(shards)],
                                               [shards[k][1] for k in sorted(shards)])
        frames.append(frame)
        searched[b] = record
    return frames, searched


def _recorded_search(rows: pd.DataFrame, n_candidates: int, n_grid: int, search: str) -> dict:
    """A behaviour's search record (:func:`search_record` form) counted from its recorded sweep rows,
    where the recording kept none: rollouts done and on the full grid; rounds and time unknown."""
    first = rows[rows["horizon"] == rows["horizon"].min()]
    n_prompts = int(first["prompt_id"].nunique())
    done = int(len(first))
    full = (1 + 2 * n_grid * n_candidates) * n_prompts
    return {"search": search, "n_rollouts": done, "n_rollouts_full_grid": full,
            "rollout_ratio": done / full if full else None, "n_rounds": None, "rows_per_round": None,
            "seconds": None, "visited_grid_indices": None,
            "note": "counted from the recorded sweep table (its recording kept no search record)"}


def _read_recorded_sweeps(path, behaviours: Mapping, neurons: pd.DataFrame, swept: Mapping, o: WindowOptions):
    """A finished window's sweep table (``window/sweeps.parquet``) read back instead of rolled out:
    every behaviour's rows, each swept over the candidates this run picks, on its prompts, with this
    run's dose grid, horizons and search; the search records from the table's provenance, else from
    the ``summary.json`` beside it, else counted from the rows."""
    meta = read_provenance(path)
    sweeps = read_table(path, "recorded sweep table")
    where = f"recorded sweep table {str(path)!r}"
    settings = {"x_grid": (float, list(o.x_grid)), "horizons": (int, list(o.horizons)), "search": (str, o.search)}
    for name, (kind, mine) in settings.items():
        theirs = meta.get(name)
        same = theirs == mine if kind is str else [kind(t) for t in theirs or []] == [kind(m) for m in mine]
        if theirs is not None and not same:
            raise NeuronAuditError(f"{where} was swept with window.{name} {theirs!r}, this run has {mine!r}")
    records = meta.get("search_records") or {}
    summary_path = Path(path).with_name("summary.json")
    if not records and summary_path.is_file():
        records = (json.loads(summary_path.read_text()).get("dose_search") or {}).get("by_behaviour") or {}
    frames, searched = [], {}
    for b in behaviours:
        rows = sweeps[sweeps["behaviour"] == b]
        own = neurons[neurons["behaviour"] == b]
        if rows.empty:
            raise NeuronAuditError(f"{where} has no rows of behaviour {b!r}")
        dosed = rows[rows["kind"] != "baseline"]
        recorded = set(zip(dosed["layer"].astype(int), dosed["neuron"].astype(int)))
        picked = set(zip(own["layer"].astype(int), own["neuron"].astype(int)))
        if recorded != picked:
            raise NeuronAuditError(f"{where} swept other candidates than this run picks for {b!r} "
                                   f"({len(recorded ^ picked)} differ): roll the sweeps out again")
        if set(rows["prompt_id"]) != set(swept[b]["prompt_id"]):
            raise NeuronAuditError(f"{where} swept other prompts than this run's {len(swept[b])} for {b!r}")
        frames.append(rows.reset_index(drop=True))
        searched[b] = records.get(b) or _recorded_search(rows, len(own), len({float(x) for x in o.x_grid}), o.search)
    return frames, searched


def run_window(
    manifest_path: str | Path,
    screen_scores: Mapping[str, str | Path],
    behaviour_prompts: Mapping[str, str | Path],
    generic_table: str | Path,
    behaviours: Mapping[str, Mapping],
    out_sweeps: str | Path,
    out_single_pass: str | Path,
    out_window: str | Path,
    out_summary: str | Path,
    options: WindowOptions,
    threads: int | None = None,
    sweep_shards: list[str | Path] | None = None,
    sweeps_from: str | Path | None = None,
) -> dict:
    """The whole control-window audit; writes sweeps, single-pass, window tables and summary.
    With ``sweep_shards`` (the tables of :func:`run_window_sweep` jobs) the sweeps are read and
    merged instead of rolled out here; with ``sweeps_from`` (a finished window's
    ``sweeps.parquet``, which may be ``out_sweeps`` itself) they are read back
    (:func:`_read_recorded_sweeps`): everything after the rollouts (the single pass, the tables, the
    summary) is computed again without rolling a dose out."""
    if sweep_shards and sweeps_from:
        raise NeuronAuditError("window: give sweep shards or a recorded sweep table (--sweeps-from), not both")
    if sweeps_from is not None and not Path(sweeps_from).is_file():
        raise NeuronAuditError(f"recorded sweep table {str(sweeps_from)!r} not found")
    setup = _setup(manifest_path, screen_scores, behaviour_prompts, generic_table, behaviours, options, threads,
                   list(behaviours))
    o, opened = setup.options, setup.opened
    model, tokenizer, adapter = opened.model, opened.tokenizer, opened.adapter
    neurons, geometry, swept, generic = setup.neurons, setup.geometry, setup.swept, setup.generic
    if sweeps_from is not None:
        frames, searched = _read_recorded_sweeps(sweeps_from, behaviours, neurons, swept, o)
    elif sweep_shards:
        frames, searched = _read_sweep_shards(sweep_shards, behaviours, neurons, o.shard_size)
    else:
        frames, searched = [], {}
        for behaviour, spec in behaviours.items():
            frame, searched[behaviour] = _sweep(setup, behaviour, spec, neurons[neurons["behaviour"] == behaviour])
            frames.append(frame)
    sweeps = pd.concat(frames, ignore_index=True)
    tokenizer.padding_side = "left"
    enc = tokenizer(generic, return_tensors="pt", padding=True, truncation=True, max_length=o.max_length)
    single = single_pass_sweep(model, adapter, enc, neurons, geometry, o.single_pass_grid)
    table, fitted = window_table(sweeps, single, neurons, geometry, o.horizons, adapter.n_layers, o.n_heldout,
                                 o.seed, n_boot=o.n_boot, x_grid=o.x_grid)
    summary = heldout_summary(table, fitted, o.n_boot, o.seed, n_layers=adapter.n_layers)
    summary["refusal_pivots"] = refusal_pivots(sweeps, table)
    # how the measured ceilings and verdicts move with the collapse thresholds x0.75 / x1.25
    summary["ceiling_threshold_sensitivity"] = ceiling_threshold_sensitivity(
        sweeps, RuleThresholds.from_dict(o.judge.thresholds), behaviours, swept, x_grid=o.x_grid)
    summary["n_neurons"] = int(len(neurons))
    summary.update(search_summary(o.search, searched, table))
    summary["sweeps_source"] = ("recorded sweep table (not rolled out again)" if sweeps_from is not None
                                else "sweep shards" if sweep_shards else "rolled out by this job")
    summary["seeds"] = {"split": o.seed, "bootstrap": o.seed, "random_controls": o.seed}
    summary["grid"] = {"x": list(o.x_grid), "single_pass_x": list(o.single_pass_grid),
                       "horizons": sorted({h for s in behaviours.values() for h in behaviour_horizons(s, o)}),
                       "horizons_by_behaviour": {b: behaviour_horizons(s, o) for b, s in behaviours.items()},
                       "prompts_per_behaviour": o.n_prompts}
    prov = provenance(model_id=opened.manifest.get("source"), weight_sha256=opened.manifest.get("weight_sha256"),
                      dtype=opened.dtype, hook_site=opened.manifest.get("hook_site"), seed=o.seed,
                      horizons=list(o.horizons), x_grid=list(o.x_grid), search=o.search,
                      positions=["last_prompt", "generated"],
                      behaviours=dict(behaviours), search_records=searched,
                      sweeps_from=None if sweeps_from is None else str(sweeps_from))
    write_table(pa.Table.from_pandas(sweeps, preserve_index=False), out_sweeps, prov)
    write_table(pa.Table.from_pandas(single, preserve_index=False), out_single_pass, prov)
    write_table(pa.Table.from_pandas(table, preserve_index=False), out_window, prov)
    write_json(json.loads(json.dumps(summary, default=lambda v: None if v is None else float(v))), out_summary)
    return summary
