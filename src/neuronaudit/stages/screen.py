"""The screen stage: last-token tables and prompt tables in, every neuron's contrastive scores
and the circuit out (the algorithm is :mod:`neuronaudit.methods.screen`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from neuronaudit.interventions.capture import LastTokenTable
from neuronaudit.io import provenance, read_provenance, write_json, write_table
from neuronaudit.methods.screen import (
    CIRCUIT_SCHEMA,
    SCREEN_SCHEMA,
    heldout_contrast,
    screen,
    select_circuit,
)
from neuronaudit.options import ScreenOptions
from neuronaudit.prompts import extras, read_prompt_table
from neuronaudit.stages.common import read_prompts, same_model

log = logging.getLogger("neuronaudit")


#: Discovery prompts only: the held-out split stays unseen by the screen.
SPLIT = "discovery"
#: The circuit's δ is re-measured on this split of the same sets (the winner's curse made visible).
HELDOUT_SPLIT = "heldout"
#: Confidence of the bootstrap interval of every neuron's δ.
CONFIDENCE = 0.95


def skipped_layers(o: ScreenOptions, n_layers: int) -> list[int]:
    """The layers the screen leaves out: ``screen.skip_layers`` when given, else the first
    ``floor(skip_first_fraction × n_layers)`` layers (layers 0–1 of a 30-layer model, none of a
    4-layer one)."""
    if o.skip_layers is not None:
        return sorted({int(s) % n_layers for s in o.skip_layers})
    return list(range(int(math.floor(o.skip_first_fraction * n_layers + 1e-9))))


def run_screen(
    behaviour: str,
    pos_last_token: str | Path,
    neg_last_token: str | Path,
    pos_prompts_table: str | Path,
    neg_prompts_table: str | Path,
    diverse_last_tokens: Sequence[str | Path],
    out_scores: str | Path,
    out_circuit: str | Path,
    options: ScreenOptions,
    n_total: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Screen ``behaviour`` (P⁺ vs P⁻ on the discovery prompts) and write both outputs atomically.

    ``out_scores``: Parquet, every neuron (:data:`SCREEN_SCHEMA`). ``out_circuit``: the ranked
    circuit as ``.json`` (neurons plus metadata) or ``.parquet`` (:data:`CIRCUIT_SCHEMA`). Both
    carry provenance (inputs' model hash and prompt-set hashes, split, k, seed, n_boot, ...).
    ``n_total`` (MLP neurons of the model) defaults to the collected ``n_layers × n_neurons``.
    """
    o = options
    pos, neg = LastTokenTable(pos_last_token), LastTokenTable(neg_last_token)
    diverse = [LastTokenTable(p) for p in diverse_last_tokens]
    weight_hash = same_model([pos.path, neg.path, *(d.path for d in diverse)], None, "screen")
    pos_prov, neg_prov = read_provenance(pos.path), read_provenance(neg.path)
    n_layers = int(pos_prov.get("n_layers") or len(pos.layers))
    skip_layers = skipped_layers(o, n_layers)
    pos_ids = [str(p) for p in read_prompts(pos_prompts_table, SPLIT)["prompt_id"]]
    neg_ids = [str(p) for p in read_prompts(neg_prompts_table, SPLIT)["prompt_id"]]
    pairs = pair_ids(pos_prompts_table, neg_prompts_table)
    scores = screen(
        pos, neg, pos_ids, neg_ids, diverse, skip_layers=skip_layers, n_boot=o.n_boot, seed=o.seed,
        ci=CONFIDENCE, universal_top_n=o.universal_top_n, universal_fraction=o.universal_fraction,
        rank_by=o.rank_by, pairs=pairs,
    )
    if n_total is None:
        n_total = n_layers * pos.width
    circuit = select_circuit(scores, o.k, exclude_universal=True, n_total=n_total, rank_by=o.rank_by)
    circuit, heldout = _heldout(circuit, pos, neg, pos_prompts_table, neg_prompts_table, pairs, o)
    pos_prompts, neg_prompts = read_provenance(pos_prompts_table), read_provenance(neg_prompts_table)
    prov = provenance(
        stage="screen",
        method="CNA (arXiv 2605.12290)",
        behaviour=behaviour,
        model_id=pos_prov.get("model_id"),
        weight_sha256=weight_hash,
        hook_site=pos_prov.get("hook_site"),
        dtype=pos_prov.get("dtype"),
        positive_set=pos_prompts.get("prompt_set") or pos_prov.get("prompt_set"),
        negative_set=neg_prompts.get("prompt_set") or neg_prov.get("prompt_set"),
        positive_set_hash=pos_prompts.get("prompt_set_hash"),
        negative_set_hash=neg_prompts.get("prompt_set_hash"),
        diverse_sets=[read_provenance(d.path).get("prompt_set", str(d.path)) for d in diverse],
        split=SPLIT,
        n_pos=len(pos_ids),
        n_neg=len(neg_ids),
        position="last_prompt",
        skip_layers=skip_layers,
        bootstrap=scores.attrs["bootstrap"],
        heldout=heldout,
        n_boot=o.n_boot,
        ci=CONFIDENCE,
        seed=o.seed,
        universal_top_n=o.universal_top_n,
        universal_fraction=o.universal_fraction,
        n_universal=int(scores["universal"].sum()),
        rank_by=o.rank_by,
        k_requested=o.k,
        k=circuit.attrs["k"],
        n_total_neurons=n_total,
        n_universal_excluded=circuit.attrs["n_universal_excluded"],
    )
    _write(scores, circuit, prov, out_scores, out_circuit)
    circuit.attrs.update(prov)
    scores.attrs.update(prov)
    return scores, circuit


