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
* trigger: the smallest ``|x|`` at which the oracle flips ≥50% of prompts at horizon τ —
  refusal: a harmful prompt no longer refused (coherent bypass or actionable); operator: the
  answer becomes the product on an addition prompt; format: a prose request answered as a list;
* predicted ceilings from the weights and one generic forward pass only: (a) the universal
  critical alignment ``c*`` fitted on training neurons and mapped through each neuron's
  saturation curve; (b) the KL threshold of a single-pass dose sweep on generic prompts;
* held-out neurons (split by a recorded seed) give MAE with bootstrap CIs and verdict accuracy
  against the majority class with an exact binomial p-value.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.methods import window as law
from neuronaudit.methods.window import (
    heldout_summary,
    pick_candidates,
    refusal_pivots,
    single_pass_sweep,
    sweep_behaviour,
    window_table,
)

log = logging.getLogger(__name__)


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
    judge_config: Mapping | None = None,
    n_candidates: int = 8,
    n_random: int = 6,
    x_grid: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    single_pass_grid: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    horizons: Sequence[int] = (8, 16, 32),
    n_prompts: int = 6,
    n_generic: int = 16,
    n_heldout: int = 15,
    n_boot: int = 1000,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    row_batch_size: int = 64,
    threads: int | None = None,
) -> dict:
    """The whole control-window audit; writes sweeps, single-pass, window tables and summary."""
    import pyarrow.parquet as pq

    from neuronaudit.evaluation.judge import make_judge
    from neuronaudit.io import provenance, write_json, write_table
    from neuronaudit.models.loading import load_prepared
    from neuronaudit.prompts import read_prompt_table

    judge = make_judge(judge_config)
    if n_boot < 1000:
        raise NeuronAuditError(f"window n_boot {n_boot!r} is below the 1000 resamples the study requires")
    bad = [x for x in x_grid if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)]
    if bad:
        raise NeuronAuditError(f"impossible dose {bad[0]!r} in the window grid: doses are positive finite budget units")
    for b in behaviours:
        if b not in screen_scores or b not in behaviour_prompts:
            raise NeuronAuditError(f"behaviour {b!r} needs a screen table and a prompt table")
    if threads:
        torch.set_num_threads(int(threads))
    model, tokenizer, adapter, manifest = load_prepared(manifest_path, dtype, device)
    screens = {b: pq.read_table(screen_scores[b]).to_pandas() for b in behaviours}
    neurons = pick_candidates(screens, n_candidates, n_random, adapter.n_layers, adapter.n_neurons, seed)
    generic = read_prompt_table(generic_table, split="all")["text"].head(n_generic).tolist()
    geometry = law.generic_geometry(model, tokenizer, adapter, generic)
    frames = []
    for behaviour, spec in behaviours.items():
        prompts = read_prompt_table(behaviour_prompts[behaviour], split="heldout").head(n_prompts)
        if len(prompts) == 0:
            raise NeuronAuditError(f"behaviour {behaviour!r} has no held-out prompts to sweep")
        frames.append(sweep_behaviour(model, tokenizer, adapter, judge, behaviour, spec,
                                       neurons[neurons["behaviour"] == behaviour], prompts, geometry, x_grid,
                                       horizons, chat_template, system_prompt, row_batch_size))
    sweeps = pd.concat(frames, ignore_index=True)
    tokenizer.padding_side = "left"
    enc = tokenizer(generic, return_tensors="pt", padding=True, truncation=True, max_length=128)
    single = single_pass_sweep(model, adapter, enc, neurons, geometry, single_pass_grid)
    table, fitted = window_table(sweeps, single, neurons, geometry, horizons, adapter.n_layers, n_heldout, seed)
    summary = heldout_summary(table, fitted, n_boot, seed)
    summary["refusal_pivots"] = refusal_pivots(sweeps, table)
    summary["n_neurons"] = int(len(neurons))
    summary["seeds"] = {"split": seed, "bootstrap": seed, "random_controls": seed}
    summary["grid"] = {"x": list(x_grid), "single_pass_x": list(single_pass_grid), "horizons": list(horizons),
                       "prompts_per_behaviour": n_prompts}
    prov = provenance(model_id=manifest.get("source"), weight_sha256=manifest.get("weight_sha256"),
                      dtype=dtype, hook_site=manifest.get("hook_site"), seed=seed, horizons=list(horizons),
                      x_grid=list(x_grid), positions=["last_prompt", "generated"], behaviours=dict(behaviours))
    write_table(pa.Table.from_pandas(sweeps, preserve_index=False), out_sweeps, prov)
    write_table(pa.Table.from_pandas(single, preserve_index=False), out_single_pass, prov)
    write_table(pa.Table.from_pandas(table, preserve_index=False), out_window, prov)
    write_json(json.loads(json.dumps(summary, default=lambda o: None if o is None else float(o))), out_summary)
    return summary
