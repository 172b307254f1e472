"""Prompt sets: named, versioned, split into discovery and held-out parts by a fixed seed.

A prompt set is a local JSON Lines / JSON / Parquet / CSV file, or a Hugging Face dataset id
(``hf:org/name`` or ``hf:org/name:split``), loaded with :mod:`datasets`. Each record needs a
``text`` (or ``prompt``) field; ``prompt_id`` is kept when present and otherwise derived from the
text, so ids are stable. The set's content hash is the SHA-256 of its ``(prompt_id, text)``
lines. The held-out split is decided per record by hashing ``(seed, key)`` where the key is the
record's ``pair_id`` when present (style-matched pairs stay on the same side) and its
``prompt_id`` otherwise, so adding prompts never moves old ones across the split.

Chat models see their chat template (:func:`render_prompts`).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import PROMPT_SET_SCHEMA, read_provenance

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLITS = ("discovery", "heldout")


def _load_records(source: str) -> pd.DataFrame:
    import datasets

    datasets.disable_progress_bars()
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as err:
            raise NeuronAuditError(
                f"prompt set {source!r} could not be loaded from the hub ({type(err).__name__})"
            ) from None
        return ds.to_pandas()
    path = Path(source)
    fmt = LOCAL_FORMATS[path.suffix.lower()]
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:
        cause = err.__cause__ or err
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise NeuronAuditError(f"prompt file {source!r} is malformed: {detail[:200]}") from None
    return ds.to_pandas()


def _read_text(path: Path, source: str) -> str:
    """A prompt file's text; bytes that are not UTF-8 are a one-line error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise NeuronAuditError(
            f"prompt file {source!r} is not UTF-8 text (byte {data[err.start]:#04x} on line {line})"
        ) from None


def _malformed(source: str, err: Exception) -> NeuronAuditError:
    detail = " ".join(str(err).split()) or type(err).__name__
    return NeuronAuditError(f"prompt file {source!r} is malformed: {detail[:200]}")


