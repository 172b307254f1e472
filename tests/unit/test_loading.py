"""Model sources: local directories, GGUF validation, manifests with sizes and weight hashes."""

import json

import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.models.loading import load_model, prepare_model
from neuronaudit.models.sources import resolve_source
from neuronaudit.testing import save_tiny_model


def test_prepare_local_directory_writes_manifest_with_shape_and_hash(tiny_model_dir, tmp_path):
    manifest = prepare_model(str(tiny_model_dir), tmp_path / "prepared")
    on_disk = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["kind"] == "local" and manifest["family"] == "llama"
    assert (manifest["n_layers"], manifest["d_model"], manifest["n_neurons"]) == (4, 64, 128)
    assert len(manifest["weight_sha256"]) == 64
    other = save_tiny_model(tmp_path / "other", seed=1)
    assert prepare_model(str(other), tmp_path / "p2")["weight_sha256"] != manifest["weight_sha256"]


def test_loaded_model_equals_the_saved_one(tiny_model_dir):
    model, tokenizer, adapter = load_model(tiny_model_dir)
    again, _, _ = load_model(tiny_model_dir)
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert adapter.n_layers == 4 and tokenizer.pad_token is not None


def test_a_base_model_folder_without_a_chat_template_is_fed_raw_text(tmp_path):
    from neuronaudit.prompts import render_prompts, uses_template

    _, tokenizer, _ = load_model(save_tiny_model(tmp_path / "base", family="gpt2", chat_template=False))
    assert not tokenizer.chat_template and not uses_template(tokenizer, "auto")
    assert render_prompts(tokenizer, ["Hello there"], "auto") == render_prompts(tokenizer, ["Hello there"], "none")
    assert render_prompts(tokenizer, ["Hello there"], "none") == ["Hello there"]


def test_unsupported_architecture_fails_at_prepare_time(tmp_path):
    import transformers

    cfg = transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mamba")
    with pytest.raises(NeuronAuditError, match=r"unsupported architecture model_type='mamba'"):
        prepare_model(str(tmp_path / "mamba"), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/definitely/not/here", "not found"),
        ("/definitely/not/here.gguf", "GGUF file not found"),
        ("embedded:NoSuchModel", "unknown embedded model 'NoSuchModel'"),
    ],
)
def test_bad_sources_are_named(spec, message):
    with pytest.raises(NeuronAuditError, match=message) as err:
        resolve_source(spec)
    assert spec.split(":")[-1] in str(err.value)


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_text("this is text, not GGUF")
    with pytest.raises(NeuronAuditError, match="is not a GGUF file"):
        resolve_source(str(fake))


def test_bad_dtype_is_named(tiny_model_dir):
    with pytest.raises(NeuronAuditError, match="model.dtype 'float8'"):
        load_model(tiny_model_dir, dtype="float8")


def test_two_model_folders_with_the_same_name_get_different_prepared_copies(tmp_path):
    from neuronaudit.models.sources import ModelSource

    a = ModelSource(spec=str(tmp_path / "a" / "model"), kind="local", path=str(tmp_path / "a" / "model"))
    b = ModelSource(spec=str(tmp_path / "b" / "model"), kind="local", path=str(tmp_path / "b" / "model"))
    assert a.slug != b.slug and a.slug.startswith("local-model-") and b.slug.startswith("local-model-")
    assert a.slug == ModelSource(spec="x", kind="local", path=str(tmp_path / "a" / "model")).slug  # stable
    embedded = ModelSource(spec="embedded:SmolLM2-135M-Instruct", kind="gguf",
                           path="/x/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert embedded.slug == "gguf-SmolLM2-135M-Instruct.Q4_1"  # unchanged: the default study's cache stays put


def test_gguf_header_keys_are_read_without_decoding_the_vocabulary(tmp_path):
    import shutil

    from neuronaudit.errors import NeuronAuditError
    from neuronaudit.models.sources import gguf_metadata, read_model_config, resolve_source

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_token_list([f"tok{i}" for i in range(5000)])  # an array before the key read last
    writer.add_feed_forward_length(48)
    writer.add_tensor("w", __import__("numpy").zeros((2, 2), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_model_config(resolve_source(str(path))) == {"model_type": "llama", "n_layers": 3, "n_neurons": 48}
    everything = gguf_metadata(path, lambda found: {"no.such.key"})
    assert everything["general.architecture"] == "llama" and "tokenizer.ggml.tokens" not in everything
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(path, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(200)
    with pytest.raises(NeuronAuditError, match=r"is truncated or malformed \(its header ends early\)"):
        gguf_metadata(cut, lambda found: {"no.such.key"})


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_native_bfloat16(tiny_model_dir, monkeypatch, native, expected):
    import neuronaudit.models.loading as loading
    from neuronaudit.stages.common import weights_dtype

    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: native)
    model, _, _ = load_model(tiny_model_dir, dtype="auto")
    assert next(model.parameters()).dtype == expected
    assert weights_dtype(model) == str(expected).removeprefix("torch.")  # what provenance records
    assert loading.resolve_dtype("float16", "cpu") == "float16"


def test_native_bfloat16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    import neuronaudit.models.loading as loading

    real_path = loading.Path
    for flags, native in (("fpu sse avx512f amx_bf16 amx_tile", True), ("fpu avx512f avx512_bf16", True),
                          ("fpu sse avx2 avx512f", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(loading, "Path", lambda p, _c=cpuinfo: _c if p == "/proc/cpuinfo" else real_path(p))
        assert loading.cpu_has_bf16() is native, flags
