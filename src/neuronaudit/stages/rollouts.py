"""The rollouts stage: prompt tables in, typed rollouts, type fractions and first horizons out
(the algorithms are in :mod:`neuronaudit.evaluation.rollouts`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.judge import make_judge
from neuronaudit.evaluation.rollouts import (
    FIRST_HORIZON_SCHEMA,
    FRACTION_SCHEMA,
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
from neuronaudit.io import provenance, write_table
from neuronaudit.options import RolloutOptions
from neuronaudit.stages.common import OpenedModel, open_model, read_prompts, resolve_batch_sizes, rollout_load

log = logging.getLogger("neuronaudit")


#: Bootstrap resamples of the type fractions (over prompts).
N_BOOT = 1000


def run_rollouts(
    manifest_path: str | Path,
    prompt_tables: Mapping[str, str | Path],
    split: str,
    interventions: str | Path | Mapping,
    out_rollouts: str | Path,
    out_fractions: str | Path,
    out_first_horizon: str | Path | None,
    options: RolloutOptions,
    threads: int | None = None,
    *,
    horizons: Sequence[int] | None = None,
    harmless_sets: Iterable[str] = HARMLESS_SETS,
    opened: OpenedModel | None = None,
    progress: bool = True,
) -> dict:
    """Generate, type and summarise rollouts; write Parquet tables atomically with provenance.

    ``prompt_tables`` maps a prompt-set name to a prepared prompt table; ``split`` selects
    ``discovery`` / ``heldout`` / ``all``; ``rollouts.prompts_per_set`` keeps the first prompts of
    each set. ``interventions`` is a JSON path or dict (see :func:`parse_interventions`).
    ``horizons`` overrides ``rollouts.horizons`` (the CNA stage reads one horizon). ``seed``
    seeds the bootstrap; sampled passes carry their own seeds in ``sampling``. Everything is
    validated (judge config, interventions, horizons, sampling, prompt tables) before the model is
    loaded; ``opened`` reuses a model the caller has loaded already. Returns a small summary dict.
    """
    o, m = options, options.model
    judge = make_judge(o.judge.judge_config())
    edits = parse_interventions(interventions)
    hs = parse_horizons(o.horizons if horizons is None else horizons)
    samples = parse_sampling(o.sampling)
    limit = o.prompts_per_set
    if limit is not None and int(limit) < 1:
        raise NeuronAuditError(f"rollouts.prompts_per_set {limit!r} must be a positive integer or null")
    if not prompt_tables:
        raise NeuronAuditError("no prompt tables given for the rollouts")
    frames, prompt_prov = [], {}
    for name, path in prompt_tables.items():
        p = read_prompts(path, split, limit, role=f"prompt table of set {name!r}")
        prompt_prov[name] = {"path": str(path), "hash": p.attrs.get("prompt_set_hash"), "n": len(p)}
        frames.append(p.assign(prompt_set=name)[["prompt_set", "prompt_id", "text"]])
    prompts = pd.concat(frames, ignore_index=True)
    opened = opened or open_model(manifest_path, m, threads)
    o = resolve_batch_sizes(opened.model, opened.adapter, o, {"rollouts.batch_size": rollout_load(max(hs))})
    t0 = time.perf_counter()
    df = generate_rollouts(
        opened.model, opened.tokenizer, opened.adapter, prompts, edits, hs, samples, temperature=o.temperature,
        top_p=o.top_p, top_k=0, batch_size=o.batch_size, chat_template=m.chat_template,
        system_prompt=m.system_prompt, progress=progress,
    )
    seconds = time.perf_counter() - t0
    typed = type_rollouts(df, judge, harmless_sets)
    fractions = type_fractions(typed, n_boot=N_BOOT, seed=o.seed)
    prov = provenance(
        **opened.provenance(), model_path=opened.manifest.get("path"), prompt_sets=prompt_prov, split=split,
        prompts_per_set=limit, horizons=list(hs), sampling=[list(s) for s in samples], temperature=o.temperature,
        top_p=o.top_p, top_k=0, batch_size=o.batch_size,
        interventions={n: json.loads(edit_spec(e)) for n, e in edits.items()},
        judge=getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
        seed=o.seed, n_boot=N_BOOT, generation_seconds=round(seconds, 2), harmless_sets=list(harmless_sets),
    )
    write_table(rollouts_table(typed), out_rollouts, prov)
    write_table(_table(fractions, FRACTION_SCHEMA), out_fractions, prov)
    if out_first_horizon is not None:
        write_table(_table(first_horizon(typed), FIRST_HORIZON_SCHEMA), out_first_horizon, prov)
    log.info("rollouts: %d rows in %.1f s -> %s", len(typed), seconds, out_rollouts)
    return {
        "n_rollouts": int(len(typed)),
        "seconds": seconds,
        "type_counts": {str(k): int(v) for k, v in typed["rollout_type"].value_counts().items()},
    }
