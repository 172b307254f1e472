"""The rollouts stage: prompt tables in, typed rollouts, type fractions and first horizons out
(the algorithms are in :mod:`neuronaudit.evaluation.rollouts`).

With ``rollouts.shard_size: n`` a job rolls out one shard (``shard=k``: rows ``k·n … (k+1)·n − 1``
of the prompts, every set's selected prompts one after another in table order) and writes its
typed rollouts only; :func:`run_merge_rollouts` joins the shards into the table one job writes and
computes the type fractions and first horizons from it (the bootstrap over every prompt, as one
job does). Sampled rows draw from their own streams, so the joined table equals the one-job
table.
"""

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
from neuronaudit.io import provenance, read_provenance, write_table
from neuronaudit.options import RolloutOptions
from neuronaudit.shards import shard_rows
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
    shard: int | None = None,
    extra_provenance: Mapping | None = None,
    add_reference: bool = True,
) -> dict:
    """Generate, type and summarise rollouts; write Parquet tables atomically with provenance.

    ``prompt_tables`` maps a prompt-set name to a prepared prompt table; ``split`` selects
    ``discovery`` / ``heldout`` / ``all``; ``rollouts.prompts_per_set`` keeps the first prompts of
    each set. ``interventions`` is a JSON path or dict (see :func:`parse_interventions`).
    ``horizons`` overrides ``rollouts.horizons`` (the CNA stage reads one horizon). ``seed``
    seeds the bootstrap; sampled passes carry their own seeds in ``sampling``. Everything is
    validated (judge config, interventions, horizons, sampling, prompt tables) before the model is
    loaded; ``opened`` reuses a model the caller has loaded already. ``shard`` rolls out one shard
    of ``rollouts.shard_size`` prompts and writes only ``out_rollouts`` (joined by
    :func:`run_merge_rollouts`), as does ``out_fractions`` None. ``extra_provenance`` is added to the
    tables' provenance; ``add_reference`` false rolls out the given interventions only, without
    adding the unsteered ``none``. Returns a small summary dict.
    """
    o, m = options, options.model
    judge = make_judge(o.judge.judge_config())
    edits = parse_interventions(interventions, add_reference)
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
    n_all = len(prompts)
    if shard is not None:
        prompts = prompts.iloc[list(shard_rows(n_all, o.shard_size, shard))].reset_index(drop=True)
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
    prov = provenance(
        **opened.provenance(), model_path=opened.manifest.get("path"), prompt_sets=prompt_prov, split=split,
        prompts_per_set=limit, horizons=list(hs), sampling=[list(s) for s in samples], temperature=o.temperature,
        top_p=o.top_p, top_k=0, batch_size=o.batch_size,
        interventions={n: json.loads(edit_spec(e)) for n, e in edits.items()},
        judge=getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
        seed=o.seed, n_boot=N_BOOT, generation_seconds=round(seconds, 2), harmless_sets=list(harmless_sets),
        shard=shard, shard_size=o.shard_size if shard is not None else None,
        shard_prompts=[f"{a}/{b}" for a, b in zip(prompts["prompt_set"], prompts["prompt_id"])]
        if shard is not None else None, n_prompts=n_all, **(extra_provenance or {}),
    )
    write_table(rollouts_table(typed), out_rollouts, prov)
    if shard is None and out_fractions is not None:
        write_summaries(typed, out_fractions, out_first_horizon, prov, o.seed)
    log.info("rollouts: %d rows in %.1f s -> %s", len(typed), seconds, out_rollouts)
    return {
        "n_rollouts": int(len(typed)),
        "seconds": seconds,
        "type_counts": {str(k): int(v) for k, v in typed["rollout_type"].value_counts().items()},
    }


