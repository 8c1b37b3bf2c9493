"""The projection-magnitude study (the NNsight replication's `magnitude_eval`).

For each prompt, with no intervention: projection ratio = (a . r) / ||r||^2, where a is resid_pre at the
chosen layer at position -1 and r the raw chosen direction (1 means a's component along r_hat is as long
as r), and the baseline refusal log-odds. Pearson r between the two, per dataset and pooled.
"""
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from hooks import sites
from tlrefusal.activations import batches, last_logits
from tlrefusal.chat import ChatFormat
from tlrefusal.model import LoadedModel
from tlrefusal.scoring import refusal_log_odds


@torch.inference_mode()
def projection_ratios(model: LoadedModel, chat: ChatFormat, instructions: Sequence[str],
                      direction: Float[Tensor, " d_model"], layer: int, batch_size: int = 32
                      ) -> Float[Tensor, " n"]:
    """(a . r) / ||r||^2 for a = resid_pre(layer) at the last prompt position, in float64."""
    r = direction.to(torch.float64)
    captured: list[Tensor] = []

    def capture(x: Tensor, hook: object) -> None:
        captured.append(x[:, -1, :].to(torch.float64).cpu())  # left padding: -1 is every prompt's last token

    with model.bridge.hooks(fwd_hooks=[(sites.resid_pre(layer), capture)]):
        for batch in batches(list(instructions), batch_size):
            ids, mask = chat.encode(batch)
            model.bridge(ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1)
    return torch.cat(captured) @ r / (r @ r)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r = cov(x, y) / (sd(x) sd(y)); None for fewer than 3 points or a constant series."""
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    if len(x) < 3:
        return None
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return None if denom == 0 else float(a @ b / denom)


@dataclass(frozen=True)
class DatasetMagnitude:
    """One prompt set: per-prompt projection ratios and baseline refusal log-odds, their mean and Pearson r."""

    n: int
    mean_projection_ratio: float
    pearson_r: float | None
    projection_ratio: list[float]
    refusal_log_odds: list[float]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DatasetMagnitude":
        return cls(**data)


@dataclass(frozen=True)
class PooledCorrelation:
    n: int
    pearson_r: float | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MagnitudeStudy:
    """The study per prompt set, and Pearson r over every prompt pooled."""

    datasets: dict[str, DatasetMagnitude]
    pooled: PooledCorrelation

    def to_json(self) -> dict:
        return {"datasets": {name: d.to_json() for name, d in self.datasets.items()}, "pooled": self.pooled.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "MagnitudeStudy":
        return cls(datasets={name: DatasetMagnitude.from_json(d) for name, d in data["datasets"].items()},
                   pooled=PooledCorrelation(**data["pooled"]))


def magnitude_study(model: LoadedModel, chat: ChatFormat, datasets: dict[str, Sequence[str]],
                    direction: Float[Tensor, " d_model"], layer: int, refusal_ids: list[int]) -> MagnitudeStudy:
    """Per dataset: mean projection ratio, Pearson r (ratio vs log-odds), per-prompt values; and pooled."""
    per_dataset: dict[str, DatasetMagnitude] = {}
    for name, instructions in datasets.items():
        ratios = projection_ratios(model, chat, instructions, direction, layer).tolist()
        odds = refusal_log_odds(last_logits(model, chat, instructions), refusal_ids).tolist()
        per_dataset[name] = DatasetMagnitude(n=len(ratios), mean_projection_ratio=sum(ratios) / len(ratios),
                                             pearson_r=pearson(ratios, odds), projection_ratio=ratios,
                                             refusal_log_odds=odds)
    pooled_ratio = [x for d in per_dataset.values() for x in d.projection_ratio]
    pooled_odds = [y for d in per_dataset.values() for y in d.refusal_log_odds]
    return MagnitudeStudy(datasets=per_dataset,
                          pooled=PooledCorrelation(n=len(pooled_ratio), pearson_r=pearson(pooled_ratio, pooled_odds)))
