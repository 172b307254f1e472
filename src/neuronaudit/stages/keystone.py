"""The keystone stage: collected tables in, scores, stability, ablation curve and summary out
(the algorithm is :mod:`neuronaudit.methods.keystone`)."""

from __future__ import annotations

import logging
import math
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
    ablation_curve,
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
from neuronaudit.stages.common import (
    capability_load,
    open_model,
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


def k_values(k_max: int) -> list[int]:
    """Powers of two up to ``k_max``, and ``k_max`` itself."""
    if k_max < 1:
        raise NeuronAuditError(f"keystone.k_max {k_max!r} must be at least 1")
    return sorted({2**i for i in range(int(math.log2(k_max)) + 1)} | {int(k_max)})


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
) -> dict:
    """Keystone audit end to end; writes the scores, stability and curve tables and the summary.

    ``stats_by_group`` / ``last_token_by_group``: collected tables per task group (the score
    and the stability use every group given). ``prompt_tables``: prepared prompt tables for
    :data:`GENERIC_SET` (perplexity texts) and :data:`ACCURACY_GROUPS` (answers), read on the
    held-out split and cut to ``capability.max_texts`` / ``capability.max_task_prompts``.
    ``loaded`` = ``(model, tokenizer, adapter)`` skips loading the manifest's model.
    """
    o, cap = options, options.capability
    man = read_manifest(manifest)
    weight_hash = same_model([*stats_by_group.values(), *last_token_by_group.values()], man, "keystone")
    ks = k_values(o.k_max)
    stats = {g: read_table(p, "statistics table") for g, p in stats_by_group.items()}
    scores = keystone_scores(stats, o.outlier_multiple)
    # primary: the ranking score on disjoint halves of the task groups; secondary: random prompt halves
    stab = pd.concat([
        group_stability(stats, o.iou_k),
        stability({g: LastTokenTable(p) for g, p in last_token_by_group.items()}, o.iou_k, seed=o.seed,
                  n_splits=o.n_splits),
    ], ignore_index=True)
    ranked = ranked_neurons(scores)
    missing = [g for g in [GENERIC_SET, *ACCURACY_GROUPS] if g not in prompt_tables]
    if missing:
        raise NeuronAuditError(f"keystone evaluation needs prompt tables for {missing}")
    generic = read_prompts(prompt_tables[GENERIC_SET], EVAL_SPLIT, cap.max_texts)
    tasks = {g: read_prompts(prompt_tables[g], EVAL_SPLIT, cap.max_task_prompts) for g in ACCURACY_GROUPS}
    if loaded is None:
        opened = open_model(manifest, o.model, threads)
        model, tokenizer, adapter = opened.model, opened.tokenizer, opened.adapter
    else:
        model, tokenizer, adapter = loaded
    load = capability_load(cap.max_new_tokens, MAX_LENGTH)
    o = resolve_batch_sizes(model, adapter, o, {"capability.batch_size": load})
    cap = o.capability
    checkpoint = RowCheckpoint(Path(out_curve).with_name(Path(out_curve).name + ".partial.jsonl"))
    curve = ablation_curve(
        model, tokenizer, adapter, ranked, list(generic["text"]), tasks, k_values=ks,
        n_random=o.n_random, seed=o.seed, positions=DEFAULT_POSITIONS, progress=progress,
        checkpoint=checkpoint, chat_template=o.model.chat_template, system_prompt=o.model.system_prompt,
        max_new_tokens=cap.max_new_tokens, batch_size=cap.batch_size, max_length=MAX_LENGTH,
    )
    first_prov = read_provenance(next(iter(stats_by_group.values())))
    prov = provenance(
        stage="keystone", method="keystone neurons (arXiv 2605.24846)", model_id=man.get("source"),
        weight_sha256=weight_hash, hook_site=first_prov.get("hook_site", man.get("hook_site")),
        dtype=weights_dtype(model), groups=list(stats_by_group),
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
    checkpoint.remove()
    write_table(pa.Table.from_pandas(stab, schema=STABILITY_SCHEMA, preserve_index=False), out_stability, prov)
    summary = keystone_summary(scores, ranked, stab, curve, ks, o.n_random, prov)
    write_json(summary, out_summary_json)
    return summary


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
