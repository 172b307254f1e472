"""The KV cache across transformers versions.

transformers renamed the cache argument and output field of its models from ``past_key_values``
to ``cache`` (the old name is deprecated, then removed). These helpers name whichever one a model
takes, so the cached paths (hooks under ``generate``, shared-prefix dose sweeps) work on both.
"""

from __future__ import annotations

import copy
import inspect

NAMES = ("cache", "past_key_values")


def cache_kwarg(model) -> str:
    """The keyword under which ``model.forward`` takes its KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_from_arguments(arguments: dict):
    """The KV cache passed to a forward, from its bound arguments (``None`` when there is none)."""
    extra = arguments.get("kwargs") or {}
    for name in NAMES:
        for source in (arguments, extra):
            value = source.get(name)
            if value is not None:
                return value
    return None


def cache_from_output(output):
    """The KV cache a forward returned."""
    for name in NAMES:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_length(cache) -> int:
    """How many positions ``cache`` already holds (0 for no cache)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple cache: ((k, v), ...) with k [batch, heads, seq, dim]
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError):
        return 0


def broadcast_cache(cache, batch: int, from_layer: int = 0):
    """A copy of a batch-1 KV ``cache`` with layers ``>= from_layer`` repeated to ``batch`` rows.

    Layers below ``from_layer`` stay batch-1 (they are only valid when those blocks are not run,
    see :func:`neuronaudit.interventions.sweeps._replay_blocks`). The original cache is never
    modified: dynamic cache layers replace their tensors on update, so each layer is copied
    shallowly; other cache types are deep-copied.
    """
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    dynamic = layers is not None and all(
        type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for layer in layers
    )
    if dynamic:
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in layers]
    else:
        new = copy.deepcopy(cache)
    if batch == 1:
        return new
    for j, layer in enumerate(new.layers):
        if j >= from_layer:
            layer.batch_repeat_interleave(batch)
    return new


def select_cache_rows(cache, rows):
    """A copy of a batched KV ``cache`` holding the batch rows ``rows`` (a 1-D index tensor, rows
    may repeat), in that order; the original is never modified."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    dynamic = layers is not None and all(
        type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for layer in layers
    )
    if dynamic:
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in layers]
    else:
        new = copy.deepcopy(cache)
    for layer in new.layers:
        layer.batch_select_indices(rows)
    return new