def _read_fast(source: str) -> pd.DataFrame:
    """Read a local prompt file without :mod:`datasets` (preflight); JSONL errors name the line."""
    path = Path(source)
    if not path.is_file():
        raise NeuronAuditError(f"prompt file {source!r} not found")
    if path.stat().st_size == 0:
        raise NeuronAuditError(f"prompt file {source!r} is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(_read_text(path, source).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise NeuronAuditError(f"prompt file {source!r} is malformed at line {n}: {err.msg}") from None
            if not isinstance(record, dict):
                raise NeuronAuditError(f"prompt file {source!r} line {n} is not a JSON object")
            records.append(record)
        return pd.DataFrame.from_records(records)
    if suffix == ".json":
        try:
            return pd.read_json(io.StringIO(_read_text(path, source)))
        except ValueError as err:
            raise _malformed(source, err) from None
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except (ValueError, OSError, pa.ArrowException) as err:
            raise _malformed(source, err) from None
    if suffix == ".csv":
        try:
            return pd.read_csv(io.StringIO(_read_text(path, source)))
        except ValueError as err:  # pandas' ParserError and EmptyDataError are ValueErrors
            raise _malformed(source, err) from None
    raise NeuronAuditError(f"prompt file {source!r} has an unknown format; use one of {sorted(LOCAL_FORMATS)}")


def _validated(name: str, source: str, df: pd.DataFrame) -> tuple[pd.Series, pd.Series, str]:
    """``(prompt_ids, texts, text_column)`` of a record table, or a one-line error."""
    if len(df) == 0:
        raise NeuronAuditError(f"prompt set {name!r} ({source}) has no records")
    text_col = "text" if "text" in df.columns else "prompt" if "prompt" in df.columns else None
    if text_col is None:
        raise NeuronAuditError(
            f"prompt set {name!r} ({source}) has no 'text' or 'prompt' field; fields: {list(df.columns)}"
        )
    texts = df[text_col]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise NeuronAuditError(f"prompt set {name!r} ({source}) has empty or non-text prompts at rows {bad[:5]}")
    if "prompt_id" in df.columns:
        ids = df["prompt_id"].astype(str)
    else:
        ids = pd.Series([_stable_id(name, t) for t in texts], index=df.index)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise NeuronAuditError(f"prompt set {name!r} ({source}) has duplicate prompt_id {dup[:5]}")
    return ids, texts, text_col


def check_prompt_file(name: str, source: str) -> None:
    """Cheap validation of a local prompt file (hub sets are checked when loaded)."""
    if not source.startswith("hf:"):
        _validated(name, source, _read_fast(source))


def _stable_id(name: str, text: str) -> str:
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def content_hash(prompt_ids, texts) -> str:
    digest = hashlib.sha256()
    for pid, text in zip(prompt_ids, texts):
        digest.update(json.dumps([pid, text], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def is_heldout(key: str, seed: int, heldout_fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < heldout_fraction


#: Salt of the validation split's hash, so that it is drawn independently of the held-out split.
VALIDATION_SALT = "refusal-validation"


def pair_keys(df) -> list[str]:
    """The key that keeps a style-matched pair together: ``pair_id`` when the prompt set has one
    (stored in the ``extra`` JSON column of a prepared table), else the ``prompt_id``."""
    keys = []
    for pid, extra in zip(df["prompt_id"], df["extra"] if "extra" in df.columns else [None] * len(df)):
        pair = json.loads(extra).get("pair_id") if isinstance(extra, str) else None
        keys.append(str(pair) if pair is not None else str(pid))
    return keys


def validation_mask(df, fraction: float, seed: int) -> np.ndarray:
    """Rows of a discovery table kept out of tuning to choose the recipe on: whole pairs
    (:func:`pair_keys`), each in the validation part with probability ``fraction`` by a seeded hash
    (the same pairs for the harmful and the harmless table). ``fraction`` 0 keeps every row for
    training."""
    if isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
        raise NeuronAuditError(f"refusal.validation_fraction {fraction!r} must lie in [0, 1)")
    return np.array([is_heldout(k, f"{VALIDATION_SALT}:{seed}", fraction) for k in pair_keys(df)], dtype=bool)


def load_prompt_set(
    name: str, source: str, heldout_fraction: float = 0.3, seed: int = 0, limit: int | None = None
) -> pd.DataFrame:
    """Load, validate and split a prompt set.

    Returns columns ``prompt_id``, ``text``, ``split`` and ``extra`` (JSON of other fields), with
    ``df.attrs`` holding ``name``, ``source``, ``content_hash`` (of the full set), ``seed`` and
    ``heldout_fraction``. ``limit`` keeps the first ``limit`` prompts of each split.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise NeuronAuditError(f"heldout_fraction {heldout_fraction!r} must be in [0, 1)")
    check_prompt_file(name, source)
    df = _load_records(source)
    ids, texts, text_col = _validated(name, source, df)
    keys = df["pair_id"].astype(str) if "pair_id" in df.columns else ids
    split = ["heldout" if is_heldout(k, seed, heldout_fraction) else "discovery" for k in keys]
    others = [c for c in df.columns if c not in ("prompt_id", text_col)]
    extra = [
        json.dumps({c: _plain(row[c]) for c in others}, ensure_ascii=False, sort_keys=True)
        for _, row in df.iterrows()
    ]
    out = pd.DataFrame({"prompt_id": ids.values, "text": texts.values, "split": split, "extra": extra})
    if limit is not None:
        out = out.groupby("split", sort=False, group_keys=False).head(int(limit)).reset_index(drop=True)
    out.attrs.update(
        name=name,
        source=source,
        content_hash=content_hash(ids, texts),
        seed=seed,
        heldout_fraction=heldout_fraction,
        limit=limit,
        n_total=len(df),
    )
    return out


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return value


def prompt_table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df[list(PROMPT_SET_SCHEMA.names)], schema=PROMPT_SET_SCHEMA, preserve_index=False)


def read_prompt_table(path: str | Path, split: str | None = None) -> pd.DataFrame:
    """Read a prepared prompt set (with its provenance in ``df.attrs``), optionally one split."""

    df = pq.read_table(path).to_pandas()
    df.attrs.update(read_provenance(path))
    if split is not None:
        if split not in SPLITS and split != "all":
            raise NeuronAuditError(f"unknown split {split!r}; choose from {SPLITS + ('all',)}")
        if split != "all":
            df = df[df["split"] == split].reset_index(drop=True)
            df.attrs.update(read_provenance(path))
    return df


def extras(df: pd.DataFrame) -> pd.DataFrame:
    """The source's other fields (``category``, ``answer``, ``pair_id``, ...) as columns."""
    return pd.DataFrame([json.loads(e) for e in df["extra"]], index=df.index)


def render_prompts(tokenizer, texts, chat_template: str = "auto", system_prompt: str | None = None) -> list[str]:
    """Prompts as the model sees them: the chat template (with the generation prompt) when the
    tokenizer has one and ``chat_template`` is ``auto``; the raw text when it is ``none``."""
    if chat_template not in ("auto", "none"):
        raise NeuronAuditError(f"model.chat_template {chat_template!r} must be 'auto' or 'none'")
    if chat_template == "none" or not getattr(tokenizer, "chat_template", None):
        return list(texts)
    out = []
    for text in texts:
        messages = [{"role": "user", "content": text}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def uses_template(tokenizer, chat_template: str) -> bool:
    return chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