def write_summaries(typed: pd.DataFrame, out_fractions, out_first_horizon, prov: Mapping, seed: int) -> None:
    """The type fractions (bootstrap over prompts) and first horizons of a typed rollout table."""
    write_table(_table(type_fractions(typed, n_boot=N_BOOT, seed=seed), FRACTION_SCHEMA), out_fractions, prov)
    if out_first_horizon is not None:
        write_table(_table(first_horizon(typed), FIRST_HORIZON_SCHEMA), out_first_horizon, prov)


#: Provenance keys that differ between the shards of one rollout run.
_PER_SHARD = ("shard", "shard_prompts", "generation_seconds")


def read_rollout_shards(shard_paths: Sequence[str | Path], what: str = "rollout") -> tuple[pd.DataFrame, list, dict]:
    """The typed rows of one run's rollout shards, shard after shard, their provenances, and the
    provenance they share. The shards must be shards 0 … n − 1 in order, of one run: their
    provenance agrees on everything but the shard, its prompts and its generation time."""
    if not shard_paths:
        raise NeuronAuditError(f"no {what} shards to merge")
    provs = [read_provenance(p) for p in shard_paths]
    first = provs[0]
    if first.get("shard") is None:
        raise NeuronAuditError(f"{shard_paths[0]} is not a {what} shard (its provenance has no shard)")
    shards = [p.get("shard") for p in provs]
    if shards != list(range(len(shard_paths))):
        raise NeuronAuditError(f"{what} shards {shards} given; expected 0 … {len(shard_paths) - 1} in order")
    same = {k: v for k, v in first.items() if k not in _PER_SHARD}
    for path, prov in zip(shard_paths, provs):
        differs = sorted(k for k in set(same) | set(prov) if k not in _PER_SHARD and prov.get(k) != same.get(k))
        if differs:
            raise NeuronAuditError(f"{what} shard {path} is not from the same run as {shard_paths[0]}: "
                                   f"{', '.join(differs)} differ")
    return read_rollout_tables(shard_paths), provs, same


def read_rollout_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The typed rows of rollout tables, one table after another, with the dtypes of a typed frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p).replace_schema_metadata(None) for p in paths])
    typed = table.to_pandas()
    typed["sample_seed"] = typed["sample_seed"].astype("Int64")
    typed["over_refusal"] = typed["over_refusal"].astype("boolean")
    return typed


def run_merge_rollouts(shard_paths: Sequence[str | Path], out_rollouts, out_fractions, out_first_horizon) -> dict:
    """Join the rollout shards of one run (``run_rollouts(..., shard=k)``, in shard order) into the
    tables one job writes: rollouts in the one-job row order, type fractions and first horizons.

    The shards must be one run's: shards 0 … n − 1 of the same shard size, whose prompts together
    are the run's prompts once each, and whose provenance agrees on everything else (model,
    prompt sets, interventions, decoding, judge, seed)."""
    typed, provs, same = read_rollout_shards(shard_paths)
    first = provs[0]
    prompts = [key for p in provs for key in p["shard_prompts"]]  # "<prompt set>/<prompt id>"
    if len(prompts) != first["n_prompts"] or len(set(prompts)) != len(prompts):
        raise NeuronAuditError(f"the rollout shards hold {len(prompts)} prompts ({len(set(prompts))} distinct); "
                               f"the run has {first['n_prompts']}")
    # the one-job order: by sample, then the prompts' order (shard after shard), intervention, horizon
    typed = typed.sort_values("sample", kind="stable").reset_index(drop=True)
    prov = {**same, "shard": None, "shard_prompts": None, "shards": len(shard_paths),
            "generation_seconds": round(sum(p.get("generation_seconds") or 0.0 for p in provs), 2)}
    write_table(rollouts_table(typed), out_rollouts, prov)
    write_summaries(typed, out_fractions, out_first_horizon, prov, int(first["seed"]))
    log.info("merged %d rollout shards: %d rows -> %s", len(shard_paths), len(typed), out_rollouts)
    return {"n_rollouts": int(len(typed)), "shards": len(shard_paths)}
