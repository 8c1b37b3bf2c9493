"""One measurement taken under each intervention, or the reason it could not be taken (a hub dataset or
lm-eval task out of reach): the shape of report.json's CE-loss and coherence entries."""
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class _Json(Protocol):
    def to_json(self) -> dict: ...


T = TypeVar("T", bound=_Json)


@dataclass(frozen=True)
class PerIntervention(Generic[T]):
    """`runs`: intervention name -> result; or `unavailable`: why there are none."""

    runs: dict[str, T] = field(default_factory=dict)
    unavailable: str | None = None

    def to_json(self) -> dict:
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        return {name: result.to_json() for name, result in self.runs.items()}

    @classmethod
    def from_json(cls, data: dict, item: Callable[[dict], T]) -> "PerIntervention[T]":
        if "unavailable" in data:
            return cls(unavailable=data["unavailable"])
        return cls(runs={name: item(result) for name, result in data.items()})
