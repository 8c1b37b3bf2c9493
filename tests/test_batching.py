"""`--batch-size auto`: halve on out-of-memory until a whole step runs, and say which size ran."""
import pytest
import torch

from tlrefusal.batching import AUTO, is_out_of_memory, parse_batch_size, run_batched
from tlrefusal.errors import TlrefusalError


def step_that_fits(limit: int, tried: list[int], error=torch.OutOfMemoryError):
    def step(size: int) -> str:
        tried.append(size)
        if size > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f"ran at {size}"
    return step


def test_auto_halves_from_the_start_until_the_step_fits():
    tried: list[int] = []
    assert run_batched(step_that_fits(40, tried), AUTO, n_items=1000) == ("ran at 32", 32)
    assert tried == [256, 128, 64, 32]


def test_auto_starts_at_the_number_of_items_and_stops_at_one():
    tried: list[int] = []
    assert run_batched(step_that_fits(100, tried), AUTO, n_items=24) == ("ran at 24", 24)
    assert tried == [24]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        run_batched(step_that_fits(0, tried), AUTO, n_items=5)
    assert tried == [5, 2, 1]


def test_a_fixed_size_is_never_retried_and_other_errors_pass_through():
    tried: list[int] = []
    with pytest.raises(torch.OutOfMemoryError):
        run_batched(step_that_fits(8, tried), 16, n_items=100)
    assert tried == [16]
    tried.clear()
    with pytest.raises(ValueError):
        run_batched(step_that_fits(8, tried, ValueError), AUTO, n_items=100)
    assert tried == [100]


def test_cpu_allocation_failures_count_as_out_of_memory():
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1099511627776 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("value, expected", [("auto", AUTO), ("8", 8), (8, 8)])
def test_parse(value, expected):
    assert parse_batch_size(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "big"])
def test_parse_refuses(value):
    with pytest.raises(TlrefusalError, match="batch size"):
        parse_batch_size(value)
