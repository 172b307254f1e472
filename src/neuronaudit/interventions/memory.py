"""Batches that run out of memory are split, not fatal.

:func:`split_on_oom` runs a batch and, when the device runs out of memory (CUDA's
``torch.OutOfMemoryError``, the CPU allocator's ``RuntimeError``, Python's ``MemoryError``),
logs it, frees the cached blocks and runs the two halves instead, recursively down to one row.
Results come back in row order, so a deterministic computation (a forward, greedy decoding) gives
the same table whatever the split; a sampled one is reseeded per half from ``part`` (the path of
halves, empty for the whole batch, so an unsplit batch keeps its seed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger("neuronaudit")

Row = TypeVar("Row")
Result = TypeVar("Result")

_CPU_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Is ``err`` the device running out of memory (GPU or CPU)?"""
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _CPU_MESSAGES)


def _free_cached_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def split_on_oom(run: Callable[[Sequence[Row], tuple[int, ...]], list[Result]], rows: Sequence[Row],
                 label: str, part: tuple[int, ...] = ()) -> list[Result]:
    """``run(rows, part)`` (one result per row); on out-of-memory, the two halves in turn."""
    try:
        out = run(rows, part)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if not is_out_of_memory(err) or len(rows) <= 1:
            raise
        _free_cached_memory()
        mid = len(rows) // 2
        log.warning("%s: out of memory on a batch of %d rows (%s); retrying as batches of %d and %d",
                    label, len(rows), type(err).__name__, mid, len(rows) - mid)
        return (split_on_oom(run, rows[:mid], label, part + (0,))
                + split_on_oom(run, rows[mid:], label, part + (1,)))
    if len(out) != len(rows):
        raise ValueError(f"{label}: {len(out)} results for {len(rows)} rows")
    return out
