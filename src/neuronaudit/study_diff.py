"""Compare two study folders (``results/<study>``) table by table.

Every Parquet and JSON file under one folder is matched with the file at the same relative path
under the other. Reported: files present on one side only; for Parquet, differing columns, column
types and row counts, and per column the number of cells that differ beyond tolerance with the
largest absolute difference; for JSON, every leaf whose values differ.

Floating-point values are equal when :func:`numpy.isclose` says so (``rtol``, ``atol``, NaN equal
to NaN, a Parquet null equal to NaN); lists (the last-token tables' fixed-size list of float32 per
row) are compared element by element; integers, booleans and strings must match exactly.

What legitimately differs between two runs of the same study is ignored: the Parquet schema
metadata (provenance, pandas metadata) entirely, and in JSON the keys in :data:`IGNORED_KEYS`
and every key ending in ``_seconds`` (wall-clock times), with everything under them, and absolute
paths (two strings both starting with ``/``). Folders named in :data:`SKIPPED_DIRS` (logs,
benchmarks, the report and model weights) are not compared.

Run as ``python -m neuronaudit.study_diff A B``: one line per difference, then
``N files compared, M differ``; exit status 0 when the folders agree, 1 when they differ, 2 on bad
input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neuronaudit.errors import NeuronAuditError

#: JSON keys whose values differ between runs of the same study and are not compared (nor is
#: anything under them): run provenance, the git commit and package versions of the code that
#: ran, and wall-clock timings (also any key ending in ``_seconds``).
IGNORED_KEYS = frozenset(
    {"provenance", "git_commit", "generation_seconds", "seconds", "wall_seconds", "package_versions"}
)

def _wall_clock(key) -> bool:
    """A wall-clock time, by its name (``search_seconds``, ``tune_seconds``, ...): never compared."""
    return isinstance(key, str) and key.endswith("_seconds")


#: Folders (at any depth) not compared: run logs, Snakemake benchmarks, the rendered report and
#: binary model weights.
SKIPPED_DIRS = ("logs", "benchmarks", "report", "weights")

#: File suffixes compared.
SUFFIXES = (".parquet", ".json")


@dataclass(frozen=True)
class Difference:
    """One difference between the two folders.

    ``kind`` is one of ``only_in_a``, ``only_in_b``, ``unreadable``, ``columns``, ``schema``,
    ``rows``, ``cells`` (Parquet) or ``value`` (a JSON leaf). ``where`` is the column (Parquet)
    or the leaf path (JSON, e.g. ``predictor_alignment.mae_x`` or ``refusal_pivots[0].sign``);
    ``n_cells`` and ``max_abs_diff`` are set for ``cells`` (and ``max_abs_diff`` for a numeric
    JSON leaf).
    """

    file: str
    kind: str
    detail: str
    where: str | None = None
    n_cells: int | None = None
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        where = f" {self.where}:" if self.where is not None else ""
        return f"{self.file}: {self.kind}:{where} {self.detail}"


# ----------------------------------------------------------------------------------- files


def _study_files(root: Path, skip_dirs: Iterable[str]) -> dict[str, Path]:
    skip = set(skip_dirs)
    out = {}
    for path in root.rglob("*"):
        if path.suffix not in SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]) or any(part.startswith(".") for part in rel.parts):
            continue  # a skipped folder, or a hidden (half-written or tool) file
        out[rel.as_posix()] = path
    return out


def _check_dir(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise NeuronAuditError(f"study folder {str(path)!r} not found")
    return path


def diff_studies(dir_a, dir_b, rtol: float = 1e-6, atol: float = 1e-9,
                 skip_dirs: Iterable[str] = SKIPPED_DIRS) -> list[Difference]:
    """Every difference between the Parquet and JSON files of two study folders, file by file in
    path order (see the module docstring for what is compared and what is ignored)."""
    return _diff(dir_a, dir_b, rtol, atol, skip_dirs)[0]


def _diff(dir_a, dir_b, rtol, atol, skip_dirs) -> tuple[list[Difference], int]:
    a, b = _check_dir(dir_a), _check_dir(dir_b)
    files_a, files_b = _study_files(a, skip_dirs), _study_files(b, skip_dirs)
    diffs: list[Difference] = []
    names = sorted(set(files_a) | set(files_b))
    for name in names:
        if name not in files_b:
            diffs.append(Difference(name, "only_in_a", f"missing from {b}"))
        elif name not in files_a:
            diffs.append(Difference(name, "only_in_b", f"missing from {a}"))
        elif name.endswith(".parquet"):
            diffs += diff_parquet(files_a[name], files_b[name], rtol, atol, name=name)
        else:
            diffs += diff_json(files_a[name], files_b[name], rtol, atol, name=name)
    return diffs, len(names)


# --------------------------------------------------------------------------------- Parquet


def diff_parquet(path_a, path_b, rtol: float = 1e-6, atol: float = 1e-9, name: str | None = None) -> list[Difference]:
    """Differences between two Parquet tables; the schema metadata is ignored."""

    name = name or Path(path_a).name
    tables = []
    for side, path in (("a", path_a), ("b", path_b)):
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowException) as err:
            return [Difference(name, "unreadable", f"side {side}: {' '.join(str(err).split())}")]
    ta, tb = tables
    diffs = []
    cols_a, cols_b = ta.column_names, tb.column_names
    only_a = [c for c in cols_a if c not in cols_b]
    only_b = [c for c in cols_b if c not in cols_a]
    if only_a or only_b:
        diffs.append(Difference(name, "columns", f"only in a: {only_a}, only in b: {only_b}"))
    elif cols_a != cols_b:
        diffs.append(Difference(name, "columns", f"order differs: {cols_a} vs {cols_b}"))
    common = [c for c in cols_a if c in cols_b]
    for col in common:
        fa, fb = ta.schema.field(col), tb.schema.field(col)
        if fa.type != fb.type:
            diffs.append(Difference(name, "schema", f"type {fa.type} vs {fb.type}", where=col))
        elif fa.nullable != fb.nullable:
            diffs.append(Difference(name, "schema", f"nullable {fa.nullable} vs {fb.nullable}", where=col))
    if ta.num_rows != tb.num_rows:
        diffs.append(Difference(name, "rows", f"{ta.num_rows} vs {tb.num_rows} rows"))
        return diffs  # rows cannot be matched up
    for col in common:
        n, max_abs, nonfinite = _column_diff(ta.column(col), tb.column(col), rtol, atol)
        if n:
            detail = f"{n} of {ta.num_rows} cells differ"
            if max_abs is not None:
                detail += f" (max abs diff {max_abs:.6g})"
            if nonfinite:
                detail += f" ({nonfinite} with NaN, inf or null on one side only)"
            diffs.append(Difference(name, "cells", detail, where=col, n_cells=n, max_abs_diff=max_abs))
    return diffs


def _plain(col):
    """One contiguous array, dictionary-encoded values decoded."""

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _is_list(t) -> bool:

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_float(t) -> bool:

    return pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_exact_number(t) -> bool:

    return pa.types.is_integer(t) or pa.types.is_boolean(t)


def _is_number_type(t) -> bool:
    return _is_float(t) or _is_exact_number(t)


def _column_diff(col_a, col_b, rtol, atol) -> tuple[int, float | None, int]:
    """(cells that differ, largest absolute difference or None, cells differing by NaN/inf/null)."""
    a, b = _plain(col_a), _plain(col_b)
    ta, tb = a.type, b.type
    numeric = _is_number_type(ta) and _is_number_type(tb)
    if numeric and (_is_float(ta) or _is_float(tb)):
        differ, max_abs, nonfinite = _float_diff(_floats(a), _floats(b), rtol, atol)
        return int(differ.sum()), max_abs, nonfinite
    if _is_list(ta) and _is_list(tb):
        differ, max_abs, nonfinite = _list_diff(a, b, rtol, atol)
        return int(differ.sum()), max_abs, nonfinite
    differ = _exact_diff(a, b, rtol, atol)
    n = int(differ.sum())
    max_abs = None
    if n and numeric:
        fa, fb = _floats(a)[differ], _floats(b)[differ]
        both = np.isfinite(fa) & np.isfinite(fb)
        max_abs = float(np.abs(fa[both] - fb[both]).max()) if both.any() else None
    return n, max_abs, 0


def _floats(arr) -> np.ndarray:
    """float64 values, nulls as NaN."""

    return np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _float_diff(a: np.ndarray, b: np.ndarray, rtol, atol) -> tuple[np.ndarray, float | None, int]:
    with np.errstate(invalid="ignore", over="ignore"):
        differ = ~np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        finite = np.isfinite(a) & np.isfinite(b)
        both = differ & finite
        max_abs = float(np.abs(a[both] - b[both]).max()) if both.any() else None
    return differ, max_abs, int((differ & ~finite).sum())


def _exact_diff(a, b, rtol, atol) -> np.ndarray:
    """Per row: does the cell differ? Exact comparison (null equals null)."""

    both_null = np.asarray(pc.and_(a.is_null(), b.is_null()).to_numpy(zero_copy_only=False), dtype=bool)
    try:
        equal = pc.equal(a, b).fill_null(False).to_numpy(zero_copy_only=False)
        return ~np.asarray(equal, dtype=bool) & ~both_null
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        pass  # nested or mismatched types: compare the Python values
    return np.array([not _equal(x, y, rtol, atol) for x, y in zip(a.to_pylist(), b.to_pylist())], dtype=bool)


def _list_diff(a, b, rtol, atol) -> tuple[np.ndarray, float | None, int]:
    """Per row: does the list differ (null-ness, length, or any element)? Elements are compared
    vectorised over the rows whose lengths agree."""

    len_a = np.asarray(pc.list_value_length(a).fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    len_b = np.asarray(pc.list_value_length(b).fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    differ = len_a != len_b
    same = ~differ
    rows = np.flatnonzero(same)
    mask = pa.array(same)
    sub_a, sub_b = a.filter(mask), b.filter(mask)
    va, vb = _plain(pc.list_flatten(sub_a)), _plain(pc.list_flatten(sub_b))
    max_abs, nonfinite = None, 0
    if len(va) == 0:
        return differ, max_abs, nonfinite
    parent = rows[np.asarray(pc.list_parent_indices(sub_a).to_numpy(zero_copy_only=False), dtype=np.int64)]
    if _is_number_type(va.type) and _is_number_type(vb.type) and (_is_float(va.type) or _is_float(vb.type)):
        fa, fb = _floats(va), _floats(vb)
        elem, max_abs, _ = _float_diff(fa, fb, rtol, atol)
        bad = elem & ~(np.isfinite(fa) & np.isfinite(fb))
        nonfinite = len(np.unique(parent[bad]))
    else:
        elem = _exact_diff(va, vb, rtol, atol)
        if elem.any() and _is_exact_number(va.type) and _is_exact_number(vb.type):
            fa, fb = _floats(va)[elem], _floats(vb)[elem]
            both = np.isfinite(fa) & np.isfinite(fb)
            max_abs = float(np.abs(fa[both] - fb[both]).max()) if both.any() else None
    differ[parent[elem]] = True
    return differ, max_abs, nonfinite


# ------------------------------------------------------------------------------------ JSON


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_abs_path(x) -> bool:
    return isinstance(x, str) and x.startswith("/")


def _equal(x, y, rtol, atol) -> bool:
    """Whole-value equality with the tolerances (numbers, NaN, nested lists and dicts)."""
    if _is_number(x) and _is_number(y):
        return bool(np.isclose(float(x), float(y), rtol=rtol, atol=atol, equal_nan=True)) if isinstance(x, float) or \
            isinstance(y, float) else x == y
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_equal(u, v, rtol, atol) for u, v in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k], rtol, atol) for k in x)
    return type(x) is type(y) and x == y


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff_json(path_a, path_b, rtol: float = 1e-6, atol: float = 1e-9, name: str | None = None,
              ignored_keys: Iterable[str] = IGNORED_KEYS) -> list[Difference]:
    """Every leaf whose value differs between two JSON files (see :data:`IGNORED_KEYS`)."""
    name = name or Path(path_a).name
    docs = []
    for side, path in (("a", path_a), ("b", path_b)):
        try:
            docs.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            return [Difference(name, "unreadable", f"side {side}: {' '.join(str(err).split())}")]
    out: list[Difference] = []
    _walk(docs[0], docs[1], "", name, rtol, atol, frozenset(ignored_keys), out)
    return out


def _walk(x, y, where: str, name: str, rtol, atol, ignored: frozenset, out: list[Difference]) -> None:
    label = where or "(root)"
    if isinstance(x, dict) and isinstance(y, dict):
        for key in sorted(set(x) | set(y), key=str):
            if key in ignored or _wall_clock(key):
                continue
            sub = f"{where}.{key}" if where else str(key)
            if key not in y:
                out.append(Difference(name, "value", f"only in a: {_short(x[key])}", where=sub))
            elif key not in x:
                out.append(Difference(name, "value", f"only in b: {_short(y[key])}", where=sub))
            else:
                _walk(x[key], y[key], sub, name, rtol, atol, ignored, out)
        return
    if isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            out.append(Difference(name, "value", f"length {len(x)} vs {len(y)}", where=label))
        for i, (u, v) in enumerate(zip(x, y)):
            _walk(u, v, f"{where}[{i}]", name, rtol, atol, ignored, out)
        return
    if _is_abs_path(x) and _is_abs_path(y):
        return  # absolute paths name where each run wrote, not what it found
    if _equal(x, y, rtol, atol):
        return
    max_abs = None
    if _is_number(x) and _is_number(y) and math.isfinite(x) and math.isfinite(y):
        max_abs = abs(float(x) - float(y))
    detail = f"{_short(x)} vs {_short(y)}" + (f" (abs diff {max_abs:.6g})" if max_abs is not None else "")
    out.append(Difference(name, "value", detail, where=label, max_abs_diff=max_abs))


# ------------------------------------------------------------------------------------- CLI


def run(dir_a, dir_b, rtol: float = 1e-6, atol: float = 1e-9, skip_dirs: Iterable[str] = SKIPPED_DIRS,
        file=None) -> int:
    """Print one line per difference and ``N files compared, M differ``; 0 if equal, else 1."""
    file = file or sys.stdout
    diffs, n_files = _diff(dir_a, dir_b, rtol, atol, skip_dirs)
    for d in diffs:
        print(d, file=file)
    n_differ = len({d.file for d in diffs})
    print(f"{n_files} files compared, {n_differ} differ", file=file)
    return 1 if diffs else 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("a", help="results/<study> folder")
    parser.add_argument("b", help="results/<study> folder to compare with")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of float values")
    parser.add_argument("--atol", type=float, default=1e-9, help="absolute tolerance of float values")
    parser.add_argument("--skip", nargs="*", default=list(SKIPPED_DIRS), metavar="DIR",
                        help=f"folder names not compared (default: {' '.join(SKIPPED_DIRS)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuronaudit.study_diff", description=__doc__.splitlines()[0])
    args = add_arguments(parser).parse_args(argv)
    try:
        return run(args.a, args.b, rtol=args.rtol, atol=args.atol, skip_dirs=args.skip)
    except NeuronAuditError as err:
        print(f"neuronaudit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
