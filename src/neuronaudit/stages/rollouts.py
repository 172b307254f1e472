"""The rollouts stage: prompt tables in, typed rollouts, type fractions and first horizons out
(the algorithms are in :mod:`neuronaudit.evaluation.rollouts`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.rollouts import (
    DEFAULT_HORIZONS,
    FIRST_HORIZON_SCHEMA,
    FRACTION_SCHEMA,
    GREEDY,
    HARMLESS_SETS,
    _table,
    edit_spec,
    first_horizon,
    generate_rollouts,
    parse_horizons,
    parse_interventions,
    parse_sampling,
    rollouts_table,
    type_fractions,
    type_rollouts,
)

log = logging.getLogger("neuronaudit")


def run_rollouts(
    manifest_path: str | Path,
    prompt_tables: Mapping[str, str | Path],
    split: str,
    interventions: str | Path | Mapping,
    horizons: Iterable[int] = DEFAULT_HORIZONS,
    sampling: Iterable = (GREEDY,),
    judge_config: Mapping | None = None,
    out_rollouts: str | Path = "rollouts.parquet",
    out_fractions: str | Path = "rollout_fractions.parquet",
    dtype: str = "float32",
    device: str = "cpu",
    batch_size: int = 8,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n_boot: int = 1000,
    harmless_sets: Iterable[str] = HARMLESS_SETS,
    out_first_horizon: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate, type and summarise rollouts; write Parquet tables atomically with provenance.

    ``prompt_tables`` maps a prompt-set name to a prepared prompt table; ``split`` selects
    ``discovery`` / ``heldout`` / ``all``; ``limit`` keeps the first ``limit`` prompts of each
    set. ``interventions`` is a JSON path or dict (see :func:`parse_interventions`).
    ``seed`` seeds the bootstrap; sampled passes carry their own seeds in ``sampling``.
    Everything is validated (judge config, interventions, horizons, sampling, prompt tables)
    before the model is loaded. Returns a small summary dict.
    """
    from neuronaudit.evaluation.judge import make_judge
    from neuronaudit.io import provenance, write_table
    from neuronaudit.models.loading import load_prepared
    from neuronaudit.prompts import read_prompt_table

    judge = make_judge(judge_config)
    edits = parse_interventions(interventions)
    hs = parse_horizons(horizons)
    samples = parse_sampling(sampling)
    if limit is not None and int(limit) < 1:
        raise NeuronAuditError(f"limit {limit!r} must be a positive integer or null")
    if not prompt_tables:
        raise NeuronAuditError("no prompt tables given for the rollouts")
    frames, prompt_prov = [], {}
    for name, path in prompt_tables.items():
        if not Path(path).is_file():
            raise NeuronAuditError(f"prompt table {str(path)!r} of set {name!r} not found")
        p = read_prompt_table(path, split=split)
        if limit is not None:
            p = p.head(int(limit))
        if len(p) == 0:
            raise NeuronAuditError(f"prompt table {str(path)!r} has no prompts in split {split!r}")
        prompt_prov[name] = {"path": str(path), "hash": p.attrs.get("prompt_set_hash"), "n": len(p)}
        frames.append(p.assign(prompt_set=name)[["prompt_set", "prompt_id", "text"]])
    prompts = pd.concat(frames, ignore_index=True)
    if threads:
        torch.set_num_threads(int(threads))
    model, tokenizer, adapter, manifest = load_prepared(manifest_path, dtype, device)
    t0 = time.perf_counter()
    df = generate_rollouts(
        model, tokenizer, adapter, prompts, edits, hs, samples, temperature=temperature, top_p=top_p,
        top_k=top_k, batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    typed = type_rollouts(df, judge, harmless_sets)
    fractions = type_fractions(typed, n_boot=n_boot, seed=seed)
    prov = provenance(
        model_id=manifest.get("source"), model_path=manifest.get("path"),
        weight_sha256=manifest.get("weight_sha256"), tuned_from=manifest.get("tuned_from"),
        dtype=dtype, device=str(next(model.parameters()).device), hook_site=manifest.get("hook_site"),
        prompt_sets=prompt_prov, split=split, limit=limit, chat_template=chat_template,
        system_prompt=system_prompt, horizons=list(hs), sampling=[list(s) for s in samples],
        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
        interventions={n: json.loads(edit_spec(e)) for n, e in edits.items()},
        judge=getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
        seed=seed, n_boot=n_boot, generation_seconds=round(seconds, 2),
        harmless_sets=list(harmless_sets),
    )
    write_table(rollouts_table(typed), out_rollouts, prov)
    write_table(_table(fractions, FRACTION_SCHEMA), out_fractions, prov)
    if out_first_horizon is not None:
        write_table(_table(first_horizon(typed), FIRST_HORIZON_SCHEMA), out_first_horizon, prov)
    summary = {
        "n_rollouts": int(len(typed)),
        "seconds": seconds,
        "type_counts": {str(k): int(v) for k, v in typed["rollout_type"].value_counts().items()},
    }
    log.info("rollouts: %d rows in %.1f s -> %s", len(typed), seconds, out_rollouts)
    return summary

