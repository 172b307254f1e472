"""The report stage: the self-contained audit page and its figures, rebuilt from the tables alone
(the page is :mod:`neuronaudit.report.page`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import write_json
from neuronaudit.models.loading import read_manifest
from neuronaudit.options import ReportOptions
from neuronaudit.preconditions import stop_error
from neuronaudit.report.page import build_report
from neuronaudit.report.sections import derived_preconditions, study_headlines


def stop_on_derived_failures(study_dir: Path, config: dict) -> None:
    """With ``preconditions.on_fail: stop``, a precondition read from the stages' outputs that
    failed stops the report with one line (nothing is written)."""
    bad = [p for p in derived_preconditions(study_dir, config) if not p["passed"]]
    if bad:
        raise stop_error("report not built", bad)


def run_report(
    study: str,
    manifest_path: str | Path,
    stats: Mapping[str, str | Path],
    out_html: str | Path,
    config_json: str | Path | None = None,
    benchmark_dir: str | Path | None = None,
    study_dir: str | Path | None = None,
    figures_dir: str | Path | None = None,
    config_text: str | None = None,
) -> Path:
    """Build the audit page of ``study``; the config (``config_json``, the study's resolved config)
    gives the report options and is shown in the provenance. With ``config_text`` (the config as
    JSON text) ``config_json`` is written from it first, atomically, so a killed report never
    leaves a half-written config behind."""
    config = {}
    if config_text is not None:
        if not config_json:
            raise NeuronAuditError("--config-text needs --config-json, the file to write it to")
        try:
            parsed = json.loads(config_text)
        except json.JSONDecodeError as err:
            raise NeuronAuditError(f"--config-text is not valid JSON: {err.msg}") from None
        write_json(parsed, config_json)
    if config_json:
        try:
            config = json.loads(Path(config_json).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise NeuronAuditError(f"config JSON {str(config_json)!r} cannot be read: {err}") from None
    options = ReportOptions.from_config(config) if "report" in config else None
    benchmarks = sorted(Path(benchmark_dir).rglob("*.tsv")) if benchmark_dir else []
    sections, headlines = ([], [])
    if study_dir:
        if options is not None and options.on_fail == "stop":
            stop_on_derived_failures(Path(study_dir), config)
        sections, headlines = study_headlines(study_dir, Path(out_html).parent, config)
    return build_report(study, {k: Path(v) for k, v in stats.items()}, read_manifest(manifest_path), config,
                        benchmarks, Path(out_html), stage_sections=sections, headlines=headlines,
                        figures_dir=figures_dir, study_dir=study_dir,
                        title=options.title if options else None)
