"""Parquet schemas, provenance metadata and atomic writes.

Every table this package writes has an explicit pyarrow schema and carries its provenance in the
Parquet key-value metadata under ``neuronaudit.provenance`` (JSON): model id and weight hash,
dtype, hook site, prompt-set name and content hash, positions, seed, package versions, git
commit. Outputs are written to a temporary name beside the target and renamed when complete,
so an interrupted or failed step never leaves a half-written file behind; the temporaries of a
killed step are removed by the next write of the same output (or by ``neuronaudit run``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuronaudit.errors import NeuronAuditError

PROVENANCE_KEY = b"neuronaudit.provenance"

NEURON_STATS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("std", pa.float64(), nullable=False),
        pa.field("mean_abs", pa.float64(), nullable=False),
        pa.field("max_abs", pa.float64(), nullable=False),
        pa.field("frac_positive", pa.float64(), nullable=False),
    ]
)


def last_token_schema(n_neurons: int) -> pa.Schema:
    """One row per (prompt, layer): the activation of every neuron at the last prompt token."""
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("layer", pa.int32(), nullable=False),
            pa.field("activation", pa.list_(pa.float32(), n_neurons), nullable=False),
        ]
    )


PROMPT_SET_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("extra", pa.string(), nullable=False),  # JSON of the source's other fields
    ]
)

_PACKAGES = ("neuronaudit", "torch", "transformers", "datasets", "pyarrow", "pandas", "numpy", "snakemake")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit(start: Path | None = None) -> str:
    """The commit of the checkout this package runs from (``unknown`` outside git)."""
    start = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(start), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(**fields) -> dict:
    """Provenance of a table: the given fields plus package versions and git commit."""
    return {**fields, "package_versions": package_versions(), "git_commit": git_commit()}


def with_provenance(schema: pa.Schema, prov: Mapping) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(prov, sort_keys=True, default=str).encode()
    return schema.with_metadata(meta)


def read_provenance(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """The temporaries :func:`atomic_path` left in ``folder`` (of output ``name``, or of any)
    whose writing process is gone: ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for entry in folder.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            out.append(entry)
    return sorted(out)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary path may be filled as a file or as a directory; an existing directory at
    ``path`` is moved aside and removed only once the new one is in place. Temporaries of
    ``path`` that a killed process left behind (its PID no longer runs) are removed first.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path.parent, path.name):
        remove_path(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_table(table: pa.Table, path: str | Path, prov: Mapping | None = None) -> Path:
    """Write ``table`` to Parquet atomically, with provenance in the schema metadata."""
    if prov is not None:
        table = table.replace_schema_metadata(with_provenance(table.schema, prov).metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``: strict JSON, as
    browsers and ``jq`` read it. For display only (the report); :func:`write_json` never does this
    silently."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalars
        return json_safe(obj.item())
    return obj


def _nulled(value):
    """``(value with each non-finite number, also inside a list, as None, whether any was)``."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None, True
    if isinstance(value, (list, tuple)):
        items = [_nulled(v) for v in value]
        return [v for v, _ in items], any(changed for _, changed in items)
    return value, False


def null_for_reason(entry: dict, keys, reason: str) -> dict:
    """A statistic that is undefined for a known reason (no cases, a constant side): each of
    ``keys`` of ``entry`` holding a NaN or infinity (or a list holding one) gets ``None`` there,
    and ``entry["null_reasons"][key]`` says why. In place; returns ``entry``. :func:`write_json`
    refuses every other non-finite number."""
    for key in [keys] if isinstance(keys, str) else keys:
        if key not in entry:
            continue
        value, changed = _nulled(entry[key])
        if changed:
            entry[key] = value
            entry.setdefault("null_reasons", {})[key] = reason
    return entry


def _strict(obj, key: str, where: str):
    """``obj`` as plain JSON values; a non-finite float is an error naming its key."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalars
        obj = obj.item()
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise NeuronAuditError(
                f"{where}: key {key or '(top level)'} is {obj}, not a number: a statistic is written as null "
                "only where it is missing for a stated reason (None, with the reason beside it)")
        return obj
    if isinstance(obj, Mapping):
        return {k: _strict(v, f"{key}.{k}" if key else str(k), where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{key}.{i}" if key else str(i), where) for i, v in enumerate(obj)]
    return obj


def write_json(obj, path: str | Path) -> Path:
    """Strict JSON, written atomically. A NaN or infinity anywhere is refused, naming its key:
    broken numbers never read as "missing". A value that is missing is ``None`` (``null``), put
    there by the code that knows why, with the reason beside it (:func:`null_for_reason`)."""
    data = _strict(obj, "", f"JSON file {str(path)!r}")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    return Path(path)


class RowCheckpoint:
    """Rows of a long measurement kept in a JSON Lines file as soon as each exists, so an
    interrupted run resumes instead of restarting.

    The first line holds a fingerprint of the inputs and settings; :meth:`load` with another
    fingerprint discards the file. A line cut by an interruption is skipped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fingerprint: str | None = None

    def load(self, fingerprint: str) -> dict[str, dict]:
        """The rows already measured under ``fingerprint``, by key."""
        self.fingerprint = fingerprint
        if not self.path.is_file():
            return {}
        lines = self.path.read_text().splitlines()
        if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
            self.path.unlink()  # another input or setting: start afresh
            return {}
        done = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption
                continue
            done[entry["key"]] = entry["row"]
        return done

    def append(self, key: str, row: dict) -> None:
        if self.fingerprint is None:
            raise NeuronAuditError("RowCheckpoint.append before load")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a") as fh:
            if new:
                fh.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            fh.write(json.dumps({"key": key, "row": row}, default=float) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
