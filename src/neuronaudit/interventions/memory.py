"""Batches that run out of memory are split, not fatal; batch sizes read from the free GPU memory.

:func:`split_on_oom` runs a batch and, when the device runs out of memory (CUDA's
``torch.cuda.OutOfMemoryError``, the CPU allocator's ``RuntimeError``, Python's ``MemoryError``),
logs it, frees the failed batch's tensors and the cached blocks and runs the two halves instead,
recursively down to one row. Results come back in row order, so a deterministic computation (a
forward, greedy decoding) gives the same table whatever the split; a sampled one is reseeded per
half from ``part`` (the path of halves, empty for the whole batch, so an unsplit batch keeps its
seed: :func:`part_seed`).

A batch-size setting of ``"auto"`` is sized from the device: :func:`bytes_per_row` estimates
the memory one row of a batch takes from the model's shape (:class:`ModelShape`),
:func:`free_memory` reads what the device has free (``torch.cuda.mem_get_info``; ``None`` on the
CPU) and :func:`auto_batch_size` turns the two into rows, the CPU keeping the configured default.
The estimate can be too high (allocator fragmentation, kernels' workspaces): :func:`split_on_oom`
stays the backstop.
"""

from __future__ import annotations

import gc
import logging
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

log = logging.getLogger("neuronaudit")

Row = TypeVar("Row")
Result = TypeVar("Result")

_CPU_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory", "cublas_status_alloc_failed")


def _oom_types() -> tuple[type, ...]:
    try:
        import torch
    except ImportError:
        return ()
    return tuple({t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t is not None})


def is_out_of_memory(err: BaseException) -> bool:
    """Is ``err`` the device running out of memory (GPU or CPU)?"""
    if isinstance(err, MemoryError):
        return True
    types = _oom_types()
    if types and isinstance(err, types):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _CPU_MESSAGES)


def _free_cached_memory() -> None:
    gc.collect()  # tensors of the failed batch held in reference cycles
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def split_on_oom(run: Callable[[Sequence[Row], tuple[int, ...]], list[Result]], rows: Sequence[Row],
                 label: str, part: tuple[int, ...] = ()) -> list[Result]:
    """``run(rows, part)`` (one result per row); on out-of-memory, the two halves in turn.

    The halves run after the failed call's frames are cleared and the exception dropped, so the
    tensors the failed batch allocated are free before the first half allocates its own.
    """
    try:
        out = run(rows, part)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if not is_out_of_memory(err) or len(rows) <= 1:
            raise
        reason = type(err).__name__
        traceback.clear_frames(err.__traceback__)  # the failed batch's locals (its activations)
    else:
        if len(out) != len(rows):
            raise ValueError(f"{label}: {len(out)} results for {len(rows)} rows")
        return out
    _free_cached_memory()  # outside the handler: the exception and its frames are gone
    mid = len(rows) // 2
    log.warning("%s: out of memory on a batch of %d rows (%s); retrying as batches of %d and %d",
                label, len(rows), reason, mid, len(rows) - mid)
    return (split_on_oom(run, rows[:mid], label, part + (0,))
            + split_on_oom(run, rows[mid:], label, part + (1,)))


