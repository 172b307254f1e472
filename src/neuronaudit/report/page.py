"""The audit report: one self-contained HTML page.

The page has a headline summary, one section per audit stage and a provenance section. It makes
no external requests: CSS is inline, figures are PNG data URIs, there are no scripts, and a
Content-Security-Policy meta tag (``default-src 'none'``) makes the browser refuse anything else.
Every value that comes from data (prompt-set names, prompt and generated text, table cells,
captions, provenance) goes through jinja2 autoescaping; nothing is marked safe.

Building blocks, so later stages (screening, dose sweeps, refusal rollouts) only add sections:

* :class:`Figure`, :class:`Table`, :class:`Excerpt` — items of a section; a figure is a PNG data
  URI (:func:`figure_to_data_uri`), a one-sentence caption and links to the Parquet tables it
  was drawn from, relative to the report;
* :class:`FigureGrid` — the same figure of several studies side by side (``neuronaudit compare``);
* :class:`Section` — id, title, intro and a list of items;
* :class:`Headline` — one headline figure of the summary: its value and 95% CI (also as
  machine-readable ``data-value``/``data-ci-low``/``data-ci-high`` attributes of its cell), the
  published number it reproduces and the table it is read from;
* :func:`render_report` — summary + headlines + sections + provenance dict -> HTML text.

:func:`write_figures` writes every figure of the sections as a PNG file (the very bytes embedded
in the page) under ``<figures>/<section id>/<figure name>.png`` with a ``manifest.json``, which
Snakemake's ``report()`` picks up so that ``snakemake --report`` shows the same figures.

:func:`build_report` assembles the activation-statistics report from the stats Parquet files
(:data:`neuronaudit.io.NEURON_STATS_SCHEMA`), the model manifest, the config and Snakemake
benchmark files, and writes it atomically. Captions are package data, ``neuronaudit/report/captions/<name>.rst``
(shared with Snakemake's ``report()``), with inline defaults when that folder is absent. Every
number shown is read from the inputs; a value that is absent is shown as ``missing``.
"""

from __future__ import annotations

import base64
import io as _bytesio
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import jinja2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from neuronaudit import __version__
from neuronaudit import io as naio
from neuronaudit.errors import NeuronAuditError
from neuronaudit.report import plots
from neuronaudit.report.captions import MISSING, caption
from neuronaudit.resources import report_template

__all__ = [
    "MISSING",
    "Figure",
    "FigureGrid",
    "Headline",
    "Table",
    "Excerpt",
    "Section",
    "figure_to_data_uri",
    "render_report",
    "write_figures",
    "read_stats",
    "activation_section",
    "rule_runtimes",
    "build_report",
]



_DATA_URI = re.compile(r"^data:image/(png|jpeg|svg\+xml);base64,[A-Za-z0-9+/]+=*$")
_SECTION_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_FIGURE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED_IDS = {"summary", "headlines", "provenance", "contents"}

#: Columns of a neuron stats table (:data:`neuronaudit.io.NEURON_STATS_SCHEMA`).
NEURON_STATS_COLUMNS: tuple[str, ...] = tuple(naio.NEURON_STATS_SCHEMA.names)


# ---------------------------------------------------------------------------------------------
# value formatting


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    try:
        return isinstance(v, (float, np.floating)) and math.isnan(v)
    except TypeError:
        return False


def _fmt(v: Any, precise: bool = False) -> str:
    """Display text of one value: ``missing`` for None/NaN; floats with 5 significant digits in
    tables (``precise=False``) or exactly (``repr``) in provenance."""
    if _is_missing(v):
        return MISSING
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v) if precise else f"{v:.5g}"
    if isinstance(v, Path):
        return v.as_posix()
    return str(v)


