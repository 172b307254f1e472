"""Audit bundles: one study folder made publishable (``neuronaudit publish``), and a gallery page
over many (``neuronaudit gallery``).

A bundle is a copy of ``results/<study>/`` in the same layout (so the report's links and
``neuronaudit compare`` work on it unchanged), holding only what can be shared:

* every Parquet table, JSON summary, benchmark and the report with its figures (not the logs,
  not model weights);
* ``audit.json``: every headline figure with its value, CI, n, unit, test, published counterpart
  and precondition status, validated against the versioned JSON Schema shipped with the package
  (``neuronaudit/data/audit.schema.json``, :data:`AUDIT_SCHEMA_VERSION`);
* ``README.md``: an audit card with YAML front matter (model id and weight hash, config hash,
  package versions, one ``configs`` entry per table) and the headline findings in prose, so the
  folder is a Hugging Face dataset repository: ``datasets.load_dataset(DIR, "window-window")``.

No absolute local path leaves the machine: every path under the study, the workflow directory,
the home, the temporary folder or the Python prefix is rewritten (relative where it lies in the
study or the workflow directory, ``<local>/...`` otherwise) in JSON, text, the page and the
Parquet metadata and string columns; a last pass replaces any remaining absolute path whose top
folder exists on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from neuronaudit import __version__
from neuronaudit import io as naio
from neuronaudit.errors import NeuronAuditError
from neuronaudit.preconditions import affected
from neuronaudit.report.page import MISSING, Section, Table, render_report
from neuronaudit.report.sections import (
    STAGE_TITLES,
    precondition_failures,
    stage_sections,
    study_config,
)
from neuronaudit.resources import data_file

#: Version of ``audit.json``'s schema; bumped on any incompatible change.
AUDIT_SCHEMA_VERSION = "1.0"
#: Files a bundle carries (by suffix) and folders it leaves out.
SHARED_SUFFIXES = (".parquet", ".json", ".html", ".png", ".tsv", ".csv", ".txt")
SKIPPED_DIRS = ("logs", "weights", ".snakemake")
LOCAL = "<local>"
_ABSOLUTE = re.compile(r"(?<![\w.~<>-])/(?:[\w.@+-]+/)*[\w.@+-]+")


def audit_schema() -> dict:
    """The JSON Schema of ``audit.json``."""
    return json.loads(data_file("audit.schema.json").read_text(encoding="utf-8"))


# --- no local paths --------------------------------------------------------------------------


def local_roots(study_dir: Path) -> list[tuple[str, str]]:
    """(absolute prefix, replacement) pairs, most specific first: the study folder (paths in it
    become relative to it), the workflow directory (relative to it), then the current directory,
    home, temporary folder and Python prefix (``<local>``)."""
    study = Path(study_dir).absolute()
    pairs = [(study, ""), (study.parent.parent, "")]
    pairs += [(p, LOCAL + "/") for p in (Path.cwd(), Path.home(), Path(tempfile.gettempdir()), Path(sys.prefix))]
    out: list[tuple[str, str]] = []
    for path, repl in pairs:
        for form in {str(path), str(path.resolve())}:
            if form not in ("/", "") and form not in [p for p, _ in out]:
                out.append((form, repl))
    return sorted(out, key=lambda pr: -len(pr[0]))


#: The same in a page, where a path may follow a tag's ``>`` (but not ``<local>``'s).
_ABSOLUTE_HTML = re.compile(r"(?<![\w.~<-])(?<!<local>)/(?:[\w.@+-]+/)*[\w.@+-]+")


def scrub_text(text: str, roots: Sequence[tuple[str, str]], sweep: bool = True,
               pattern: re.Pattern = _ABSOLUTE) -> str:
    """``text`` with every local absolute path rewritten (see the module docstring)."""
    for prefix, repl in roots:
        text = text.replace(prefix + "/", repl)
        text = re.sub(re.escape(prefix) + r"(?![\w.@+-])", repl.rstrip("/") or ".", text)
    if sweep:
        def local(m: re.Match) -> str:
            top = m.group(0).split("/")[1]
            return f"{LOCAL}/{Path(m.group(0)).name}" if top and Path("/", top).exists() else m.group(0)

        text = pattern.sub(local, text)
    return text


#: A ``data:`` URI of the page (its embedded figures): base64 holds ``/``, so the last pass of
#: :func:`scrub_text` skips it.
_DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")


def scrub_html(text: str, roots: Sequence[tuple[str, str]]) -> str:
    """:func:`scrub_text` for the page: every part but its base64 ``data:`` URIs gets the last pass
    too, so a path outside the known roots (a model cache elsewhere) does not stay on the page."""
    text = scrub_text(text, roots, sweep=False)

    def part(chunk: str) -> str:  # ``<local>`` written as text, not as a tag the browser hides
        return scrub_text(chunk, (), pattern=_ABSOLUTE_HTML).replace(f"{LOCAL}/", "&lt;local&gt;/")

    out, last = [], 0
    for m in _DATA_URI.finditer(text):
        out += [part(text[last:m.start()]), m.group(0)]
        last = m.end()
    out.append(part(text[last:]))
    return "".join(out)


def _scrub_parquet(src: Path, dst: Path, roots: Sequence[tuple[str, str]]) -> pa.Table:
    table = pq.read_table(src)
    meta = {k: scrub_text(v.decode("utf-8", "replace"), roots).encode() for k, v in
            (table.schema.metadata or {}).items()}
    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            values = column.to_pylist()
            if any(isinstance(v, str) and "/" in v for v in values):
                column = pa.array([scrub_text(v, roots) if isinstance(v, str) else v for v in values],
                                  type=column.type)
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=table.schema.with_metadata(meta))
    with naio.atomic_path(dst) as tmp:
        pq.write_table(out, tmp)
    return out


def _copy_study(study_dir: Path, out_dir: Path, roots: Sequence[tuple[str, str]]) -> list[dict]:
    """Copy the shareable files of ``study_dir`` into ``out_dir`` with local paths rewritten;
    return the tables (path relative to the bundle, rows, columns)."""
    tables = []
    for src in sorted(study_dir.rglob("*")):
        rel = src.relative_to(study_dir)
        if not src.is_file() or src.suffix not in SHARED_SUFFIXES or any(p in SKIPPED_DIRS for p in rel.parts) \
                or src.name.startswith("."):
            continue
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".parquet":
            table = _scrub_parquet(src, dst, roots)
            tables.append({"path": rel.as_posix(), "rows": table.num_rows, "columns": table.column_names})
        elif src.suffix == ".png":
            shutil.copyfile(src, dst)
        else:  # text; the page's embedded images are base64 and are left as they are
            raw = src.read_text(encoding="utf-8")
            text = scrub_html(raw, roots) if src.suffix == ".html" else scrub_text(raw, roots)
            with naio.atomic_path(dst) as tmp:
                tmp.write_text(text, encoding="utf-8")
    return tables


# --- audit.json ------------------------------------------------------------------------------


def config_name(table_path: str) -> str:
    """The dataset config name of a table: ``window/window.parquet`` -> ``window-window``."""
    stem = table_path[: -len(".parquet")] if table_path.endswith(".parquet") else table_path
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")


def _model(bundle: Path) -> dict:
    """The audited model: the tuned copy's manifest, else the preconditions' provenance."""
    manifest = _read_json(bundle / "tune" / "manifest.json")
    if manifest:
        return {"id": manifest.get("source"), "weight_sha256": manifest.get("weight_sha256"),
                "model_type": manifest.get("model_type"), "n_layers": manifest.get("n_layers"),
                "n_neurons": manifest.get("n_neurons")}
    prov = _read_json(bundle / "preconditions.json").get("provenance") or {}
    return {"id": prov.get("model_id"), "weight_sha256": prov.get("weight_sha256"), "model_type": None,
            "n_layers": None, "n_neurons": None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def audit_summary(bundle: Path, study: str, tables: Sequence[Mapping]) -> dict:
    """The machine-readable summary of a bundle (or a study folder): every headline figure with
    its CI, n, test and precondition status, the preconditions and the tables."""
    config = study_config(bundle)
    _, headlines = stage_sections(bundle, bundle)
    failures = precondition_failures(bundle, config)
    checked = _read_json(bundle / "preconditions.json")
    heads = []
    for h in headlines:
        hit = affected(h.key, failures, config)
        lo, hi = h.ci if h.ci is not None else (None, None)
        meaningful = not hit
        heads.append({
            "key": h.key, "stage": h.key.split(".")[0], "label": h.label,
            "text": h.text if meaningful else "not meaningful: precondition failed (" +
            "; ".join(f"{f['name']} [{f['scope']}]" for f in hit) + ")",
            "value": _finite_or_none(h.value) if meaningful else None,
            "ci_low": _finite_or_none(lo) if meaningful else None,
            "ci_high": _finite_or_none(hi) if meaningful else None,
            "n": h.n, "unit": h.unit, "test": h.test,
            "published": (h.published or None) if meaningful else None,
            "status": ("not meaningful" if hit else "reported" if _finite_or_none(h.value) is not None else "missing"),
            "failed_preconditions": [f"{f['name']} [{f['scope']}]" for f in hit],
            "sources": sorted({p for _, p in h.links}),
        })
    return {
        "schema": "neuronaudit-audit",
        "schema_version": AUDIT_SCHEMA_VERSION,
        "study": study,
        "model": _model(bundle),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() if config else None,
        "neuronaudit_version": __version__,
        "package_versions": naio.package_versions(),
        "preconditions": {"on_fail": checked.get("on_fail") or (config.get("preconditions") or {}).get("on_fail"),
                          "checked": len(checked.get("preconditions") or []),
                          "failed": [{k: f.get(k) for k in ("name", "scope", "value", "threshold", "detail")}
                                     for f in failures]},
        "headlines": heads,
        "tables": [{"config_name": config_name(t["path"]), **t} for t in tables],
    }


def _finite_or_none(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def validate_audit(doc: Mapping) -> None:
    """Raise a one-line error if ``doc`` does not follow the audit schema."""
    import jsonschema

    try:
        jsonschema.validate(doc, audit_schema())
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top)"
        raise NeuronAuditError(f"audit.json {where}: {err.message}") from None


# --- the audit card --------------------------------------------------------------------------


def audit_card(audit: Mapping) -> str:
    """``README.md`` of the bundle: YAML front matter (Hugging Face dataset card metadata) and the
    headline findings in prose, from ``audit``."""
    model = audit["model"]
    front = {
        "pretty_name": f"neuronaudit audit: {audit['study']}",
        "tags": ["neuronaudit", "interpretability", "neuron-audit"],
        "model_id": model.get("id"),
        "weight_sha256": model.get("weight_sha256"),
        "config_sha256": audit.get("config_sha256"),
        "neuronaudit_version": audit["neuronaudit_version"],
        "package_versions": audit["package_versions"],
        "configs": [{"config_name": t["config_name"], "data_files": t["path"]} for t in audit["tables"]],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# Neuron audit: {audit['study']}", "",
             f"Model `{model.get('id') or MISSING}` (weights sha256 `{model.get('weight_sha256') or MISSING}`), "
             f"audited with neuronaudit {audit['neuronaudit_version']}. The report is `report/index.html`; "
             "every number below is read from the tables of this folder, and `audit.json` holds them "
             f"with their CIs (schema version {audit['schema_version']}).", ""]
    failed = audit["preconditions"]["failed"]
    lines += ["## Preconditions", ""]
    if failed:
        lines += [f"{len(failed)} precondition(s) failed; every figure that depends on one is marked not "
                  "meaningful and shown without its published counterpart:", ""]
        lines += [f"- {f['name']} [{f['scope']}]: {f.get('detail') or ''}" for f in failed]
    else:
        lines += [f"All {audit['preconditions']['checked']} checked preconditions passed."]
    lines += ["", "## Findings", ""]
    stage = None
    for h in audit["headlines"]:
        if h["stage"] != stage:
            stage = h["stage"]
            lines += ["", f"### {STAGE_TITLES.get(stage, stage)}", ""]
        published = f" Published: {h['published']}." if h.get("published") else ""
        lines.append(f"- **{h['label']}**: {h['text']}.{published}")
    lines += ["", "## Tables", "", "Each table is a dataset configuration:", "", "```python",
              "from datasets import load_dataset",
              f"table = load_dataset(\"<this repository or folder>\", \"{audit['tables'][0]['config_name']}\")"
              if audit["tables"] else "", "```", ""]
    lines += [f"- `{t['config_name']}`: `{t['path']}` ({t['rows']} rows)" for t in audit["tables"]]
    return "\n".join(lines) + "\n"


# --- publish ---------------------------------------------------------------------------------


def publish(study_dir: str | os.PathLike, out_dir: str | os.PathLike, push_to_hub: str | None = None,
            private: bool = True) -> Path:
    """Write the audit bundle of ``study_dir`` to ``out_dir`` (replaced atomically) and, with
    ``push_to_hub``, upload it as a Hugging Face dataset repository (needs the network and a
    token, as ``huggingface-cli login`` stores it)."""
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    if not study_dir.is_dir():
        raise NeuronAuditError(f"study folder not found: {str(study_dir)!r}")
    if out_dir.resolve() == study_dir.resolve() or study_dir.resolve() in out_dir.resolve().parents:
        raise NeuronAuditError(f"--out {str(out_dir)!r} must lie outside the study folder")
    if not (study_dir / "report" / "index.html").is_file():
        raise NeuronAuditError(f"study folder {str(study_dir)!r} has no report/index.html: run the study first")
    roots = local_roots(study_dir)
    with naio.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        tables = _copy_study(study_dir, tmp, roots)
        audit = audit_summary(tmp, study_dir.name, tables)
        audit = json.loads(scrub_text(json.dumps(audit), roots))
        validate_audit(audit)
        naio.write_json(audit, tmp / "audit.json")
        (tmp / "README.md").write_text(audit_card(audit), encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=push_to_hub, repo_type="dataset",
                          commit_message=f"neuronaudit audit of {audit['model'].get('id')}")
    return out_dir


def read_audit(folder: str | os.PathLike) -> dict:
    """``audit.json`` of a bundle, or the summary of a study folder computed on the fly."""
    folder = Path(folder)
    if (folder / "audit.json").is_file():
        audit = json.loads((folder / "audit.json").read_text(encoding="utf-8"))
        validate_audit(audit)
        return audit
    if not folder.is_dir():
        raise NeuronAuditError(f"audit bundle or study folder not found: {str(folder)!r}")
    return audit_summary(folder, folder.name, [])


# --- gallery ---------------------------------------------------------------------------------


def _cell(h: Mapping) -> str:
    if h["status"] == "not meaningful":
        return "not meaningful (" + "; ".join(h["failed_preconditions"]) + ")"
    if h["value"] is None:
        return h["text"]
    text = format(h["value"], ".3g")
    if h["ci_low"] is not None and h["ci_high"] is not None:
        text += f" (95% CI {h['ci_low']:.3g}–{h['ci_high']:.3g})"
    if h.get("n") is not None:
        text += f", n = {h['n']}" + (f" {h['unit']}" if h.get("unit") else "")
    return text


def build_gallery(folders: Iterable[str | os.PathLike], out_html: str | os.PathLike,
                  title: str = "neuronaudit gallery") -> Path:
    """One static page over many bundles (or study folders): a row per audit with links to its
    report and ``audit.json``, then per stage the headline figures of every audit side by side
    with their CIs and precondition marks."""
    out_html = Path(out_html)
    audits = [(Path(f), read_audit(f)) for f in folders]
    if not audits:
        raise NeuronAuditError("gallery needs at least one audit bundle")
    base = out_html.parent.resolve()
    rows, links = [], {}
    for folder, a in audits:
        name = f"{a['study']} ({a['model'].get('id') or MISSING})"
        rows.append({"audit": name, "model": a["model"].get("id") or MISSING,
                     "weights sha256": (a["model"].get("weight_sha256") or MISSING)[:12],
                     "preconditions failed": len(a["preconditions"]["failed"]),
                     "figures reported": sum(h["status"] == "reported" for h in a["headlines"]),
                     "figures not meaningful": sum(h["status"] == "not meaningful" for h in a["headlines"])})
        report = folder / "report" / "index.html"
        if report.is_file():
            links[f"{name}: report"] = os.path.relpath(report.resolve(), base)
        if (folder / "audit.json").is_file():
            links[f"{name}: audit.json"] = os.path.relpath((folder / "audit.json").resolve(), base)
    import pandas as pd

    sections = [Section("audits", "Audits", "One row per audit bundle; each links to its report.",
                        [Table("Audits", pd.DataFrame(rows), "One row per audited model with its precondition "
                               "status; the links open each audit's report and machine-readable summary.",
                               table_link=links)])]
    stages = list(dict.fromkeys(h["stage"] for _, a in audits for h in a["headlines"]))
    order = list(STAGE_TITLES)
    stages.sort(key=lambda s: order.index(s) if s in order else len(order))
    for stage in stages:
        labels = list(dict.fromkeys(h["label"] for _, a in audits for h in a["headlines"] if h["stage"] == stage))
        table = []
        for _, a in audits:
            by_label = {h["label"]: h for h in a["headlines"] if h["stage"] == stage}
            table.append({"audit": f"{a['study']} ({a['model'].get('id') or MISSING})",
                          **{label: _cell(by_label[label]) if label in by_label else MISSING for label in labels}})
        published = {h["label"]: h["published"] for _, a in audits for h in a["headlines"]
                     if h["stage"] == stage and h.get("published")}
        if published:
            table.append({"audit": "published", **{label: published.get(label, "") for label in labels}})
        sections.append(Section(stage, STAGE_TITLES.get(stage, stage), "",
                                [Table(STAGE_TITLES.get(stage, stage), pd.DataFrame(table),
                                       "Headline figures of each audit: value with 95% CI and n; a figure whose "
                                       "precondition failed is marked not meaningful.")]))
    page = render_report(title=title, summary=[("audits", len(audits))], sections=sections,
                         provenance={"built with": {"neuronaudit": __version__}})
    with naio.atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_html
