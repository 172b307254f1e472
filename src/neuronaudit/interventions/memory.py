"""Batches that run out of memory are split, not fatal.

:func:`split_on_oom` runs a batch and, when the device runs out of memory (CUDA's
``torch.cuda.OutOfMemoryError``, the CPU allocator's ``RuntimeError``, Python's ``MemoryError``),
logs it, frees the failed batch's tensors and the cached blocks and runs the two halves instead,
recursively down to one row. Results come back in row order, so a deterministic computation (a
forward, greedy decoding) gives the same table whatever the split; a sampled one is reseeded per
half from ``part`` (the path of halves, empty for the whole batch, so an unsplit batch keeps its
seed: :func:`part_seed`).
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Callable, Sequence
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