def _href(path: str | os.PathLike) -> str:
    """A relative link (POSIX separators, percent-encoded); refuses URLs with a scheme or host."""
    text = Path(path).as_posix() if isinstance(path, os.PathLike) else str(path).replace(os.sep, "/")
    parsed = urlparse(text)
    if parsed.scheme or parsed.netloc or text.startswith("/"):
        raise ValueError(f"table link must be a relative path, got {text!r}")
    return quote(text, safe="/._-~")


# ---------------------------------------------------------------------------------------------
# data model

Links = str | os.PathLike | Mapping[str, str | os.PathLike] | None


def _links(value: Links) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (("table", _href(value)),)
    return tuple((str(label), _href(p)) for label, p in value.items())


@dataclass(frozen=True)
class Figure:
    """A figure: ``image`` is a data URI (see :func:`figure_to_data_uri`), ``caption`` one
    sentence, ``table_link`` the Parquet file(s) behind it relative to the report — a path, or a
    mapping label -> path when several tables feed one figure. ``name`` (lower-case letters,
    digits, ``_``; usually its caption's name) names the figure's PNG file and matches the same
    figure across studies."""

    title: str
    image: str
    caption: str
    table_link: Links = None
    name: str = ""
    links: tuple[tuple[str, str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not _DATA_URI.match(self.image):
            raise ValueError(f"figure {self.title!r}: image must be a base64 PNG/JPEG/SVG data URI")
        if self.name and not _FIGURE_NAME.match(self.name):
            raise ValueError(f"figure name must match {_FIGURE_NAME.pattern}, got {self.name!r}")
        link = self.table_link
        if isinstance(link, (str, os.PathLike)):  # one table: labelled by its file name
            link = {Path(link).name: link}
        object.__setattr__(self, "links", _links(link))

    def image_bytes(self) -> bytes:
        """The decoded image (PNG bytes for :func:`figure_to_data_uri` figures)."""
        return base64.b64decode(self.image.split(",", 1)[1])


@dataclass(frozen=True)
class FigureGrid:
    """The same figure of several studies side by side: ``cells`` are (study label, figure or
    None when that study lacks it)."""

    title: str
    caption: str
    cells: tuple[tuple[str, Figure | None], ...]


@dataclass(frozen=True)
class Headline:
    """One headline figure of a study.

    ``key`` is a stable id (``stage.what``) matching the same figure across studies; ``text`` is
    what the page shows (the value with its 95% CI); ``value`` and ``ci`` are the same numbers,
    unrounded, written as ``data-value``, ``data-ci-low`` and ``data-ci-high`` attributes of the
    cell so that a reader (or a test) can check them against the JSON summaries; ``published``
    is the published number this one reproduces (empty when there is none); ``table_link`` the
    table(s) it is read from, relative to the report; ``n`` and ``unit`` what the figure was
    measured on (``n = 62 prompts``) and ``test`` how its CI or p-value was obtained, where the
    section states them (None: not stated).
    """

    key: str
    label: str
    text: str
    value: float | None = None
    ci: tuple[float | None, float | None] | None = None
    published: str = ""
    table_link: Links = None
    n: int | None = None
    unit: str | None = None
    test: str | None = None
    links: tuple[tuple[str, str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z][a-z0-9_.-]*$", self.key):
            raise ValueError(f"headline key must be lower-case letters, digits, '.', '_' or '-', got {self.key!r}")
        link = self.table_link
        if isinstance(link, (str, os.PathLike)):  # one source: labelled by its file name
            link = {Path(link).name: link}
        object.__setattr__(self, "links", _links(link))


@dataclass(frozen=True, eq=False)
class Table:
    """A table shown in the page (first ``max_rows`` rows), with optional links to its Parquet
    source(s) relative to the report."""

    title: str
    data: pd.DataFrame
    caption: str
    table_link: Links = None
    max_rows: int = 50
    links: tuple[tuple[str, str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.data, pd.DataFrame):
            raise TypeError(f"table {self.title!r}: data must be a pandas DataFrame")
        object.__setattr__(self, "links", _links(self.table_link))


@dataclass(frozen=True)
class Excerpt:
    """Verbatim text (a prompt, a model generation), shown preformatted and escaped."""

    title: str
    text: str
    caption: str = ""


Item = Figure | FigureGrid | Table | Excerpt


@dataclass
class Section:
    """One report section; ``id`` is its HTML anchor (letters, digits, ``-``, ``_``)."""

    id: str
    title: str
    intro: str = ""
    items: list[Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _SECTION_ID.match(self.id):
            raise ValueError(f"section id must match {_SECTION_ID.pattern}, got {self.id!r}")
        if self.id in _RESERVED_IDS:
            raise ValueError(f"section id {self.id!r} is reserved")


# ---------------------------------------------------------------------------------------------
# rendering


def figure_to_data_uri(fig: MplFigure, dpi: int = 110) -> str:
    """Render ``fig`` as a base64 PNG data URI and close it."""

    try:
        buf = _bytesio.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _table_view(df: pd.DataFrame, max_rows: int | None = None, precise: bool = False) -> dict:
    shown = df if max_rows is None else df.head(max_rows)
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c])
               for c in shown.columns]
    rows = [[_fmt(v, precise) for v in row] for row in shown.itertuples(index=False, name=None)]
    return {
        "kind": "table",
        "columns": [str(c) for c in shown.columns],
        "numeric": numeric,
        "rows": rows,
        "n_shown": len(shown),
        "n_total": len(df),
    }


def _tree(value: Any) -> dict:
    """Provenance value -> render tree: dict (definition list), table, list, or scalar text."""
    if isinstance(value, pd.DataFrame):
        return _table_view(value, precise=True)
    if isinstance(value, Mapping):
        if not value:
            return {"kind": "scalar", "text": "(empty)"}
        return {"kind": "dict", "entries": [(str(k), _tree(v)) for k, v in value.items()]}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        seq = list(value)
        if not seq:
            return {"kind": "scalar", "text": "(empty)"}
        if all(not isinstance(v, (Mapping, list, tuple, set, pd.DataFrame, np.ndarray)) for v in seq):
            return {"kind": "scalar", "text": ", ".join(_fmt(v, precise=True) for v in seq)}
        return {"kind": "list", "entries": [_tree(v) for v in seq]}
    return {"kind": "scalar", "text": _fmt(value, precise=True)}


def _number(v: Any) -> str | None:
    """A ``data-*`` attribute value: the exact float, or None (attribute left out) when missing."""
    if _is_missing(v):
        return None
    return repr(float(v))


def _headline_rows(columns: Sequence[str], per_column: Sequence[Sequence[Headline]]) -> list[dict]:
    """Rows of the headline table: one per key (in first-seen order), one cell per column."""
    by_key: dict[str, dict[int, Headline]] = {}
    for i, heads in enumerate(per_column):
        for h in heads:
            if i in by_key.setdefault(h.key, {}):
                raise ValueError(f"duplicate headline key {h.key!r}")
            by_key[h.key][i] = h
    rows = []
    for key, cells in by_key.items():
        first = next(iter(cells.values()))
        row_cells = []
        for i, column in enumerate(columns):
            h = cells.get(i)
            if h is None:
                row_cells.append({"column": column, "text": MISSING, "value": None, "ci_low": None,
                                  "ci_high": None, "links": ()})
                continue
            lo, hi = h.ci if h.ci is not None else (None, None)
            row_cells.append({"column": column, "text": h.text, "value": _number(h.value),
                              "ci_low": _number(lo), "ci_high": _number(hi), "links": h.links})
        published = next((h.published for h in cells.values() if h.published), "")
        rows.append({"key": key, "label": first.label, "cells": row_cells, "published": published or "—"})
    return rows


def _item_view(item: Item) -> dict:
    if isinstance(item, Figure):
        return {"kind": "figure", "title": item.title, "image": item.image,
                "caption": item.caption, "links": item.links, "name": item.name}
    if isinstance(item, FigureGrid):
        return {"kind": "grid", "title": item.title, "caption": item.caption,
                "cells": [{"label": label, "image": f.image if f else None, "links": f.links if f else ()}
                          for label, f in item.cells]}
    if isinstance(item, Table):
        return {"kind": "table", "title": item.title, "caption": item.caption, "links": item.links,
                "table": _table_view(item.data, item.max_rows)}
    if isinstance(item, Excerpt):
        return {"kind": "excerpt", "title": item.title, "caption": item.caption, "text": item.text}
    raise TypeError(f"unsupported report item {type(item).__name__}")


_CSS = report_template("report.css")

_TEMPLATE = report_template("report.html.j2")

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_report(
    title: str,
    summary: Sequence[tuple[str, Any]],
    sections: Sequence[Section],
    provenance: Mapping[str, Any],
    headlines: Sequence[Headline] | Mapping[str, Sequence[Headline]] = (),
) -> str:
    """One self-contained HTML page: the headline table, summary items (label, value), the
    sections, and the provenance dict (nested mappings become nested definition lists,
    DataFrames tables, None ``missing``). All text is escaped.

    ``headlines`` is one study's headline figures (one column, "this study"), or a mapping
    column label -> headline figures to set several studies side by side; rows are matched by
    :attr:`Headline.key`.
    """
    if isinstance(headlines, Mapping):
        columns, per_column = [str(c) for c in headlines], [list(h) for h in headlines.values()]
    else:
        columns, per_column = ["this study"], [list(headlines)]
    headline_rows = _headline_rows(columns, per_column) if any(per_column) else []
    ids = [s.id for s in sections]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate section ids {dup}")
    view_sections = [
        {"id": s.id, "title": s.title, "intro": s.intro, "items": [_item_view(i) for i in s.items]}
        for s in sections
    ]
    return _ENV.from_string(_TEMPLATE).render(
        title=title,
        css=_CSS,
        summary=[(str(label), _fmt(value)) for label, value in summary],
        headlines=headline_rows,
        headline_columns=columns,
        missing=MISSING,
        sections=view_sections,
        provenance=_tree(dict(provenance)) if provenance else {"kind": "scalar", "text": MISSING},
        version=__version__,
    )


def write_figures(
    sections: Sequence[Section],
    figures_dir: str | os.PathLike,
    study_dir: str | os.PathLike,
    report_dir: str | os.PathLike,
) -> Path:
    """Write every named figure of ``sections`` to ``<figures_dir>/<section id>/<name>.png`` and
    a ``manifest.json`` (one entry per figure: stage, stage title, name, title, caption, file,
    and the tables behind it relative to ``study_dir``); return the manifest's path.

    The PNG bytes are those embedded in the page. Figure links are relative to ``report_dir``.
    """
    figures_dir, study_dir, report_dir = Path(figures_dir), Path(study_dir), Path(report_dir)
    entries, seen = [], set()
    for s in sections:
        for item in s.items:
            if not isinstance(item, Figure):
                continue
            if not item.name:
                raise NeuronAuditError(f"figure {item.title!r} of section {s.id!r} has no name")
            if (s.id, item.name) in seen:
                raise NeuronAuditError(f"two figures named {item.name!r} in section {s.id!r}")
            seen.add((s.id, item.name))
            path = figures_dir / s.id / f"{item.name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with naio.atomic_path(path) as tmp:
                tmp.write_bytes(item.image_bytes())
            tables = {label: os.path.relpath((report_dir / unquote(href)).resolve(), study_dir.resolve())
                      for label, href in item.links}
            entries.append({"stage": s.id, "stage_title": s.title, "name": item.name, "title": item.title,
                            "caption": item.caption, "file": f"{s.id}/{item.name}.png",
                            "tables": {k: Path(v).as_posix() for k, v in tables.items()}})
    return naio.write_json({"figures": entries}, figures_dir / "manifest.json")


# ---------------------------------------------------------------------------------------------
# activation statistics


def read_stats(stats_paths: Mapping[str, str | os.PathLike]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Concatenate the stats Parquet files (prompt-set name -> path) with a ``prompt_set``
    column; also return each file's provenance."""
    if not stats_paths:
        raise NeuronAuditError("no neuron stats tables given")
    frames, provs = [], {}
    needed = NEURON_STATS_COLUMNS
    for name, path in stats_paths.items():
        path = Path(path)
        if not path.is_file():
            raise NeuronAuditError(f"neuron stats table not found: {path}")
        df = pd.read_parquet(path)
        lacking = [c for c in needed if c not in df.columns]
        if lacking:
            raise NeuronAuditError(f"neuron stats table {path} lacks column(s) {lacking}")
        frames.append(df[list(needed)].assign(prompt_set=str(name)))
        provs[str(name)] = naio.read_provenance(path)
    return pd.concat(frames, ignore_index=True), provs


def _relpaths(stats_paths: Mapping[str, str | os.PathLike], report_dir: Path) -> dict[str, str]:
    return {str(name): os.path.relpath(Path(p).resolve(), Path(report_dir).resolve())
            for name, p in stats_paths.items()}


def _common(values: list[Any]) -> str:
    """The shared value of ``values`` as text, or the distinct values joined, or ``missing``."""
    texts = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else _fmt(v)
             for v in values if not _is_missing(v)]
    distinct = list(dict.fromkeys(texts))
    return ", ".join(distinct) if distinct else MISSING


def _activation_section(
    stats: pd.DataFrame, provs: Mapping[str, dict], links: Mapping[str, str]
) -> Section:
    names = list(dict.fromkeys(stats["prompt_set"]))
    hook = _common([p.get("hook_site") for p in provs.values()])
    positions = _common([p.get("positions") for p in provs.values()])
    fig = Figure(
        title="Activation profile over layers",
        image=figure_to_data_uri(plots.layer_activation_profile(stats)),
        caption=caption("layer_activation_profile"),
        table_link=links,
        name="layer_activation_profile",
    )
    outliers = plots.neuron_outliers(stats, top=20)
    table = Table(
        title=f"Top {len(outliers)} neurons by max |a|",
        data=outliers,
        caption=caption("neuron_outliers"),
        table_link=links,
    )
    intro = (
        f"Streaming per-neuron activation statistics of {len(names)} prompt set(s) "
        f"({', '.join(names)}) at hook site {hook}, positions: {positions}."
    )
    return Section(id="activations", title="Activation statistics", intro=intro, items=[fig, table])


def activation_section(stats_paths: Mapping[str, str | os.PathLike], report_dir: Path) -> Section:
    """The activation-statistics section: the layer profile figure and the outlier-neuron table
    of the stats Parquet files (prompt-set name -> path); links are relative to ``report_dir``."""
    stats, provs = read_stats(stats_paths)
    return _activation_section(stats, provs, _relpaths(stats_paths, report_dir))


# ---------------------------------------------------------------------------------------------
# run times


def rule_runtimes(benchmark_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Snakemake benchmark TSVs -> one row per file.

    Columns: ``rule`` (the file stem, without a trailing ``.benchmark``), ``seconds`` (wall clock,
    mean over repeats), ``max_rss_mb`` (max over repeats; missing when not measured) and
    ``benchmark`` (the file's path relative to the folder shared by all files, without ``.tsv``,
    e.g. ``collect/harmful`` when benchmarks are laid out as ``<stage>/<wildcard>.tsv``).
    """
    paths = [Path(p) for p in benchmark_paths]
    common = os.path.commonpath([str(p.resolve().parent) for p in paths]) if paths else ""
    rows = []
    for p in paths:
        try:
            df = pd.read_csv(p, sep="\t", na_values=["-", "NA", "n/a", ""])
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise NeuronAuditError(f"cannot read benchmark file {p}: {e}") from e
        if "s" not in df.columns or df.empty:
            raise NeuronAuditError(f"benchmark file {p} has no 's' column or no rows")
        seconds = pd.to_numeric(df["s"], errors="coerce")
        rss = pd.to_numeric(df.get("max_rss", pd.Series([np.nan])), errors="coerce")
        stem = p.stem[: -len(".benchmark")] if p.stem.endswith(".benchmark") else p.stem
        rel = Path(os.path.relpath(p.resolve(), common))
        rows.append({
            "rule": stem,
            "seconds": float(seconds.mean()),
            "max_rss_mb": float(rss.max()) if rss.notna().any() else np.nan,
            "benchmark": rel.with_suffix("").as_posix() if rel.suffix == ".tsv" else rel.as_posix(),
        })
    return pd.DataFrame(rows, columns=["rule", "seconds", "max_rss_mb", "benchmark"]).astype(
        {"rule": object, "seconds": float, "max_rss_mb": float, "benchmark": object}
    )


# ---------------------------------------------------------------------------------------------
# the report

# Provenance fields every stats table should carry; shown as ``missing`` when absent.
_EXPECTED_PROV = ("model_id", "weight_sha256", "dtype", "hook_site", "prompt_set", "prompt_set_hash",
                  "positions", "seed", "package_versions", "git_commit")


def _split_provenance(provs: Mapping[str, dict], links: Mapping[str, str],
                      rows: Mapping[str, int]) -> dict:
    """Fields identical in all stats tables (``common``) and each table's own fields."""
    keys = list(dict.fromkeys([k for p in provs.values() for k in p] + list(_EXPECTED_PROV)))
    many = len(provs) > 1
    common = {}
    if many:
        for k in keys:
            vals = [p.get(k) for p in provs.values()]
            if all(k in p for p in provs.values()) and all(v == vals[0] for v in vals):
                common[k] = vals[0]
    per_set = {}
    for name, p in provs.items():
        entry: dict[str, Any] = {"path": links[name], "rows": rows[name]}
        entry.update({k: p.get(k) for k in keys if k not in common})
        per_set[name] = entry
    out: dict[str, Any] = {}
    if common:
        out["common to all tables"] = common
    out["per prompt set"] = per_set
    return out


def _weight_check(manifest: Mapping, provs: Mapping[str, dict]) -> str:
    want = manifest.get("weight_sha256")
    got = {name: p.get("weight_sha256") for name, p in provs.items()}
    if _is_missing(want) or any(_is_missing(v) for v in got.values()):
        return MISSING
    bad = [name for name, v in got.items() if v != want]
    if bad:
        return f"MISMATCH in {', '.join(bad)}"
    return f"match ({len(got)} of {len(got)} tables)"


def _behaviours(config: Mapping) -> str:
    """The behaviours audited, as "name (positive vs negative)", from the config."""
    spec = (config or {}).get("behaviours") or {}
    if not isinstance(spec, Mapping) or not spec:
        return "none"
    parts = []
    for name, b in spec.items():
        if isinstance(b, Mapping) and "positive" in b and "negative" in b:
            parts.append(f"{name} ({b['positive']} vs {b['negative']})")
        else:
            parts.append(str(name))
    return "; ".join(parts)


def _as_headline(h: Headline | tuple[str, Any]) -> Headline:
    if isinstance(h, Headline):
        return h
    label, text = h
    key = re.sub(r"[^a-z0-9]+", "-", str(label).lower()).strip("-") or "headline"
    return Headline(key=f"x.{key}", label=str(label), text=_fmt(text))


def _summary(study: str, manifest: Mapping, stats: pd.DataFrame,
             provs: Mapping[str, dict]) -> list[tuple[str, Any]]:
    n_layers, n_neurons = manifest.get("n_layers"), manifest.get("n_neurons")
    total = (int(n_layers) * int(n_neurons)
             if not (_is_missing(n_layers) or _is_missing(n_neurons)) else None)
    model_id = _common([p.get("model_id") for p in provs.values()])
    if model_id == MISSING:
        model_id = _fmt(manifest.get("model_id"))
    pairs = stats[["layer", "neuron"]].drop_duplicates()
    items: list[tuple[str, Any]] = [
        ("study", study),
        ("model", model_id),
        ("model source", manifest.get("source")),
        ("model type", manifest.get("model_type")),
        ("layers × neurons", f"{_fmt(n_layers)} × {_fmt(n_neurons)}"),
        ("total neurons", total),
        ("d_model", manifest.get("d_model")),
        ("neurons with statistics", f"{len(pairs)} in {pairs['layer'].nunique()} layers"),
        ("hook site", _common([p.get("hook_site") for p in provs.values()])),
        ("weights vs stats provenance", _weight_check(manifest, provs)),
        ("prompt sets", f"{len(provs)}: {', '.join(provs)}"),
    ]
    for name, df in stats.groupby("prompt_set", sort=False):
        counts = df["count"]
        lo, hi = int(counts.min()), int(counts.max())
        count_text = str(lo) if lo == hi else f"{lo}–{hi} (varies by neuron)"
        p = provs.get(str(name), {})
        items.append((
            f"prompt set {name}",
            f"prompts: {_fmt(p.get('n_prompts'))}; activations per neuron: {count_text}; "
            f"positions: {_fmt(p.get('positions'))}",
        ))
    return items


def build_report(
    study: str,
    stats_paths: Mapping[str, str | os.PathLike],
    model_manifest: Mapping[str, Any],
    config: Mapping[str, Any],
    benchmark_paths: Sequence[str | os.PathLike],
    out_html: str | os.PathLike,
    stage_sections: Sequence[Section] = (),
    headlines: Sequence[Headline | tuple[str, Any]] = (),
    figures_dir: str | os.PathLike | None = None,
    study_dir: str | os.PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Write the audit report of ``study`` to ``out_html`` (atomically) and return its path.

    ``stats_paths`` maps prompt-set name -> stats Parquet file; ``model_manifest`` describes the
    model (source, path, model_type, n_layers, d_model, n_neurons, weight_sha256, ...);
    ``config`` is the workflow config, shown verbatim in the provenance; ``benchmark_paths`` are
    Snakemake benchmark TSVs (one per rule); ``stage_sections`` and ``headlines`` come from
    :func:`neuronaudit.report.sections.stage_sections`. With ``figures_dir``, every figure is also
    written there as a PNG file (:func:`write_figures`; table paths relative to ``study_dir``,
    by default the report folder's parent). ``title`` defaults to ``neuronaudit report: <study>``.
    """
    out_html = Path(out_html)
    model_manifest = model_manifest or {}
    stats, provs = read_stats(stats_paths)
    links = _relpaths(stats_paths, out_html.parent)
    rows = {str(k): int(v) for k, v in stats.groupby("prompt_set", sort=False).size().items()}
    section = _activation_section(stats, provs, links)
    runtimes = rule_runtimes(benchmark_paths) if benchmark_paths else None
    provenance = {
        "study": study,
        "model": dict(model_manifest) if model_manifest else None,
        "config": dict(config) if config else None,
        "stats tables": _split_provenance(provs, links, rows),
        "report build": {"package_versions": naio.package_versions(), "git_commit": naio.git_commit()},
        "rule run times": runtimes,
    }
    summary = _summary(study, model_manifest, stats, provs)
    summary.insert(2, ("behaviours audited", _behaviours(config)))
    sections = [*stage_sections, section]
    html_text = render_report(
        title=title or f"neuronaudit report: {study}",
        summary=summary,
        sections=sections,
        provenance=provenance,
        headlines=[_as_headline(h) for h in headlines],
    )
    if figures_dir is not None:
        write_figures(sections, figures_dir, study_dir if study_dir is not None else out_html.parent.parent,
                      out_html.parent)
    with naio.atomic_path(out_html) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
    return out_html


# ---------------------------------------------------------------------------------------------
# Snakemake's report()