def pair_ids(*prompt_tables: str | Path) -> dict[str, str] | None:
    """``{prompt_id: pair_id}`` over the prompt tables (every split); ``None`` when no prompt of
    them carries a ``pair_id`` (then the bootstrap resamples each set on its own)."""
    out = {}
    for path in prompt_tables:
        df = read_prompt_table(path)
        ex = extras(df) if len(df) else pd.DataFrame()
        if "pair_id" not in ex:
            continue
        out.update({str(p): str(q) for p, q in zip(df["prompt_id"], ex["pair_id"]) if q is not None and q == q})
    return out or None


def _heldout(circuit, pos, neg, pos_table, neg_table, pairs, o: ScreenOptions) -> tuple[pd.DataFrame, dict]:
    """The circuit with δ re-measured on the held-out prompts that the last-token tables hold
    (every split is collected by default); a record of what was measured, or why not."""
    if len(circuit) == 0:
        return circuit, {"skipped": "empty circuit"}
    layer = int(circuit["layer"].iloc[0])
    ids = []
    for table, prompts in ((pos, pos_table), (neg, neg_table)):
        collected = set(table.layer(layer)[0])
        wanted = [str(p) for p in read_prompt_table(prompts, HELDOUT_SPLIT)["prompt_id"]]
        ids.append([p for p in wanted if p in collected])
    if min(len(ids[0]), len(ids[1])) < 2:
        return circuit, {"skipped": f"fewer than 2 held-out prompts collected per set ({len(ids[0])}, {len(ids[1])})"}
    out = heldout_contrast(circuit, pos, neg, ids[0], ids[1], pairs, n_boot=o.n_boot, seed=o.seed, ci=CONFIDENCE)
    return out, {"split": HELDOUT_SPLIT, **out.attrs["heldout"]}


HELDOUT_COLUMNS = ("delta_heldout", "heldout_ci_low", "heldout_ci_high")


def _write(scores: pd.DataFrame, circuit: pd.DataFrame, prov: dict, out_scores, out_circuit) -> None:
    write_table(pa.Table.from_pandas(scores, schema=SCREEN_SCHEMA, preserve_index=False), out_scores, prov)
    out_circuit = Path(out_circuit)
    if out_circuit.suffix == ".json":
        neurons = circuit.to_dict(orient="records")
        extra = {}
        skipped = (prov.get("heldout") or {}).get("skipped")
        if skipped:  # no held-out re-measure: those fields are missing, and the file says why
            for row in neurons:
                row.update({c: None for c in HELDOUT_COLUMNS if row.get(c) is not None and row[c] != row[c]})
            extra["null_reasons"] = {c: f"held-out δ not measured: {skipped}" for c in HELDOUT_COLUMNS}
        write_json(
            {**prov, "n_pos_neurons": int((circuit["sign"] == "pos").sum()),
             "n_neg_neurons": int((circuit["sign"] == "neg").sum()),
             "neurons": neurons, **extra},
            out_circuit,
        )
    else:
        write_table(pa.Table.from_pandas(circuit, schema=CIRCUIT_SCHEMA, preserve_index=False), out_circuit, prov)
