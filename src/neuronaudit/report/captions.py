"""Figure captions and the hooks of Snakemake's ``report()``: light enough for the workflow to
import while it is read (no matplotlib, no torch).

Each figure's one-sentence caption is package data, ``neuronaudit/report/captions/<figure>.rst``,
shared by the HTML page and ``snakemake --report``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from neuronaudit.errors import NeuronAuditError
from neuronaudit.resources import caption_dir

MISSING = "missing"

#: Caption files shared with Snakemake's ``report()``.
CAPTION_DIR = caption_dir()


_DEFAULT_CAPTIONS = {
    "layer_activation_profile": (
        "Per layer, the mean over neurons of each neuron's mean absolute activation (band: 10–90% "
        "of neurons) and, on a log scale, the largest absolute activation of any neuron, one line "
        "per prompt set."
    ),
    "neuron_outliers": (
        "The neurons with the largest absolute activation across prompt sets, with their mean "
        "absolute activation and how many times their layer's median peak they reach."
    ),
}


def caption(name: str) -> str:
    """The one-sentence caption ``name``: text of ``CAPTION_DIR/<name>.rst`` (whitespace
    collapsed), else the inline default."""
    path = CAPTION_DIR / f"{name}.rst"
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except OSError:
        text = ""
    if text:
        return text
    if name in _DEFAULT_CAPTIONS:
        return _DEFAULT_CAPTIONS[name]
    raise NeuronAuditError(f"no caption named {name!r} (looked for {path})")


_RST_SPECIAL = re.compile(r"([\\`*_|])")


def rst_captions() -> dict[str, str]:
    """Every caption of ``CAPTION_DIR`` (name -> text), escaped for reStructuredText, for the
    Snakemake report's caption template ``figure.rst`` (which is itself not a caption)."""
    names = {p.stem for p in CAPTION_DIR.glob("*.rst")} | set(_DEFAULT_CAPTIONS)
    names -= {"figure", "workflow"}
    return {name: _RST_SPECIAL.sub(r"\\\1", caption(name)) for name in sorted(names)}


def read_figure_manifest(figures_dir: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """The entries of ``<figures_dir>/manifest.json`` keyed by (stage, figure name)."""
    path = Path(figures_dir) / "manifest.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["figures"]
    except (OSError, ValueError, KeyError) as e:
        raise NeuronAuditError(f"cannot read figure manifest {path}: {e}") from e
    return {(e["stage"], e["name"]): e for e in entries}


def _figure_entry(wildcards, output) -> dict:
    entries = read_figure_manifest(output.figures)
    key = (str(wildcards.stage), str(wildcards.figure))
    if key not in entries:
        raise NeuronAuditError(f"figure {key[0]}/{key[1]}.png is not in {output.figures}/manifest.json")
    return entries[key]


def snakemake_category(wildcards, output) -> str:
    """Category of one figure file in ``snakemake --report``: its stage's section title (the
    report rule's ``figures`` output is the folder :func:`write_figures` wrote)."""
    return _figure_entry(wildcards, output)["stage_title"]


def snakemake_labels(wildcards, output) -> dict[str, str]:
    """Labels of one figure file in ``snakemake --report``: its title and the tables behind it,
    relative to ``results/<study>/``."""
    entry = _figure_entry(wildcards, output)
    return {"figure": entry["title"], "data": ", ".join(entry["tables"].values()) or MISSING}

