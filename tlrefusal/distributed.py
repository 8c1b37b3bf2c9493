"""Several processes under `torchrun`: who this process is, and the three collective steps extract uses.

`torchrun --nproc_per_node=N` starts N copies of a command and tells each its place through environment
variables (RANK, LOCAL_RANK, WORLD_SIZE; `world()`). Each process holds one model replica (on the CPU, or
on its own GPUs: `Placement.for_local_rank`). Extraction needs only three kinds of exchange, all of Python
objects: rank 0 hands what it computed to every rank (`on_main`), every rank runs the same step
(`everywhere`), and the ranks pool their results (`all_gather`). One process (no WORLD_SIZE, or 1) uses no
torch.distributed at all: each step is a plain call.

The process group is gloo on CPUs and GPUs alike: the only traffic is a few pickled objects (kept prompts,
the candidate tensor, score records), never activations, so NCCL would buy nothing and would need each
rank's CUDA device pinned before any exchange. gloo runs over TCP, across nodes too, through torchrun's
rendezvous; nothing assumes a filesystem shared between ranks.

Errors: a step that fails on any rank stops every rank (no rank waits forever for one that gave up). Rank 0
raises its own error, or `PeerFailed` naming the rank that failed, and the CLI prints it; the other ranks
raise `Reported`, which the CLI turns into a quiet exit 1, so a failure is printed once.
"""
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from tlrefusal.errors import TlrefusalError, first_line

T = TypeVar("T")
# How long a rank waits for the others at one step. Steps run for as long as rank 0's filtering and mean
# activations, or the slowest rank's share of the scoring: hours on a large model. A rank that crashes does
# not make the others wait this long: torchrun ends every process of the job when one exits with an error.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


class PeerFailed(TlrefusalError):
    """Raised on rank 0 when another rank failed at a step; the message is that rank's error."""


class Reported(TlrefusalError):
    """Raised on ranks other than 0 when a step failed: rank 0 prints the error, this rank exits quietly."""


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of the job's processes
    local_rank: int = 0  # this process among those on its node: which GPUs its replica takes
    size: int = 1  # how many processes the job has

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that claims the run folder, writes every artifact and prints."""
        return self.rank == 0


def world() -> World:
    """This process's place in a torchrun job, from the variables torchrun sets; one process without them."""
    values = {}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        text = os.environ.get(name)
        try:
            values[name] = None if text is None else int(text)
        except ValueError:
            raise TlrefusalError(f"{name}={text!r} is not a whole number (torchrun sets it)") from None
    size = values["WORLD_SIZE"] or 1
    rank = values["RANK"] or 0
    if size < 1 or not 0 <= rank < size:
        raise TlrefusalError(f"RANK={rank} does not fit WORLD_SIZE={size} (start several processes with torchrun)")
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    return World(rank=rank, local_rank=local, size=size)


@contextmanager
def process_group(world: World) -> Iterator[None]:
    """Join the job's gloo process group for the block (nothing for one process, or if one is joined)."""
    if world.size == 1:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():  # a caller that set up its own group keeps it
        yield
        return
    dist.init_process_group(backend="gloo", rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def share(items: Sequence[T], world: World) -> list[T]:
    """This rank's part of `items`: every size-th item from its rank on, so the ranks' parts are disjoint,
    cover `items` and each keeps the order of `items`. Neighbouring items (groups of candidates) cost about
    the same, so the parts cost about the same; a rank past the end of a short list gets none."""
    return list(items[world.rank::world.size])


def on_main(world: World, step: Callable[[], T]) -> T:
    """Run `step` on rank 0 and hand its result to every rank (pickled: no shared filesystem is needed)."""
    if world.size == 1:
        return step()
    import torch.distributed as dist

    failure, payload = None, [None]
    if world.is_main:
        try:
            payload = [(True, step())]
        except Exception as exc:
            failure, payload = exc, [(False, _describe(exc))]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if failure is not None:
        raise failure
    if not ok:
        raise Reported(value)
    return value


def everywhere(world: World, step: Callable[[], T]) -> T:
    """Run `step` on every rank and return this rank's result; if it failed on any rank, every rank stops."""
    if world.size == 1:
        return step()
    failure, result = None, None
    try:
        result = step()
    except Exception as exc:
        failure = exc
    errors = all_gather(world, None if failure is None else _describe(failure))
    if failure is not None:
        if world.is_main:
            raise failure
        raise Reported(errors[world.rank]) from failure
    failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
    if failed:
        rank, error = failed[0]
        raise (PeerFailed(f"rank {rank} of {world.size} failed: {error}") if world.is_main else Reported(error))
    return result


def all_gather(world: World, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    import torch.distributed as dist

    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def _describe(exc: Exception) -> str:
    """One line for another rank to print: the message of a user error, the type and first line of others."""
    if isinstance(exc, TlrefusalError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {first_line(exc)}"
