"""The keystone stage: collected tables in, scores, stability, ablation curve and summary out
(the algorithm is :mod:`neuronaudit.methods.keystone`).

With ``keystone.shard_size: n`` the ablation curve's conditions (the baseline, then at every k the
keystone set, the set without outliers where measured and the random sets:
:func:`~neuronaudit.methods.keystone.ablation_conditions`) are measured ``n`` at a time by
:func:`run_keystone_part` jobs (part ``p``: conditions ``p·n … (p+1)·n − 1``; a part past the last
condition writes an empty table without loading the model), and :func:`run_keystone` with
``parts`` joins their rows into the one job's curve, after the scores and the stability, which
need no model. Every condition is measured as the one job measures it, so the tables are equal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa

from neuronaudit.config import ACCURACY_GROUPS, GENERIC_SET
from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.capability import DEFAULT_POSITIONS
from neuronaudit.interventions.capture import LastTokenTable
from neuronaudit.io import (
    RowCheckpoint,
    provenance,
    read_provenance,
    write_json,
    write_table,
)
from neuronaudit.methods.keystone import (
    STABILITY_SCHEMA,
    ablation_conditions,
    ablation_curve,
    condition_key,
    curve_schema,
    group_splits,
    group_stability,
    keystone_schema,
    keystone_scores,
    ranked_neurons,
    stability,
    summarise_curve,
    summarise_stability,
)
from neuronaudit.models.loading import read_manifest
from neuronaudit.options import KeystoneOptions
from neuronaudit.shards import k_values, keystone_shard_count
from neuronaudit.stages.common import (
    capability_load,
    open_model,
    part_of_run,
    read_prompts,
    read_table,
    resolve_batch_sizes,
    same_model,
    weights_dtype,
)

log = logging.getLogger("neuronaudit")


#: The texts of this group measure perplexity; the accuracy groups are answered.
#: The curve is measured on held-out prompts (the score saw every collected prompt's activations).
EVAL_SPLIT = "heldout"
MAX_LENGTH = 256


def _ranking(stats_by_group: Mapping[str, str | Path], o: KeystoneOptions):
    """The statistics tables, the scores and the ranked neurons (no model)."""
    stats = {g: read_table(p, "statistics table") for g, p in stats_by_group.items()}
    scores = keystone_scores(stats, o.outlier_multiple)
    return stats, scores, ranked_neurons(scores)


def _eval_prompts(prompt_tables: Mapping[str, str | Path], o: KeystoneOptions):
    """The generic texts and the accuracy groups' prompts the ablations are scored on."""
    cap = o.capability
    missing = [g for g in [GENERIC_SET, *ACCURACY_GROUPS] if g not in prompt_tables]
    if missing:
        raise NeuronAuditError(f"keystone evaluation needs prompt tables for {missing}")
    generic = read_prompts(prompt_tables[GENERIC_SET], EVAL_SPLIT, cap.max_texts)
    tasks = {g: read_prompts(prompt_tables[g], EVAL_SPLIT, cap.max_task_prompts) for g in ACCURACY_GROUPS}
    return generic, tasks


def _run_key(weight_hash, prompt_tables: Mapping[str, str | Path], o: KeystoneOptions) -> dict:
    """What the parts of one run share: the model, the settings and the evaluation prompts."""
    return {"weight_sha256": weight_hash, "options": o.to_dict(),
            "prompts": {g: read_provenance(prompt_tables[g]).get("prompt_set_hash")
                        for g in [GENERIC_SET, *ACCURACY_GROUPS]}}


def _measure_curve(manifest, ranked, generic, tasks, ks, o: KeystoneOptions, out_table, threads, loaded, progress,
                   only=None):
    """The ablation curve's rows (``only``: those positions of its conditions), measured on the
    model of ``manifest`` (or ``loaded``); returns them, the options with resolved batch sizes and
    the weights' dtype. A checkpoint beside ``out_table`` keeps the measured rows until it is written."""
    if loaded is None:
        opened = open_model(manifest, o.model, threads)
        model, tokenizer, adapter = opened.model, opened.tokenizer, opened.adapter
    else:
        model, tokenizer, adapter = loaded
    load = capability_load(o.capability.max_new_tokens, MAX_LENGTH)
    o = resolve_batch_sizes(model, adapter, o, {"capability.batch_size": load})
    cap = o.capability
    checkpoint = RowCheckpoint(Path(out_table).with_name(Path(out_table).name + ".partial.jsonl"))
    curve = ablation_curve(
        model, tokenizer, adapter, ranked, list(generic["text"]), tasks, k_values=ks,
        n_random=o.n_random, seed=o.seed, positions=DEFAULT_POSITIONS, progress=progress,
        checkpoint=checkpoint, chat_template=o.model.chat_template, system_prompt=o.model.system_prompt,
        max_new_tokens=cap.max_new_tokens, batch_size=cap.batch_size, max_length=MAX_LENGTH, only=only,
    )
    return curve, o, weights_dtype(model), checkpoint


