"""Several studies side by side: one self-contained page (``neuronaudit compare``).

Each study is a ``results/<study>/`` folder. Its headline figures and figures are rebuilt from
its tables alone, by the same section builders as its own report
(:func:`neuronaudit.report.sections.stage_sections`, :func:`neuronaudit.report.page.activation_section`), so
a number or figure on the comparison page is the one on the study's page. The page sets them
side by side: one headline table with a column per study (rows matched by
:attr:`~neuronaudit.report.page.Headline.key`, the published number last), then per stage every figure
of every study in a row (:class:`~neuronaudit.report.page.FigureGrid`), then each study's provenance.
It is rendered by :func:`neuronaudit.report.page.render_report`, so the escaping and
Content-Security-Policy discipline of the audit page hold here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neuronaudit import io as naio
from neuronaudit.errors import NeuronAuditError
from neuronaudit.report.page import (
    MISSING,
    Figure,
    FigureGrid,
    Headline,
    Section,
    activation_section,
    render_report,
)
from neuronaudit.report.sections import STAGE_TITLES, study_headlines

__all__ = ["StudyView", "read_study", "build_comparison", "headlines_markdown"]


class StudyView:
    """One study as the comparison sees it: its sections, headlines, config and model manifest."""

    def __init__(self, name: str, study_dir: Path, sections: list[Section], headlines: list[Headline],
                 config: dict, manifest: dict) -> None:
        self.name, self.study_dir = name, study_dir
        self.sections, self.headlines = sections, headlines
        self.config, self.manifest = config, manifest

    def figures(self) -> dict[tuple[str, str], Figure]:
        """(section id, figure name) -> figure."""
        return {(s.id, f.name): f for s in self.sections for f in s.items if isinstance(f, Figure) and f.name}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_study(name: str, study_dir: str | os.PathLike, report_dir: str | os.PathLike) -> StudyView:
    """Rebuild the sections and headlines of ``study_dir`` (links relative to ``report_dir``).

    The model manifest is ``tune/manifest.json`` (the audited, refusal-tuned copy) when present;
    the config is the one the study's report recorded (``report/config.json``), when present.
    """
    study_dir, report_dir = Path(study_dir), Path(report_dir)
    if not study_dir.is_dir():
        raise NeuronAuditError(f"study folder not found: {study_dir}")
    sections, headlines = study_headlines(study_dir, report_dir)
    stats = {p.name[: -len(".stats.parquet")]: p for p in sorted((study_dir / "collect").glob("*.stats.parquet"))}
    if stats:
        sections.append(activation_section(stats, report_dir))
    if not sections:
        raise NeuronAuditError(f"study folder {study_dir} holds no stage tables to compare")
    return StudyView(name, study_dir, sections, headlines, _json(study_dir / "report" / "config.json"),
                     _json(study_dir / "tune" / "manifest.json"))


def _model(view: StudyView) -> str:
    source = view.manifest.get("source") or (view.config.get("model") or {}).get("source")
    return str(source) if source else MISSING


def _behaviours(view: StudyView) -> str:
    spec = view.config.get("behaviours") or {}
    return ", ".join(spec) if spec else MISSING


def _grid_sections(views: list[StudyView]) -> list[Section]:
    figures = [v.figures() for v in views]
    order = list(STAGE_TITLES)
    keys: list[tuple[str, str]] = []
    for f in figures:
        keys += [k for k in f if k not in keys]
    keys.sort(key=lambda k: order.index(k[0]) if k[0] in order else len(order))
    sections: dict[str, Section] = {}
    for stage, name in keys:
        first = next(f[(stage, name)] for f in figures if (stage, name) in f)
        title = next((s.title for v in views for s in v.sections if s.id == stage), stage)
        section = sections.setdefault(stage, Section(stage, title))
        section.items.append(FigureGrid(first.title, first.caption,
                                        tuple((v.name, f.get((stage, name))) for v, f in zip(views, figures))))
    return list(sections.values())


def build_comparison(studies: Mapping[str, str | os.PathLike], out_html: str | os.PathLike,
                     title: str | None = None) -> Path:
    """Write one page comparing ``studies`` (name -> ``results/<study>`` folder, two or more) to
    ``out_html`` (atomically) and return its path."""
    if len(studies) < 2:
        raise NeuronAuditError(f"compare needs two or more studies, got {len(studies)}")
    out_html = Path(out_html)
    views = [read_study(str(name), Path(d), out_html.parent) for name, d in studies.items()]
    summary: list[tuple[str, Any]] = [("studies", ", ".join(v.name for v in views))]
    for v in views:
        summary += [(f"{v.name}: model", _model(v)), (f"{v.name}: behaviours audited", _behaviours(v)),
                    (f"{v.name}: folder", os.path.relpath(v.study_dir.resolve(), out_html.parent.resolve()))]
    provenance = {
        v.name: {"folder": v.study_dir.as_posix(), "model": v.manifest or None, "config": v.config or None}
        for v in views
    }
    provenance["comparison build"] = {"package_versions": naio.package_versions(), "git_commit": naio.git_commit()}
    page = render_report(
        title=title or "neuronaudit comparison: " + " vs ".join(v.name for v in views),
        summary=summary,
        sections=_grid_sections(views),
        provenance=provenance,
        headlines={v.name: v.headlines for v in views},
    )
    with naio.atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_html


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def headlines_markdown(study_dir: str | os.PathLike) -> str:
    """The study's headline figures as a Markdown table, exactly the report's summary rows: the
    figure, its value with 95% CI as the page shows it, the published number it reproduces and
    the file it is read from (relative to ``study_dir``)."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise NeuronAuditError(f"study folder {str(study_dir)!r} not found")
    _, headlines = study_headlines(study_dir, study_dir)
    if not headlines:
        raise NeuronAuditError(f"study folder {str(study_dir)!r} has no stage summaries to report")
    rows = ["| figure | this study | published | read from |", "|---|---|---|---|"]
    for h in headlines:
        link = h.table_link
        files = ", ".join(f"`{v}`" for v in link.values()) if isinstance(link, Mapping) else (
            f"`{link}`" if link else "—")
        rows.append(f"| {_cell(h.label)} | {_cell(h.text)} | {_cell(h.published or '—')} | {files} |")
    return "\n".join(rows)
