"""The KV cache is found under either of the names transformers has used for it."""

import torch

from neuronaudit.models.kv_cache import (
    cache_from_arguments,
    cache_from_output,
    cache_kwarg,
    cache_length,
)


def test_cache_found_under_either_name_and_its_length_read(llama, tokenizer):
    model, _ = llama
    ids = torch.tensor([tokenizer("Hello there, friend.")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = cache_from_output(out)
    assert cache is not None and cache_length(cache) == ids.shape[1]
    for name in ("cache", "past_key_values"):
        assert cache_from_arguments({name: cache}) is cache
        assert cache_from_arguments({"kwargs": {name: cache}}) is cache
    assert cache_from_arguments({"cache": None, "input_ids": ids}) is None and cache_length(None) == 0
    # the model takes it back under its own keyword and continues the sequence
    with torch.no_grad():
        step = model(input_ids=ids[:, -1:], use_cache=True, **{cache_kwarg(model): cache})
    assert cache_length(cache_from_output(step)) == ids.shape[1] + 1
