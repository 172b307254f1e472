"""Package data, read with :mod:`importlib.resources` so an installed wheel finds it: the config
schema, the judge's calibration sets, the figure captions and the report's template and CSS."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def data_file(*parts: str) -> Traversable:
    """``neuronaudit/data/<parts>``."""
    return resources.files("neuronaudit").joinpath("data", *parts)


def schema_path() -> Path:
    """The JSON Schema of the study config (YAML), as a file-system path (Snakemake's
    ``validate`` takes a path)."""
    return Path(str(data_file("config.schema.yaml")))


def calibration_path(name: str = "refusal_rollouts.jsonl") -> Path:
    """One of the judge's hand-labelled calibration sets."""
    return Path(str(data_file("calibration", name)))


def caption_dir() -> Path:
    """The folder of the one-sentence figure captions (``<figure>.rst``)."""
    return Path(str(resources.files("neuronaudit").joinpath("report", "captions")))


def report_template(name: str) -> str:
    """Text of a report template or stylesheet in ``neuronaudit/report/templates``."""
    return resources.files("neuronaudit").joinpath("report", "templates", name).read_text(encoding="utf-8")
