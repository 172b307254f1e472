"""Rollouts under interventions, read at several horizons, typed, and summarised with CIs.

SCIENCE.md section 1 measures a trigger "at rollout horizon τ (several τ, e.g. 16/32/64
tokens)" and a collapse ceiling from the coherence of rollouts; the published result is that
actionable refusal reach appears "only at later horizons". This module produces those rollouts:

* **One generation per rollout, read at every horizon.** Each (prompt, intervention, sample)
  row is generated once for ``max(horizons)`` new tokens with the KV cache on; the response at
  horizon ``h`` is the first ``h`` new tokens (fewer when the model stopped at EOS). Greedy
  decoding is prefix-consistent, so this equals a separate generation of ``h`` tokens
  (``tests/unit/test_rollouts.py`` checks it).
* **Interventions share a batch.** The rows of a batch are (prompt × intervention)
  combinations; :meth:`InterventionPlan.per_row` gives each row its own edits (the unsteered
  ``none`` row carries no edit), so a whole dose sweep on one prompt runs in one ``generate``.
  Prompts are left-padded; positions ``prompt`` / ``last_prompt`` / ``generated`` follow
  :mod:`neuronaudit.interventions`.
* **Sampling is seeded per row.** A sampled pass (``('sample', seed)``) gives each rollout its own
  random stream, seeded by ``(seed, prompt set, prompt id, intervention)``
  (:class:`~neuronaudit.interventions.generation.RowSeededSampling`, Gumbel-max after the
  temperature, top-k and top-p warpers), so the same call reproduces the same rollouts, a row's
  sample does not depend on the batch size, on out-of-memory splits or on how the prompts are
  split into shards, and the caller's RNG is untouched. Decoding uses an explicit
  :class:`~transformers.GenerationConfig` (temperature, top-p, top-k = 0 by default) rather than
  the model's stored one.
* **Coherence metrics per horizon** (:mod:`neuronaudit.evaluation.metrics`): 4-gram repetition ratio over
  the token ids, perplexity of the rollout under the unsteered model (one uncached forward over
  the longest horizon; shorter horizons are prefix means), the mean next-token entropy of the
  generating (steered) model read from its raw generation scores, and the unsteered model's
  entropy over the same tokens.

:func:`type_rollouts` types each rollout with a judge (:mod:`neuronaudit.evaluation.judge`) into
``refusal`` / ``collapse`` / ``coherent_bypass`` / ``actionable`` and flags over-refusal
(a refusal on a prompt of a harmless set; section "Related anchors": audit over-refusal too).
:func:`type_fractions` gives the fraction of each rollout type per (prompt set, intervention,
sampling, horizon) with a percentile bootstrap CI over prompts (≥ 1000 resamples, seed
recorded; section 1 "Error bars"); :func:`first_horizon` gives the first horizon at which each
type appears. The stage that reads prompt tables and writes these tables is
:func:`neuronaudit.stages.rollouts.run_rollouts`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from neuronaudit.errors import NeuronAuditError, NonFiniteError
from neuronaudit.evaluation.judge import ROLLOUT_TYPES
from neuronaudit.evaluation.metrics import (
    prefix_means,
    prefix_perplexity,
    repetition_ratio,
)
from neuronaudit.evaluation.stats import unit_bootstrap_means
from neuronaudit.interventions.generation import (
    encode_prompts,
    eos_ids,
    generate_tokens,
    pad_id,
    row_seed,
)
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks, ResidualEdit
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.interventions.scoring import rollout_scores

log = logging.getLogger("neuronaudit")

DEFAULT_HORIZONS: tuple[int, ...] = (16, 32, 64, 128)
GREEDY: tuple[str, None] = ("greedy", None)
HARMLESS_SETS: tuple[str, ...] = ("harmless",)

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("intervention", pa.string(), nullable=False),
        pa.field("intervention_spec", pa.string(), nullable=False),  # JSON list of NeuronEdit
        pa.field("sampling", pa.string(), nullable=False),  # greedy | sample
        pa.field("sample_seed", pa.int64(), nullable=True),  # null for greedy
        pa.field("sample", pa.string(), nullable=False),  # greedy | sample-<seed>
        pa.field("horizon", pa.int32(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),  # tokens in the response (≤ horizon)
        pa.field("stopped", pa.bool_(), nullable=False),  # EOS reached within the horizon
        pa.field("repetition_ratio", pa.float64(), nullable=False),
        pa.field("coherence", pa.float64(), nullable=False),
        pa.field("perplexity", pa.float64(), nullable=True),  # unsteered model; null if empty
        pa.field("entropy", pa.float64(), nullable=True),  # generating model
        pa.field("unsteered_entropy", pa.float64(), nullable=True),
        pa.field("rollout_type", pa.string(), nullable=False),
        pa.field("over_refusal", pa.bool_(), nullable=True),  # null outside harmless sets
    ]
)

FRACTION_SCHEMA = pa.schema(
    [
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("intervention", pa.string(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),
        pa.field("horizon", pa.int32(), nullable=False),
        pa.field("rollout_type", pa.string(), nullable=False),
        pa.field("n_prompts", pa.int64(), nullable=False),
        pa.field("n_rollouts", pa.int64(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("fraction", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=False),
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("n_boot", pa.int64(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),
    ]
)

FIRST_HORIZON_SCHEMA = pa.schema(
    [
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("intervention", pa.string(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),
        pa.field("rollout_type", pa.string(), nullable=False),
        pa.field("first_horizon", pa.int32(), nullable=True),  # null: never at any horizon
        pa.field("count_at_first", pa.int64(), nullable=False),
    ]
)


# --- parsing of plain parameters -------------------------------------------------------------


def parse_sampling(sampling: Iterable) -> list[tuple[str, int | None]]:
    """Normalise sampling specs: ``('greedy', None)``, ``('sample', seed)``, ``'greedy'`` or
    ``'sample:<seed>'``. Duplicates are an error."""
    out: list[tuple[str, int | None]] = []
    for spec in sampling:
        if isinstance(spec, str):
            kind, _, seed = spec.partition(":")
            spec = (kind, seed if seed else None)
        try:
            kind, seed = spec
        except (TypeError, ValueError):
            raise NeuronAuditError(
                f"sampling spec {spec!r} must be ('greedy', None), ('sample', seed), 'greedy' or 'sample:<seed>'"
            ) from None
        if kind == "greedy":
            if seed not in (None, "", "none"):
                raise NeuronAuditError(f"sampling spec {spec!r}: greedy decoding takes no seed")
            item = ("greedy", None)
        elif kind == "sample":
            try:
                item = ("sample", int(seed))
            except (TypeError, ValueError):
                raise NeuronAuditError(f"sampling spec {spec!r}: 'sample' needs an integer seed") from None
        else:
            raise NeuronAuditError(f"unknown sampling kind {kind!r}; use 'greedy' or 'sample'")
        if item in out:
            raise NeuronAuditError(f"sampling spec {spec!r} is listed twice")
        out.append(item)
    if not out:
        raise NeuronAuditError("sampling is empty; give at least ('greedy', None)")
    return out


def parse_horizons(horizons: Iterable) -> tuple[int, ...]:
    """Sorted distinct positive horizons."""
    try:
        hs = sorted({int(h) for h in horizons})
    except (TypeError, ValueError):
        raise NeuronAuditError(f"horizons {horizons!r} must be positive integers") from None
    if not hs or hs[0] < 1 or any(float(h) != int(h) for h in horizons):
        raise NeuronAuditError(f"horizons {list(horizons)!r} must be positive integers")
    return tuple(hs)


def edit_spec(edits: Sequence[NeuronEdit | ResidualEdit]) -> str:
    """JSON of a list of edits (``source`` omitted when absent)."""
    items = []
    for e in edits:
        d = asdict(e)
        d["positions"] = list(e.positions)
        if isinstance(e, ResidualEdit):
            d["vector"] = list(d["vector"])
        else:
            if d["source"] is None:
                del d["source"]
            else:
                d["source"] = list(d["source"])
            if d["strength"] is None:  # only a blend has one
                del d["strength"]
        items.append(d)
    return json.dumps(items, sort_keys=True)


def parse_interventions(spec: str | Path | Mapping, add_reference: bool = True) -> dict[str, list[NeuronEdit]]:
    """Interventions from a JSON file path or a dict ``{name: [edit, ...]}``.

    Each edit is a :class:`NeuronEdit` or a dict with its fields (``layer``, ``neuron``, ``op``,
    ``value``, ``positions``, optionally ``source``, and ``strength`` for a blend), or a
    :class:`ResidualEdit` or a dict with ``op: resid_add``, ``layer``, ``vector``, ``scale`` and
    ``positions``. ``none -> []`` (the unsteered reference) is added when absent, unless
    ``add_reference`` is false (a block of another run's interventions).
    """
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise NeuronAuditError(f"interventions file {str(path)!r} not found")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise NeuronAuditError(
                f"interventions file {str(path)!r} is malformed JSON: {err.msg} (line {err.lineno})"
            ) from None
    if not isinstance(spec, Mapping):
        raise NeuronAuditError(f"interventions must map names to lists of edits, got {type(spec).__name__}")
    out: dict[str, list[NeuronEdit]] = {}
    for name, edits in spec.items():
        if not isinstance(name, str) or not name:
            raise NeuronAuditError(f"intervention name {name!r} must be a non-empty string")
        if isinstance(edits, (str, bytes)) or not isinstance(edits, Iterable):
            raise NeuronAuditError(f"intervention {name!r} must be a list of edits, got {edits!r}")
        parsed = []
        for e in edits:
            if isinstance(e, (NeuronEdit, ResidualEdit)):
                parsed.append(e)
                continue
            if not isinstance(e, Mapping):
                raise NeuronAuditError(f"intervention {name!r} has an edit that is not an object: {e!r}")
            if e.get("op") == "resid_add":
                parsed.append(_residual_edit(name, e))
                continue
            unknown = set(e) - {"layer", "neuron", "op", "value", "positions", "source", "strength"}
            if unknown:
                raise NeuronAuditError(f"intervention {name!r} edit has unknown keys {sorted(unknown)}")
            try:
                parsed.append(
                    NeuronEdit(
                        layer=int(e["layer"]), neuron=int(e["neuron"]), op=str(e["op"]),
                        value=float(e.get("value", 0.0)),
                        positions=tuple(e.get("positions", ("prompt", "generated"))),
                        source=tuple(float(s) for s in e["source"]) if e.get("source") else None,
                        strength=float(e["strength"]) if e.get("strength") is not None else None,
                    )
                )
            except KeyError as err:
                raise NeuronAuditError(f"intervention {name!r} edit {dict(e)!r} lacks {err.args[0]!r}") from None
            except (TypeError, ValueError):
                raise NeuronAuditError(f"intervention {name!r} edit {dict(e)!r} has a non-numeric field") from None
        InterventionPlan.broadcast(parsed)  # validates: no neuron edited twice
        out[name] = parsed
    if add_reference:
        out.setdefault("none", [])
    return out


def _residual_edit(name: str, e: Mapping) -> ResidualEdit:
    unknown = set(e) - {"layer", "op", "vector", "scale", "positions"}
    if unknown:
        raise NeuronAuditError(f"intervention {name!r} residual edit has unknown keys {sorted(unknown)}")
    try:
        return ResidualEdit.add(int(e["layer"]), [float(v) for v in e["vector"]], float(e.get("scale", 1.0)),
                                tuple(e.get("positions", ("last_prompt", "generated"))))
    except KeyError as err:
        raise NeuronAuditError(f"intervention {name!r} residual edit lacks {err.args[0]!r}") from None
    except (TypeError, ValueError):
        raise NeuronAuditError(f"intervention {name!r} residual edit has a non-numeric field") from None


# --- generation ------------------------------------------------------------------------------


def _checked_interventions(adapter, interventions: Mapping[str, Sequence[NeuronEdit]]):
    """Names, edit lists and JSON specs; a bad layer or neuron fails here, before any generation."""
    if not interventions:
        raise NeuronAuditError("no interventions given; include 'none': [] for the unsteered rollouts")
    names = list(interventions)
    plans = {n: list(interventions[n]) for n in names}
    specs = {n: edit_spec(plans[n]) for n in names}
    for n in names:
        if plans[n]:
            NeuronHooks(adapter, InterventionPlan.broadcast(plans[n]))
    return names, plans, specs


def generate_rollouts(
    model,
    tokenizer,
    adapter,
    prompts: pd.DataFrame,
    interventions: Mapping[str, Sequence[NeuronEdit]],
    horizons: Iterable[int] = DEFAULT_HORIZONS,
    sampling: Iterable = (GREEDY,),
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    score_batch_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Rollouts of every (prompt, intervention, sample) read at every horizon.

    ``prompts`` has ``prompt_id`` and ``text`` (and optionally ``prompt_set``); ``interventions``
    maps a name to its edits (give ``'none': []`` for the unsteered reference). Returns one row
    per (prompt_id, intervention, sample, horizon) with the columns of :data:`ROLLOUT_SCHEMA`
    except the judge's ``rollout_type`` / ``over_refusal``.
    """

    hs = parse_horizons(horizons)
    samples = parse_sampling(sampling)
    if batch_size < 1:
        raise NeuronAuditError(f"batch_size {batch_size!r} must be a positive integer")
    names, plans, specs = _checked_interventions(adapter, interventions)
    if len(prompts) == 0:
        raise NeuronAuditError("no prompts to roll out")
    texts = list(prompts["text"])
    pids = list(prompts["prompt_id"].astype(str))
    sets = list(prompts["prompt_set"]) if "prompt_set" in prompts.columns else [""] * len(prompts)
    prompt_ids = encode_prompts(tokenizer, texts, chat_template, system_prompt)
    eos, pad = eos_ids(model, tokenizer), pad_id(tokenizer)
    max_h = hs[-1]
    # Rows: prompts in length order (less padding), every intervention of a prompt side by side.
    order = sorted(range(len(texts)), key=lambda i: (-len(prompt_ids[i]), i))
    combos = [(i, n) for i in order for n in names]
    batches = [combos[k : k + batch_size] for k in range(0, len(combos), batch_size)]
    records: list[dict] = []
    bar = tqdm(total=len(batches) * len(samples), desc="rollouts", unit="batch", disable=not progress)
    for kind, seed in samples:
        gen_tokens: list[list[int]] = []
        gen_stop: list[bool] = []
        gen_ent: list[np.ndarray] = []
        for batch in batches:
            width = max(len(prompt_ids[i]) for i, _ in batch)  # a half keeps the whole batch's width

            def generate(rows, part, kind=kind, seed=seed, width=width):
                # a sampled row draws from its own stream (the pass's seed, its prompt and its
                # intervention): the same tokens whatever batch, out-of-memory half or shard it is in
                seeds = None if kind != "sample" else [row_seed(seed, sets[i], pids[i], n) for i, n in rows]
                try:
                    toks, stop, ent = generate_tokens(
                        model, [prompt_ids[i] for i, _ in rows], max_h, adapter=adapter,
                        plan=InterventionPlan.per_row([plans[n] for _, n in rows]),
                        eos_token_ids=eos, pad_token_id=pad, do_sample=kind == "sample",
                        temperature=temperature, top_p=top_p, top_k=top_k, row_seeds=seeds, width=width,
                    )
                except NonFiniteError as err:
                    if err.row is not None:
                        i, n = rows[err.row]
                        err.at(prompt=repr(pids[i]), context=f"intervention {n!r}")
                    raise
                return list(zip(toks, stop, ent))

            for toks, stop, ent in split_on_oom(generate, batch, "rollouts"):
                gen_tokens.append(toks)
                gen_stop.append(stop)
                gen_ent.append(ent)
            bar.update(1)
        # Perplexity / entropy of the whole rollout under the unsteered model (no hooks).
        scores = rollout_scores(
            model, adapter, [prompt_ids[i] for i, _ in combos], gen_tokens,
            batch_size=score_batch_size or batch_size, pad_token_id=pad,
        )
        sample = {"sampling": kind, "sample_seed": seed, "sample": "greedy" if kind == "greedy" else f"sample-{seed}"}
        records += _horizon_records(tokenizer, hs, combos, gen_tokens, gen_stop, gen_ent, scores, sample,
                                    dict(sets=sets, pids=pids, texts=texts, specs=specs))
    bar.close()
    df = pd.DataFrame.from_records(records)
    df["sample_seed"] = df["sample_seed"].astype("Int64")
    key = {pid: r for r, pid in enumerate(pids)}
    df["_p"] = df["prompt_id"].map(key)
    df["_i"] = df["intervention"].map({n: r for r, n in enumerate(names)})
    df = df.sort_values(["sample", "_p", "_i", "horizon"], kind="stable").drop(columns=["_p", "_i"])
    return df.reset_index(drop=True)


# --- typing and summaries --------------------------------------------------------------------


def _horizon_records(tokenizer, hs, combos, gen_tokens, gen_stop, gen_ent, scores, sample: dict,
                     prompts: dict) -> list[dict]:
    """One record per (rollout, horizon): the response cut at the horizon and its metrics."""
    records = []
    for h in hs:
        lengths = [min(h, len(t)) for t in gen_tokens]
        ppl = prefix_perplexity(scores.logprob, lengths)
        unsteered_ent = prefix_means(scores.entropy, lengths)
        steered_ent = prefix_means(gen_ent, lengths)
        for k, (i, n) in enumerate(combos):
            toks = gen_tokens[k][: lengths[k]]
            rep = repetition_ratio(toks, 4)
            records.append(
                dict(
                    prompt_set=str(prompts["sets"][i]), prompt_id=prompts["pids"][i], prompt=prompts["texts"][i],
                    intervention=n, intervention_spec=prompts["specs"][n], **sample, horizon=h,
                    response=tokenizer.decode(toks, skip_special_tokens=True), n_tokens=len(toks),
                    stopped=bool(gen_stop[k] and len(gen_tokens[k]) < h), repetition_ratio=rep,
                    coherence=1.0 - rep, perplexity=float(ppl[k]), entropy=float(steered_ent[k]),
                    unsteered_entropy=float(unsteered_ent[k]),
                )
            )
    return records


def type_rollouts(df: pd.DataFrame, judge, harmless_sets: Iterable[str] = HARMLESS_SETS) -> pd.DataFrame:
    """Add ``rollout_type`` (the judge's label) and ``over_refusal``.

    ``over_refusal`` is True when a rollout of a prompt from a harmless set (column
    ``prompt_set`` in ``harmless_sets``) is typed ``refusal``, False for other rollouts of those
    prompts, and null (``pd.NA``) for prompts of any other set, where it means nothing.
    """

    out = df.copy()
    if len(out) == 0:
        out["rollout_type"] = pd.Series(dtype=str)
        out["over_refusal"] = pd.Series(dtype="boolean")
        return out
    metric_cols = [c for c in ("repetition_ratio", "perplexity", "entropy", "n_tokens") if c in out.columns]
    labels = list(judge.classify(list(out["prompt"]), list(out["response"]), out[metric_cols].reset_index(drop=True)))
    if len(labels) != len(out):
        raise NeuronAuditError(f"the judge returned {len(labels)} labels for {len(out)} rollouts")
    bad = sorted({lab for lab in labels if lab not in ROLLOUT_TYPES})
    if bad:
        raise NeuronAuditError(f"the judge returned unknown rollout types {bad}; expected {list(ROLLOUT_TYPES)}")
    out["rollout_type"] = labels
    harmless = set(harmless_sets)
    sets = out["prompt_set"] if "prompt_set" in out.columns else pd.Series([""] * len(out), index=out.index)
    in_harmless = sets.isin(harmless)
    over = pd.Series(pd.NA, index=out.index, dtype="boolean")
    over[in_harmless] = (out.loc[in_harmless, "rollout_type"] == "refusal").to_numpy()
    out["over_refusal"] = over
    return out


def _group_keys(df: pd.DataFrame) -> list[str]:
    keys = ["prompt_set", "intervention", "sampling", "horizon"]
    missing = [k for k in keys + ["prompt_id", "rollout_type"] if k not in df.columns]
    if missing:
        raise NeuronAuditError(f"typed rollouts lack columns {missing}")
    return keys


def _with_defaults(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "prompt_set" not in df.columns:
        df["prompt_set"] = ""
    if "sampling" not in df.columns:
        df["sampling"] = "greedy"
    return df


def type_fractions(
    df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> pd.DataFrame:
    """Fraction of each rollout type per (prompt_set, intervention, sampling, horizon).

    A prompt with several sampled rollouts contributes the fraction of its rollouts of each
    type, so the unit of resampling is the prompt: the CI is a percentile bootstrap over
    prompts (``n_boot`` ≥ 1000 resamples, seeded; :func:`neuronaudit.evaluation.stats.unit_bootstrap_means`).
    Every type gets a row, zero counts included, so fractions of a group sum to 1.
    """

    if not 0 < confidence < 1:
        raise NeuronAuditError(f"confidence {confidence!r} must be in (0, 1)")
    df = _with_defaults(df)
    keys = _group_keys(df)
    rows = []
    for group, g in df.groupby(keys, sort=True):
        onehot = pd.get_dummies(g["rollout_type"]).reindex(columns=list(ROLLOUT_TYPES), fill_value=False)
        onehot = onehot.astype(float)
        onehot["prompt_id"] = g["prompt_id"].to_numpy()
        per_prompt = onehot.groupby("prompt_id", sort=True).mean().to_numpy()  # [prompts, types]
        point, lo, hi = unit_bootstrap_means(per_prompt, n_boot=n_boot, seed=seed, level=confidence)
        counts = g["rollout_type"].value_counts()
        for t, name in enumerate(ROLLOUT_TYPES):
            rows.append(
                dict(zip(keys, group)) | dict(
                    rollout_type=name, n_prompts=per_prompt.shape[0], n_rollouts=len(g),
                    count=int(counts.get(name, 0)), fraction=float(point[t]), ci_low=float(lo[t]),
                    ci_high=float(hi[t]), n_boot=int(n_boot), confidence=float(confidence),
                )
            )
    out = pd.DataFrame.from_records(rows, columns=FRACTION_SCHEMA.names)
    return out


def first_horizon(df: pd.DataFrame) -> pd.DataFrame:
    """The first horizon at which each rollout type appears, per (prompt_set, intervention, sampling).

    Takes typed rollouts (a ``rollout_type`` column) or :func:`type_fractions` output (a
    ``count`` column). ``first_horizon`` is null when the type never appears at any horizon.
    """

    df = _with_defaults(df)
    keys = ["prompt_set", "intervention", "sampling"]
    if "count" in df.columns and "rollout_type" in df.columns and "response" not in df.columns:
        counts = df.groupby(keys + ["rollout_type", "horizon"])["count"].sum()
    else:
        counts = df.groupby(keys + ["rollout_type", "horizon"]).size()
    rows = []
    for group, _ in df.groupby(keys, sort=True):
        for name in ROLLOUT_TYPES:
            try:
                c = counts.loc[(*group, name)]
            except KeyError:
                c = pd.Series(dtype=int)
            c = c[c > 0].sort_index()
            first = int(c.index[0]) if len(c) else None
            rows.append(dict(zip(keys, group)) | dict(
                rollout_type=name, first_horizon=first, count_at_first=int(c.iloc[0]) if len(c) else 0
            ))
    out = pd.DataFrame.from_records(rows, columns=FIRST_HORIZON_SCHEMA.names)
    out["first_horizon"] = out["first_horizon"].astype("Int64")
    return out


def _table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df[list(schema.names)], schema=schema, preserve_index=False)


def rollouts_table(df: pd.DataFrame) -> pa.Table:
    """Typed rollouts as a Parquet table with :data:`ROLLOUT_SCHEMA`."""
    return _table(df, ROLLOUT_SCHEMA)




