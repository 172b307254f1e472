"""The screen stage: last-token tables and prompt tables in, every neuron's contrastive scores
and the circuit out (the algorithm is :mod:`neuronaudit.methods.screen`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import provenance, read_provenance, write_json, write_table
from neuronaudit.methods.screen import (
    CIRCUIT_SCHEMA,
    SCREEN_SCHEMA,
    last_token_width,
    screen,
    select_circuit,
)

log = logging.getLogger("neuronaudit")


def split_prompt_ids(prompts_table: str | Path, split: str = "discovery") -> list[str]:
    """Prompt ids of one split of a prepared prompt table (``all`` for every prompt)."""
    from neuronaudit.prompts import read_prompt_table

    df = read_prompt_table(prompts_table, split=split)
    if len(df) == 0:
        raise NeuronAuditError(f"prompt table {str(prompts_table)!r} has no prompts in split {split!r}")
    return [str(p) for p in df["prompt_id"]]


def _model_hash(prov: dict) -> str | None:
    return prov.get("weight_sha256")


def run_screen(
    behaviour: str,
    pos_last_token: str | Path,
    neg_last_token: str | Path,
    pos_prompts_table: str | Path,
    neg_prompts_table: str | Path,
    diverse_last_tokens: Sequence[str | Path],
    out_scores: str | Path,
    out_circuit: str | Path,
    k: int | float = 0.001,
    skip_layers: Iterable[int] = (0, 1),
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    top_n: int = 20,
    universal_fraction: float = 0.8,
    rank_by: str = "delta",
    split: str = "discovery",
    n_total: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Screen ``behaviour`` (P⁺ vs P⁻ on the ``split`` prompts) and write both outputs atomically.

    ``out_scores``: Parquet, every neuron (:data:`SCREEN_SCHEMA`). ``out_circuit``: the ranked
    circuit as ``.json`` (neurons plus metadata) or ``.parquet`` (:data:`CIRCUIT_SCHEMA`). Both
    carry provenance (inputs' model hash and prompt-set hashes, split, k, seed, n_boot, ...).
    ``n_total`` (MLP neurons of the model) defaults to the collected ``n_layers × n_neurons``.
    """
    skip_layers = sorted({int(s) for s in skip_layers})
    pos_prov, neg_prov = read_provenance(pos_last_token), read_provenance(neg_last_token)
    hashes = {_model_hash(read_provenance(p)) for p in [pos_last_token, neg_last_token, *diverse_last_tokens]}
    hashes.discard(None)
    if len(hashes) > 1:
        raise NeuronAuditError(f"screen inputs come from different models (weight hashes {sorted(hashes)})")
    pos_ids = split_prompt_ids(pos_prompts_table, split)
    neg_ids = split_prompt_ids(neg_prompts_table, split)
    scores = screen(
        pos_last_token, neg_last_token, pos_ids, neg_ids, diverse_last_tokens,
        skip_layers=skip_layers, n_boot=n_boot, seed=seed, ci=ci, top_n=top_n,
        universal_fraction=universal_fraction, rank_by=rank_by,
    )
    if n_total is None:
        n_layers = pos_prov.get("n_layers") or scores["layer"].nunique()
        n_total = int(n_layers) * last_token_width(pos_last_token)
    circuit = select_circuit(scores, k, exclude_universal=True, n_total=n_total, rank_by=rank_by)
    pos_prompts, neg_prompts = read_provenance(pos_prompts_table), read_provenance(neg_prompts_table)
    prov = provenance(
        stage="screen",
        method="CNA (arXiv 2605.12290)",
        behaviour=behaviour,
        model_id=pos_prov.get("model_id"),
        weight_sha256=_model_hash(pos_prov),
        hook_site=pos_prov.get("hook_site"),
        dtype=pos_prov.get("dtype"),
        positive_set=pos_prompts.get("prompt_set") or pos_prov.get("prompt_set"),
        negative_set=neg_prompts.get("prompt_set") or neg_prov.get("prompt_set"),
        positive_set_hash=pos_prompts.get("prompt_set_hash"),
        negative_set_hash=neg_prompts.get("prompt_set_hash"),
        diverse_sets=[read_provenance(p).get("prompt_set", str(p)) for p in diverse_last_tokens],
        split=split,
        n_pos=len(pos_ids),
        n_neg=len(neg_ids),
        position="last_prompt",
        skip_layers=skip_layers,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
        universal_top_n=top_n,
        universal_fraction=universal_fraction,
        n_universal=int(scores["universal"].sum()),
        rank_by=rank_by,
        k_requested=k,
        k=circuit.attrs["k"],
        n_total_neurons=n_total,
        n_universal_excluded=circuit.attrs["n_universal_excluded"],
    )
    table = pa.Table.from_pandas(scores, schema=SCREEN_SCHEMA, preserve_index=False)
    write_table(table, out_scores, prov)
    out_circuit = Path(out_circuit)
    if out_circuit.suffix == ".json":
        write_json(
            {**prov, "n_pos_neurons": int((circuit["sign"] == "pos").sum()),
             "n_neg_neurons": int((circuit["sign"] == "neg").sum()),
             "neurons": circuit.to_dict(orient="records")},
            out_circuit,
        )
    else:
        write_table(pa.Table.from_pandas(circuit, schema=CIRCUIT_SCHEMA, preserve_index=False), out_circuit, prov)
    circuit.attrs.update(prov)
    scores.attrs.update(prov)
    return scores, circuit

