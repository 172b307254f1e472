"""The KV cache across transformers versions.

transformers renamed the cache argument and output field of its models from ``past_key_values``
to ``cache`` (the old name is deprecated, then removed). These helpers name whichever one a model
takes, so the cached paths (hooks under ``generate``, shared-prefix dose sweeps) work on both.
"""

from __future__ import annotations

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