def run_keystone(
    stats_by_group: Mapping[str, str | Path],
    last_token_by_group: Mapping[str, str | Path],
    prompt_tables: Mapping[str, str | Path],
    manifest: str | Path,
    out_scores: str | Path,
    out_curve: str | Path,
    out_summary_json: str | Path,
    out_stability: str | Path,
    options: KeystoneOptions,
    threads: int | None = None,
    loaded=None,
    progress=None,
    parts: list[str | Path] | None = None,
) -> dict:
    """Keystone audit end to end; writes the scores, stability and curve tables and the summary.

    ``stats_by_group`` / ``last_token_by_group``: collected tables per task group (the score
    and the stability use every group given). ``prompt_tables``: prepared prompt tables for
    :data:`GENERIC_SET` (perplexity texts) and :data:`ACCURACY_GROUPS` (answers), read on the
    held-out split and cut to ``capability.max_texts`` / ``capability.max_task_prompts``.
    ``loaded`` = ``(model, tokenizer, adapter)`` skips loading the manifest's model. ``parts``
    (the tables of :func:`run_keystone_part` jobs) joins their curve rows instead of loading the
    model.
    """
    o = options
    man = read_manifest(manifest)
    weight_hash = same_model([*stats_by_group.values(), *last_token_by_group.values()], man, "keystone")
    ks = k_values(o.k_max)
    stats, scores, ranked = _ranking(stats_by_group, o)
    # primary: the ranking score on disjoint halves of the task groups; secondary: random prompt halves
    stab = pd.concat([
        group_stability(stats, o.iou_k),
        stability({g: LastTokenTable(p) for g, p in last_token_by_group.items()}, o.iou_k, seed=o.seed,
                  n_splits=o.n_splits),
    ], ignore_index=True)
    generic, tasks = _eval_prompts(prompt_tables, o)
    checkpoint = None
    if parts is None:
        curve, o, dtype, checkpoint = _measure_curve(manifest, ranked, generic, tasks, ks, o, out_curve, threads,
                                                     loaded, progress)
    else:
        conditions, _ = ablation_conditions(ranked, ks, o.n_random, o.seed, int(man["n_neurons"]))
        curve, dtype = join_keystone_parts(parts, [condition_key(*c) for c in conditions],
                                           _run_key(weight_hash, prompt_tables, o))
    cap = o.capability
    first_prov = read_provenance(next(iter(stats_by_group.values())))
    prov = provenance(
        stage="keystone", method="keystone neurons (arXiv 2605.24846)", model_id=man.get("source"),
        weight_sha256=weight_hash, hook_site=first_prov.get("hook_site", man.get("hook_site")),
        dtype=dtype, groups=list(stats_by_group),
        group_hashes={g: read_provenance(p).get("prompt_set_hash") for g, p in stats_by_group.items()},
        stats_positions=first_prov.get("positions"), outlier_multiple=o.outlier_multiple, seed=o.seed,
        k_values=ks, n_random=o.n_random, iou_k=list(o.iou_k), n_splits=o.n_splits,
        stability_primary="task_groups: the ranking score (min over groups of all-token mean |a|) on two "
                          "disjoint halves of the task groups, every split",
        stability_secondary="prompt_halves: last-token |a| on random halves of every group's prompts",
        n_group_splits=len(group_splits(list(stats_by_group))), eval_split=EVAL_SPLIT,
        generic_set=GENERIC_SET, accuracy_groups=list(ACCURACY_GROUPS), n_texts=len(generic),
        n_task_prompts={g: len(t) for g, t in tasks.items()}, max_new_tokens=cap.max_new_tokens,
        ablation="scale 0", positions=list(DEFAULT_POSITIONS), chat_template=o.model.chat_template,
    )
    groups = list(stats_by_group)
    write_table(pa.Table.from_pandas(scores, schema=keystone_schema(groups), preserve_index=False), out_scores, prov)
    write_table(pa.Table.from_pandas(curve, schema=curve_schema(list(ACCURACY_GROUPS)), preserve_index=False),
                out_curve, prov)
    if checkpoint is not None:
        checkpoint.remove()
    write_table(pa.Table.from_pandas(stab, schema=STABILITY_SCHEMA, preserve_index=False), out_stability, prov)
    summary = keystone_summary(scores, ranked, stab, curve, ks, o.n_random, prov)
    write_json(summary, out_summary_json)
    return summary


