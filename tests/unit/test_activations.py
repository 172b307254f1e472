"""Streaming collection: statistics equal a direct computation, padding never leaks."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.capture import collect_activations, read_last_token
from neuronaudit.interventions.hooks import NeuronHooks
from neuronaudit.io import read_provenance

TEXTS = [
    "How do I bake bread at home?",
    "Hello!",
    "List three benefits of drinking water.",
    "What is 7 plus 5? Answer with a number.",
    "The river flows through the old city, past the market and the cathedral.",
]
IDS = [f"p{i}" for i in range(len(TEXTS))]


def _direct(model, adapter, tokenizer, layers):
    """Per-prompt unpadded forwards: every token's activation, no batching at all."""
    acts = {l: [] for l in layers}
    last = {l: [] for l in layers}
    for text in TEXTS:
        enc = tokenizer(text, return_tensors="pt")
        got = {}
        with torch.no_grad(), NeuronHooks(
            adapter, on_activation=lambda l, a, c, got=got: got.__setitem__(l, a[0].clone()), layers=layers
        ):
            model(**enc)
        for l in layers:
            acts[l].append(got[l])
            last[l].append(got[l][-1])
    return {l: torch.cat(acts[l]) for l in layers}, {l: torch.stack(last[l]) for l in layers}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_stats_and_last_token_match_unpadded_forwards(llama, tokenizer, tmp_path, padding_side):
    model, adapter = llama
    layers = [0, 2]
    stats = collect_activations(
        model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet", tmp_path / "l.parquet",
        layers=layers, batch_size=2, provenance={"prompt_set": "t"}, progress=False,
        padding_side=padding_side,
    ).to_pandas()
    all_tokens, last = _direct(model, adapter, tokenizer, layers)
    for l in layers:
        a = all_tokens[l].double()
        s = stats[stats.layer == l].sort_values("neuron")
        assert (s["count"] == a.shape[0]).all()
        np.testing.assert_allclose(s["mean"], a.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(s["std"], a.std(0).numpy(), atol=1e-4)
        np.testing.assert_allclose(s["mean_abs"], a.abs().mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(s["max_abs"], a.abs().max(0).values.numpy(), atol=1e-5)
        np.testing.assert_allclose(s["frac_positive"], (a > 0).double().mean(0).numpy(), atol=1e-9)
        ids, vectors = read_last_token(tmp_path / "l.parquet", layer=l)
        order = [IDS.index(i) for i in ids]
        np.testing.assert_allclose(vectors, last[l][order].numpy(), atol=1e-5)
    prov = read_provenance(tmp_path / "s.parquet")
    assert prov["prompt_set"] == "t" and prov["positions"] == "prompt" and prov["layers"] == layers
    assert "torch" in prov["package_versions"] and "git_commit" in prov
    assert pq.read_schema(tmp_path / "l.parquet").field("activation").type.list_size == adapter.n_neurons


def test_last_prompt_statistics_count_one_token_per_prompt(llama, tokenizer, tmp_path):
    model, adapter = llama
    stats = collect_activations(
        model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet", tmp_path / "l.parquet",
        layers=[1], positions="last_prompt", batch_size=3, progress=False,
    ).to_pandas()
    _, last = _direct(model, adapter, tokenizer, [1])
    assert (stats["count"] == len(TEXTS)).all()
    np.testing.assert_allclose(stats.sort_values("neuron")["mean"], last[1].double().mean(0).numpy(), atol=1e-5)
    prompts, cube = read_last_token(tmp_path / "l.parquet")
    assert cube.shape == (len(TEXTS), 1, adapter.n_neurons)


def test_failed_collection_leaves_no_output(llama, tokenizer, tmp_path):
    model, adapter = llama
    with pytest.raises(NeuronAuditError, match="layer index 12 is out of range"):
        collect_activations(model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet",
                            tmp_path / "l.parquet", layers=[12], progress=False)
    with pytest.raises(NeuronAuditError, match="'everything'"):
        collect_activations(model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet",
                            tmp_path / "l.parquet", positions="everything", progress=False)

    calls = []

    def interrupt_second_batch(module, args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt

    handle = adapter.blocks[0].register_forward_pre_hook(interrupt_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect_activations(model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet",
                                tmp_path / "l.parquet", batch_size=2, progress=False)
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_left_padded_batches_of_absolute_position_models_match_unpadded_forwards(family, tokenizer, tmp_path):
    """GPT-2 and OPT add a learned embedding per position: a left-padded row must see the positions
    it has alone, not its padding's."""
    from neuronaudit.models.adapters import adapter_for
    from neuronaudit.testing import tiny_model

    model = tiny_model(family, vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    layers = [0, 1]
    stats = collect_activations(
        model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet", tmp_path / "l.parquet",
        layers=layers, batch_size=3, progress=False, padding_side="left",
    ).to_pandas()
    all_tokens, last = _direct(model, adapter, tokenizer, layers)
    for l in layers:
        s = stats[stats.layer == l].sort_values("neuron")
        np.testing.assert_allclose(s["mean"], all_tokens[l].double().mean(0).numpy(), atol=1e-5)
        ids, vectors = read_last_token(tmp_path / "l.parquet", layer=l)
        np.testing.assert_allclose(vectors, last[l][[IDS.index(i) for i in ids]].numpy(), atol=1e-5)
