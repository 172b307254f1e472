"""The keystone stage: collected tables in, scores, stability, ablation curve and summary out
(the algorithm is :mod:`neuronaudit.methods.keystone`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.capability import DEFAULT_POSITIONS
from neuronaudit.io import provenance, read_provenance, write_json, write_table
from neuronaudit.methods.keystone import (
    STABILITY_SCHEMA,
    ablation_curve,
    curve_schema,
    keystone_schema,
    keystone_scores,
    ranked_neurons,
    stability,
    summarise_curve,
    summarise_stability,
)

log = logging.getLogger("neuronaudit")


def _check_same_model(paths: Iterable[str | Path], manifest: dict | None) -> str | None:
    hashes = {read_provenance(p).get("weight_sha256") for p in paths}
    hashes.discard(None)
    if manifest is not None and manifest.get("weight_sha256"):
        hashes.add(manifest["weight_sha256"])
    if len(hashes) > 1:
        raise NeuronAuditError(f"keystone inputs come from different models (weight hashes {sorted(hashes)})")
    return next(iter(hashes), None)


def _eval_prompts(path: str | Path, split: str, limit: int | None) -> pd.DataFrame:
    from neuronaudit.prompts import read_prompt_table

    df = read_prompt_table(path, split=split)
    if limit is not None:
        df = df.head(int(limit)).reset_index(drop=True)
    if len(df) == 0:
        raise NeuronAuditError(f"prompt table {str(path)!r} has no prompts in split {split!r}")
    return df


def run_keystone(
    stats_by_group: Mapping[str, str | Path],
    last_token_by_group: Mapping[str, str | Path],
    prompt_tables: Mapping[str, str | Path],
    manifest: str | Path,
    out_scores: str | Path,
    out_curve: str | Path,
    out_summary_json: str | Path,
    k_max: int = 32,
    k_values: Sequence[int] | None = None,
    n_random: int = 3,
    seed: int = 0,
    outlier_multiple: float = 50.0,
    iou_k: Sequence[int] = (8, 16, 32, 64, 128),
    n_splits: int = 5,
    generic_set: str = "generic",
    accuracy_groups: Sequence[str] = ("task_knowledge", "task_arithmetic"),
    eval_split: str = "heldout",
    max_texts: int | None = None,
    max_task_prompts: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    max_length: int = 256,
    dtype: str = "float32",
    device: str = "cpu",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    positions: Sequence[str] = DEFAULT_POSITIONS,
    out_stability: str | Path | None = None,
    loaded=None,
    progress=None,
) -> dict:
    """Keystone audit end to end; writes the scores table, the ablation curve and the summary.

    ``stats_by_group`` / ``last_token_by_group``: collected tables per task group (the score
    and the stability use every group given). ``prompt_tables``: prepared prompt tables for
    ``generic_set`` (perplexity texts) and ``accuracy_groups`` (answers), read on ``eval_split``
    and cut to ``max_texts`` / ``max_task_prompts``. ``k_values`` defaults to powers of two up to
    ``k_max`` (and ``k_max`` itself). ``out_stability`` (optional) gets the per-split IoU table.
    ``loaded`` = ``(model, tokenizer, adapter)`` skips loading the manifest's model.
    Returns the summary dict.
    """
    from neuronaudit.models.loading import load_prepared, read_manifest

    man = read_manifest(manifest)
    weight_hash = _check_same_model([*stats_by_group.values(), *last_token_by_group.values()], man)
    if k_values is None:
        if k_max < 1:
            raise NeuronAuditError(f"k_max {k_max!r} must be at least 1")
        k_values = [2**i for i in range(int(math.log2(k_max)) + 1)] + [int(k_max)]
    k_values = sorted({int(k) for k in k_values})
    scores = keystone_scores(stats_by_group, outlier_multiple)
    groups = list(stats_by_group)
    stab = stability(last_token_by_group, iou_k, seed=seed, n_splits=n_splits)
    ranked = ranked_neurons(scores)

    missing = [g for g in [generic_set, *accuracy_groups] if g not in prompt_tables]
    if missing:
        raise NeuronAuditError(f"keystone evaluation needs prompt tables for {missing}")
    generic = _eval_prompts(prompt_tables[generic_set], eval_split, max_texts)
    tasks = {g: _eval_prompts(prompt_tables[g], eval_split, max_task_prompts) for g in accuracy_groups}
    if loaded is None:
        model, tokenizer, adapter, _ = load_prepared(manifest, dtype, device)
    else:
        model, tokenizer, adapter = loaded
    curve = ablation_curve(
        model, tokenizer, adapter, ranked, list(generic["text"]), tasks, k_values=k_values,
        n_random=n_random, seed=seed, positions=positions, progress=progress,
        checkpoint=Path(out_curve).with_name(Path(out_curve).name + ".partial.jsonl"),
        chat_template=chat_template, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
        batch_size=batch_size, max_length=max_length,
    )
    first_prov = read_provenance(next(iter(stats_by_group.values())))
    prov = provenance(
        stage="keystone",
        method="keystone neurons (arXiv 2605.24846)",
        model_id=man.get("source"),
        weight_sha256=weight_hash,
        hook_site=first_prov.get("hook_site", man.get("hook_site")),
        dtype=dtype,
        groups=groups,
        group_hashes={g: read_provenance(p).get("prompt_set_hash") for g, p in stats_by_group.items()},
        stats_positions=first_prov.get("positions"),
        outlier_multiple=outlier_multiple,
        seed=seed,
        k_values=k_values,
        n_random=n_random,
        iou_k=list(iou_k),
        n_splits=n_splits,
        eval_split=eval_split,
        generic_set=generic_set,
        accuracy_groups=list(accuracy_groups),
        n_texts=len(generic),
        n_task_prompts={g: len(t) for g, t in tasks.items()},
        max_new_tokens=max_new_tokens,
        ablation="scale 0",
        positions=list(positions),
        chat_template=chat_template,
    )
    write_table(pa.Table.from_pandas(scores, schema=keystone_schema(groups), preserve_index=False), out_scores, prov)
    write_table(pa.Table.from_pandas(curve, schema=curve_schema(list(accuracy_groups)), preserve_index=False), out_curve, prov)
    Path(out_curve).with_name(Path(out_curve).name + ".partial.jsonl").unlink(missing_ok=True)
    if out_stability is not None:
        write_table(pa.Table.from_pandas(stab, schema=STABILITY_SCHEMA, preserve_index=False), out_stability, prov)
    top = ranked.head(max(k_values))
    n_total = len(scores)
    summary = {
        "provenance": prov,
        "n_neurons_total": n_total,
        "k_max_fraction_of_neurons": max(k_values) / n_total,
        "n_super_weight_outliers": int(scores["super_weight_outlier"].sum()),
        "n_outliers_in_top_k_max": int(top["super_weight_outlier"].sum()),
        "top_neurons": [
            {"rank": int(r.rank), "layer": int(r.layer), "neuron": int(r.neuron), "score_min": float(r.score_min),
             "score_mean": float(r.score_mean), "max_abs_ratio": float(r.max_abs_ratio),
             "super_weight_outlier": bool(r.super_weight_outlier)}
            for r in top.head(20).itertuples()
        ],
        "stability": summarise_stability(stab),
        "curve": summarise_curve(curve, list(accuracy_groups), n_random),
    }
    write_json(summary, out_summary_json)
    return summary

