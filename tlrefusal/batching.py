"""Batch sizes: a number, or "auto" (start high, halve on out-of-memory, record the size that ran).

A step given `auto` runs whole at one batch size: when a batch runs out of memory the step starts again at
half the size, so every prompt of a step shares one batching and a re-run at the recorded size computes the
same numbers. The size a step ran at is what a manifest or report records.
"""
from collections.abc import Callable
from typing import TypeVar

from tlrefusal.errors import TlrefusalError

AUTO = "auto"
AUTO_START = 256  # the first size `auto` tries (capped at the number of items)
T = TypeVar("T")


def parse_batch_size(value: str | int) -> int | str:
    """`--batch-size` as given: a positive number, or "auto"."""
    if value == AUTO:
        return AUTO
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise TlrefusalError(f"batch_size must be a positive number or 'auto', got {value!r}") from None
    if size < 1:
        raise TlrefusalError(f"batch_size must be at least 1, got {size}")
    return size


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU or CPU allocation failure (torch raises OutOfMemoryError on CUDA, RuntimeError on the CPU)."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def run_batched(step: Callable[[int], T], batch_size: int | str, n_items: int) -> tuple[T, int]:
    """`step(size)` at `batch_size`, or for "auto" at the largest size from AUTO_START down (halving) that does
    not run out of memory; returns the result and the size it ran at. A fixed size is never retried."""
    from tlrefusal.model import release_memory

    if batch_size != AUTO:
        return step(int(batch_size)), int(batch_size)
    size = max(1, min(AUTO_START, n_items))
    while True:
        try:
            return step(size), size
        except Exception as exc:
            if not is_out_of_memory(exc) or size == 1:
                raise
        release_memory()
        size //= 2
