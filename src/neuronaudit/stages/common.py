"""The opening every stage shares, written once: torch threads, the prepared model, provenance of
the audited model, and checked reads of the tables a stage takes in."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.finite import install_finite_checks
from neuronaudit.interventions.memory import ModelShape, RowLoad, auto_batch_size, bytes_per_row, free_memory
from neuronaudit.io import read_provenance
from neuronaudit.methods.screen import CIRCUIT_SCHEMA
from neuronaudit.models.loading import load_prepared
from neuronaudit.options import AUTO, AUTO_BATCH_KEYS, ModelOptions, StageOptions
from neuronaudit.prompts import read_prompt_table

log = logging.getLogger("neuronaudit")


def set_threads(threads: int | None) -> None:
    """Torch threads of this job (Snakemake's ``threads``); ``None`` leaves torch's default."""
    if threads:
        torch.set_num_threads(int(threads))


def weights_dtype(model) -> str:
    """A loaded model's weights dtype by name (``bfloat16``): what ``model.dtype: auto`` resolved to,
    for the provenance of every table."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


@dataclass
class OpenedModel:
    """A prepared model loaded for a stage, with its manifest."""

    model: torch.nn.Module
    tokenizer: object
    adapter: object
    manifest: dict
    options: ModelOptions

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @property
    def dtype(self) -> str:
        """The weights' dtype as loaded (``model.dtype: auto`` resolved)."""
        return weights_dtype(self.model)

    def provenance(self) -> dict:
        """The fields every model-running stage records about the audited model."""
        m = self.manifest
        return {
            "model_id": m.get("source"),
            "weight_sha256": m.get("weight_sha256"),
            "tuned_from": m.get("tuned_from"),
            "hook_site": m.get("hook_site"),
            "dtype": self.dtype,
            "device": self.device,
            "chat_template": self.options.chat_template,
            "system_prompt": self.options.system_prompt,
        }


def open_model(manifest_path: str | Path, options: ModelOptions, threads: int | None = None) -> OpenedModel:
    """Set the job's threads and load the prepared model of ``manifest_path``, with every forward
    checked for non-finite activations, MLP outputs and logits (:mod:`neuronaudit.interventions.finite`)."""
    set_threads(threads)
    model, tokenizer, adapter, manifest = load_prepared(manifest_path, options.dtype, options.device)
    install_finite_checks(adapter)
    return OpenedModel(model, tokenizer, adapter, manifest, options)


#: Prompt tokens the memory estimate of a row assumes where a stage does not bound its prompts'
#: length (``collect.max_length``'s default).
PROMPT_TOKENS = 256


def rollout_load(new_tokens: int, prompt_tokens: int = PROMPT_TOKENS) -> RowLoad:
    """A generated row: its prompt's forward, the KV cache of prompt and ``new_tokens``, and the
    scoring of its ``new_tokens`` under the model (their logits)."""
    return RowLoad(tokens=prompt_tokens, cached=prompt_tokens + new_tokens, logits=new_tokens)


def capability_load(max_new_tokens: int, max_length: int = PROMPT_TOKENS) -> RowLoad:
    """A capability row: a general text of ``max_length`` tokens scored at every position, or a task
    prompt answered with ``max_new_tokens``."""
    return RowLoad(tokens=max_length, cached=max_length + max_new_tokens, logits=max_length)


def auto_rows(model, adapter, key: str, load: RowLoad) -> int:
    """Rows per batch for a batch size of ``"auto"`` at config key ``key``: on a CUDA device, from
    its free memory and the bytes one row of ``load`` takes
    (:func:`~neuronaudit.interventions.memory.bytes_per_row`); elsewhere the key's schema default,
    the size the CPU runs at. Logged."""
    from neuronaudit.config import schema_default

    default = int(schema_default(key))
    device = next(model.parameters()).device
    free = free_memory(device)
    if free is None:
        log.info("%s: auto -> %d rows per batch (the default on %s)", key, default, device)
        return default
    per_row = bytes_per_row(ModelShape.of(model, adapter), load)
    rows = auto_batch_size(free, per_row, default)
    log.info("%s: auto -> %d rows per batch (%.1f GiB free on %s, about %.1f MiB per row)",
             key, rows, free / 2**30, device, per_row / 2**20)
    return rows


def resolve_batch_sizes(model, adapter, options: StageOptions, loads: Mapping[str, RowLoad]) -> StageOptions:
    """``options`` with every batch size of ``"auto"`` (:data:`~neuronaudit.options.AUTO_BATCH_KEYS`,
    nested options included) replaced by :func:`auto_rows` of its key's ``loads`` entry; called
    once where a stage opens its model. Sizes already given pass unchanged."""
    keys = options.field_keys()
    nested = options._nested()
    changes = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in nested:
            resolved = resolve_batch_sizes(model, adapter, value, loads)
            if resolved is not value:
                changes[f.name] = resolved
        elif keys[f.name] in AUTO_BATCH_KEYS and value == AUTO:
            if keys[f.name] not in loads:
                raise NeuronAuditError(f"{type(options).__name__}: no memory estimate for {keys[f.name]} = auto")
            changes[f.name] = auto_rows(model, adapter, keys[f.name], loads[keys[f.name]])
    return options.replace(**changes) if changes else options


def read_prompts(path: str | Path, split: str, limit: int | None = None, role: str = "prompt table") -> pd.DataFrame:
    """The ``split`` prompts of a prepared prompt table, the first ``limit`` of them; a missing
    table or an empty selection is a one-line error naming the table."""
    if not Path(path).is_file():
        raise NeuronAuditError(f"{role} {str(path)!r} not found")
    df = read_prompt_table(path, split=split)
    if limit is not None:
        df = df.head(int(limit)).reset_index(drop=True)
    if len(df) == 0:
        raise NeuronAuditError(f"{role} {str(path)!r} has no prompts in split {split!r}")
    return df


def part_of_run(path: str | Path, key: str, run: Mapping, what: str) -> dict:
    """The ``key`` entry of a part table's provenance (what a ``<what>_part`` job recorded), checked to
    belong to ``run`` (its ``run`` entry equals ``run`` at every key): a one-line error otherwise."""
    part = read_provenance(path).get(key)
    if part is None:
        raise NeuronAuditError(f"{path} is not a {what} part table ({what}-part writes them)")
    differs = sorted(k for k in run if part["run"].get(k) != run[k])
    if differs:
        raise NeuronAuditError(f"{what} part {path} is of another run: its {', '.join(differs)} differ from this "
                               f"run's; rerun the {what}_part jobs")
    return part


def read_table(path: str | Path, role: str = "table") -> pd.DataFrame:
    """A Parquet table as a DataFrame (its provenance stays in the file: :func:`read_provenance`)."""
    if not Path(path).is_file():
        raise NeuronAuditError(f"{role} {str(path)!r} not found")
    return pq.read_table(path).to_pandas()


def read_circuit(path: str | Path) -> pd.DataFrame:
    """A circuit written by the screen stage (``.json`` or ``.parquet``), its metadata in attrs."""
    path = Path(path)
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        df = pd.DataFrame(doc["neurons"], columns=list(CIRCUIT_SCHEMA.names))
        floats = [f.name for f in CIRCUIT_SCHEMA if pa.types.is_floating(f.type)]
        df[floats] = df[floats].astype(float)  # JSON null (a missing held-out δ) reads back as NaN
        df.attrs.update({k: v for k, v in doc.items() if k != "neurons"})
        return df
    df = read_table(path, "circuit")
    df.attrs.update(read_provenance(path))
    return df


def same_model(paths: Mapping[str, str | Path] | list, manifest: dict | None, stage: str) -> str | None:
    """The one weight hash every input was computed from (and the manifest's); a mix of models
    is a one-line error."""
    items = paths.values() if isinstance(paths, Mapping) else paths
    hashes = {read_provenance(p).get("weight_sha256") for p in items}
    hashes.discard(None)
    if manifest is not None and manifest.get("weight_sha256"):
        hashes.add(manifest["weight_sha256"])
    if len(hashes) > 1:
        raise NeuronAuditError(f"{stage} inputs come from different models (weight hashes {sorted(hashes)})")
    return next(iter(hashes), None)