def part_seed(seed: int, batch_index: int, part: tuple[int, ...]) -> int:
    """The torch seed of one sampled batch (``part`` empty: the seed
    :func:`~neuronaudit.interventions.generation.batch_seed` gives it) or of one of its halves
    after an out-of-memory split (``part`` the path of halves)."""
    if not part:
        return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1)[0])
    return int(np.random.SeedSequence([int(seed), int(batch_index), len(part), *part]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# batch sizes from the free GPU memory
# --------------------------------------------------------------------------------------------

#: Share of the free device memory a batch may take (the rest: allocator fragmentation, kernels'
#: workspaces and what a stage keeps beside its batches).
HEADROOM = 0.8
#: Most rows an ``"auto"`` batch size gives.
MAX_AUTO_ROWS = 1024


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that set its memory per batch row."""

    n_layers: int
    d_model: int
    d_ff: int  # MLP width (neurons per layer)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, model, adapter) -> ModelShape:
        """The shape of a loaded model: layers and widths from its adapter, heads and vocabulary
        from its config (the text config of a multimodal one), bytes from its parameters."""
        config = model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()

        def first(*names):
            for name in names:
                value = getattr(config, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            return None

        heads = first("num_attention_heads", "n_head") or 1
        return cls(n_layers=adapter.n_layers, d_model=adapter.d_model, d_ff=adapter.n_neurons, n_heads=heads,
                   n_kv_heads=first("num_key_value_heads", "n_head_kv") or heads,
                   head_dim=first("head_dim") or max(1, adapter.d_model // heads),
                   vocab=first("vocab_size") or int(adapter.unembed.shape[0]),
                   dtype_bytes=next(model.parameters()).element_size())


@dataclass(frozen=True)
class RowLoad:
    """What one row of a stage's batches runs: ``tokens`` positions per forward, ``cached``
    positions in its KV cache at the end (0: no cache is kept), ``logits`` positions whose
    next-token distribution is computed, whether a backward pass follows (``backward``) and the
    bytes per position the stage's hooks read on top (``hook_bytes``)."""

    tokens: int
    cached: int = 0
    logits: int = 1
    backward: bool = False
    hook_bytes: int = 0


def bytes_per_row(shape: ModelShape, load: RowLoad) -> int:
    """Estimated device memory one row of a batch takes, in bytes.

    With ``b`` bytes per parameter, ``L`` layers, ``d`` the hidden size, ``f`` the MLP width,
    ``h`` attention heads, ``k`` KV heads of ``e`` dimensions, ``V`` the vocabulary, ``T`` the
    positions a forward runs, ``C`` the positions in the KV cache and ``P`` the positions whose
    logits are computed (:class:`RowLoad`)::

        layer   = T · (4·d + 3·f + h·max(T, C)) · b + T · hook_bytes
        held    = L · layer  with a backward pass, else layer
        kv      = 2 · L · k · e · C · b
        logits  = P · V · (b + 12)
        per row = held + kv + logits

    ``layer`` is one decoder layer's working set (residual, normed input, attention output and
    MLP output: ``4·d``; gate, up and activation of the MLP: ``3·f``; one score per head and
    attended position), which an inference forward frees before the next layer, while a backward
    pass keeps every layer's; ``kv`` is the keys and values of every layer for the cached
    positions (generation); ``logits`` the head's output in the model's dtype plus its float32
    copy, log-softmax and entropy terms (``12`` bytes). The weights are not counted: they are
    loaded, so the free memory read afterwards has already lost them.
    """
    b = shape.dtype_bytes
    T, C = max(int(load.tokens), 1), max(int(load.cached), 0)
    layer = T * (4 * shape.d_model + 3 * shape.d_ff + shape.n_heads * max(T, C)) * b + T * int(load.hook_bytes)
    held = shape.n_layers * layer if load.backward else layer
    kv = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * C * b
    logits = max(int(load.logits), 0) * shape.vocab * (b + 12)
    return int(held + kv + logits)


def auto_batch_size(free_bytes: int | None, bytes_per_row: int, cpu_default: int, lo: int = 1,
                    hi: int = MAX_AUTO_ROWS, headroom: float = HEADROOM) -> int:
    """Rows per batch: ``headroom · free_bytes / bytes_per_row``, clipped to ``[lo, hi]``;
    ``cpu_default`` where no device memory is read (``free_bytes`` ``None``: the CPU)."""
    if free_bytes is None:
        return int(cpu_default)
    if bytes_per_row <= 0:
        raise ValueError(f"bytes_per_row {bytes_per_row!r} must be positive")
    rows = math.floor(headroom * max(int(free_bytes), 0) / bytes_per_row)
    return int(min(max(rows, lo), hi))


def free_memory(device) -> int | None:
    """Bytes a batch can take on ``device``: what the driver reports free
    (``torch.cuda.mem_get_info``) plus what torch's caching allocator holds unused; ``None`` for
    the CPU and any other device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(int(cached), 0)
