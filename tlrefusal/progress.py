"""Progress reporting without a console: the library calls a reporter, the CLI renders it with Rich."""
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Advance(Protocol):
    def __call__(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> AbstractContextManager[Advance]:
        """A context manager yielding `advance(n)`; `total=None` means an unknown amount of work."""
        ...


class NullProgress:
    """The default reporter: reports nothing."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1: None


NO_PROGRESS = NullProgress()