def run_keystone_part(
    stats_by_group: Mapping[str, str | Path],
    prompt_tables: Mapping[str, str | Path],
    manifest: str | Path,
    shard: int,
    out_table: str | Path,
    options: KeystoneOptions,
    threads: int | None = None,
    loaded=None,
    progress=None,
) -> dict:
    """One job of a sharded ablation curve (``keystone.shard_size: n``): the curve rows of
    conditions ``shard·n … (shard+1)·n − 1`` of :func:`~neuronaudit.methods.keystone.ablation_conditions`,
    measured as :func:`run_keystone` measures them; the table's provenance names the run (model,
    settings, evaluation prompts) and the conditions. A part past the last condition (the count
    the workflow reads from the config is an upper bound) writes an empty table and loads no model.
    :func:`run_keystone` with ``parts`` joins the parts."""
    o = options
    n = o.shard_size
    if n < 1:
        raise NeuronAuditError(f"keystone part jobs need keystone.shard_size >= 1, not {n!r}")
    count = keystone_shard_count(o.k_max, o.n_random, n)
    if not 0 <= shard < count:
        raise NeuronAuditError(f"keystone part {shard} out of range: keystone.shard_size {n} makes {count} parts")
    man = read_manifest(manifest)
    weight_hash = same_model(list(stats_by_group.values()), man, "keystone")
    ks = k_values(o.k_max)
    _, _, ranked = _ranking(stats_by_group, o)
    generic, tasks = _eval_prompts(prompt_tables, o)
    conditions, _ = ablation_conditions(ranked, ks, o.n_random, o.seed, int(man["n_neurons"]))
    block = list(range(shard * n, min(len(conditions), (shard + 1) * n)))
    part = {"shard": int(shard), "shard_size": int(n), "n_conditions": len(conditions),
            "conditions": [condition_key(*conditions[i]) for i in block],
            "run": _run_key(weight_hash, prompt_tables, o)}
    groups = list(ACCURACY_GROUPS)
    if not block:
        write_table(curve_schema(groups).empty_table(), out_table, provenance(keystone_part={**part, "dtype": None}))
        log.info("keystone part %d: past the last of %d conditions, empty -> %s", shard, len(conditions), out_table)
        return {"n_conditions": 0}
    curve, _, dtype, checkpoint = _measure_curve(manifest, ranked, generic, tasks, ks, o, out_table, threads, loaded,
                                                 progress, only=block)
    write_table(pa.Table.from_pandas(curve, schema=curve_schema(groups), preserve_index=False), out_table,
                provenance(keystone_part={**part, "dtype": dtype}))
    checkpoint.remove()
    log.info("keystone part %d: %d of %d conditions -> %s", shard, len(block), len(conditions), out_table)
    return {"n_conditions": len(block)}


def join_keystone_parts(paths: list[str | Path], expected: list[str], run: dict) -> tuple[pd.DataFrame, str]:
    """The curve rows of :func:`run_keystone_part` tables in the order of ``expected`` (the run's
    condition keys), and the weights' dtype they were measured in. Refuses a table that is not a
    part, a part of another run (model, settings or evaluation prompts differ), parts measured in
    different dtypes, and conditions missing, repeated or not of this run."""
    if not paths:
        raise NeuronAuditError("no keystone part tables to join")
    frames, dtypes = [], set()
    for path in paths:
        part = part_of_run(path, "keystone_part", run, "keystone")
        table = read_table(path, "keystone part")
        keys = [condition_key(r.k, r.kind, r.replicate, json.loads(r.neurons)) for r in table.itertuples()]
        if keys != part["conditions"]:
            raise NeuronAuditError(f"keystone part {path} holds other rows than its provenance names")
        if keys:
            dtypes.add(part["dtype"])
        frames.append(table.assign(_key=keys, _path=str(path)))
    rows = pd.concat(frames, ignore_index=True)
    repeated = rows[rows["_key"].duplicated(keep=False)]
    if len(repeated):
        raise NeuronAuditError(f"keystone condition {repeated['_key'].iloc[0]} is in more than one part table: "
                               f"{', '.join(repeated['_path'].unique())}")
    foreign = rows[~rows["_key"].isin(set(expected))]
    if len(foreign):
        raise NeuronAuditError(f"keystone part {foreign['_path'].iloc[0]} holds condition {foreign['_key'].iloc[0]}, "
                               f"not one of this run's")
    missing = [k for k in expected if k not in set(rows["_key"])]
    if missing:
        raise NeuronAuditError(f"the keystone parts hold {len(rows)} of the run's {len(expected)} conditions; "
                               f"missing {missing[0]}: rerun the keystone_part jobs")
    if len(dtypes) > 1:
        raise NeuronAuditError(f"the keystone parts were measured in different dtypes {sorted(dtypes)}")
    curve = rows.set_index("_key").loc[expected].reset_index(drop=True)
    return curve[list(curve_schema(list(ACCURACY_GROUPS)).names)], dtypes.pop()


def keystone_summary(scores, ranked, stab, curve, ks, n_random, prov) -> dict:
    top = ranked.head(max(ks))
    return {
        "provenance": prov,
        "n_neurons_total": len(scores),
        "k_max_fraction_of_neurons": max(ks) / len(scores),
        "n_super_weight_outliers": int(scores["super_weight_outlier"].sum()),
        "n_outliers_in_top_k_max": int(top["super_weight_outlier"].sum()),
        "top_neurons": [
            {"rank": int(r.rank), "layer": int(r.layer), "neuron": int(r.neuron), "score_min": float(r.score_min),
             "score_mean": float(r.score_mean), "max_abs_ratio": float(r.max_abs_ratio),
             "super_weight_outlier": bool(r.super_weight_outlier)}
            for r in top.head(20).itertuples()
        ],
        "stability": summarise_stability(stab),
        "curve": summarise_curve(curve, list(ACCURACY_GROUPS), n_random),
    }
