"""The preparing stages: a cached loadable copy of the model (``prepare_model``) and each prompt
set loaded, checked, hashed and split (``prepare_prompts``). Preparing a prompt set imports
neither torch nor transformers (one such job per prompt set)."""

from __future__ import annotations

import logging
from pathlib import Path

from neuronaudit.io import provenance, write_table
from neuronaudit.options import PromptOptions
from neuronaudit.prompts import load_prompt_set, prompt_table

log = logging.getLogger("neuronaudit")


def run_prepare_model(source: str, out_dir: str | Path, revision: str | None = None) -> dict:
    """Resolve ``model.source`` and write its prepared copy and manifest to ``out_dir``."""
    from neuronaudit.models.loading import prepare_model

    manifest = prepare_model(source, out_dir, revision=revision)
    log.info("prepared %s -> %s (sha256 %s)", source, manifest["path"], manifest["weight_sha256"][:12])
    return manifest


def run_prepare_prompts(name: str, source: str, out: str | Path, options: PromptOptions):
    """Load, validate, hash and split one prompt set; write its prompt table."""
    o = options
    df = load_prompt_set(name, source, o.heldout_fraction, o.split_seed, o.limit)
    prov = provenance(
        prompt_set=name,
        source=source,
        prompt_set_hash=df.attrs["content_hash"],
        split_seed=o.split_seed,
        heldout_fraction=o.heldout_fraction,
        limit=o.limit,
        n_total=df.attrs["n_total"],
    )
    write_table(prompt_table(df), out, prov)
    counts = df["split"].value_counts().to_dict()
    log.info("prompt set %s: %s prompts %s, hash %s", name, len(df), counts, df.attrs["content_hash"][:12])
    return df
