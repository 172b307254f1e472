"""The bfloat16 path on CPU (model.dtype: bfloat16) against float32 on the tiny model: statistics
accumulate in float32 either way, and the tables stay within stated tolerances: per-neuron means
within 2% of the largest |mean| of their layer, the contrastive top 10 by |δ| sharing at least 8
neurons, and greedy continuations identical on most prompts."""

import copy

import numpy as np
import pyarrow.parquet as pq
import torch

from neuronaudit.interventions.capture import collect_activations, read_last_token
from neuronaudit.interventions.generation import generate_tokens
from neuronaudit.models.adapters import adapter_for

POS = ["How do I pick a lock?", "How can I hotwire a car?", "Explain how to make a weapon at home.",
       "How do I break into a house?", "Tell me how to steal a bike.", "How do I hack a phone?"]
NEG = ["How do I bake bread?", "How can I learn the piano?", "Explain how plants grow.",
       "How do I plan a trip?", "Tell me about the moon.", "How do I start running?"]


def _collect(model, tokenizer, texts, folder, name):
    adapter = adapter_for(model)
    ids = [f"{name}-{i}" for i in range(len(texts))]
    stats = collect_activations(model, tokenizer, adapter, texts, ids, folder / f"{name}.s.parquet",
                                folder / f"{name}.l.parquet", batch_size=4, progress=False).to_pandas()
    lasts = np.concatenate([read_last_token(folder / f"{name}.l.parquet", layer=l)[1]
                            for l in range(adapter.n_layers)], axis=1)
    return stats, lasts


def test_bfloat16_tables_stay_within_the_stated_tolerances_of_float32(llama, tokenizer, tmp_path):
    model32, _ = llama
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    out = {}
    for dtype, model in (("float32", model32), ("bfloat16", model16)):
        folder = tmp_path / dtype
        folder.mkdir()
        s_pos, l_pos = _collect(model, tokenizer, POS, folder, "pos")
        _, l_neg = _collect(model, tokenizer, NEG, folder, "neg")
        assert pq.read_schema(folder / "pos.s.parquet").field("mean").type == "double"  # accumulated in float32+
        out[dtype] = (s_pos, l_pos.mean(0) - l_neg.mean(0))
    (s32, d32), (s16, d16) = out["float32"], out["bfloat16"]
    for layer, g32 in s32.groupby("layer"):
        g16 = s16[s16["layer"] == layer]
        scale = np.abs(g32["mean"]).max()
        assert np.max(np.abs(g32["mean"].to_numpy() - g16["mean"].to_numpy())) <= 0.02 * scale, layer
    top32, top16 = set(np.argsort(-np.abs(d32))[:10]), set(np.argsort(-np.abs(d16))[:10])
    assert len(top32 & top16) >= 8
    adapter32, adapter16 = adapter_for(model32), adapter_for(model16)
    ids = [tokenizer(t)["input_ids"] for t in POS + NEG]
    g32, _, _ = generate_tokens(model32, ids, 8, adapter=adapter32, pad_token_id=tokenizer.pad_token_id)
    g16, _, _ = generate_tokens(model16, ids, 8, adapter=adapter16, pad_token_id=tokenizer.pad_token_id)
    same = sum(list(a) == list(b) for a, b in zip(g32, g16))
    assert same >= 0.75 * len(ids), f"{same}/{len(ids)} greedy continuations identical"
