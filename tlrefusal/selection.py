"""Score every candidate direction and choose one by the paper's criteria. No file I/O.

For each candidate r = r_i^(l) on the filtered validation sets:
- bypass: mean refusal log-odds on harmful val under directional ablation of r_hat at every layer;
- induce: mean refusal log-odds on harmless val under activation addition of r (c = +1) at layer l;
- kl:     mean KL(P_base || P_ablated) at the last position on harmless val.
Discard NaN scores, layers >= int(L * (1 - 0.2)), kl > 0.1 and induce < 0; choose the minimum bypass.
Candidates the layer filter drops are never scored (their scores stay NaN). `score_groups` scores any list
of groups of candidates (`scored_keys` lists them in the one fixed order, `candidate_groups` cuts it into
groups), so the pipeline can deal them out to several processes and journal each group as it is
scored; `candidate_table` puts the scores back in order.

Several candidates share each forward pass (`candidates_per_pass`, consecutive in layer-major order): every
batch row carries its own candidate's direction, and the rows of all of them are batched by prompt length,
which keeps matmuls long and cuts the padding (the prompts of one candidate alone differ in length by up
to 3x). Which candidates share a pass is fixed by `candidate_groups`, whatever process scores them.
"""
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from hooks import ablation_hooks, addition_hooks
from tlrefusal.activations import last_logits, variant_last_logits
from tlrefusal.batching import AUTO, parse_batch_size
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.model import LoadedModel
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.scoring import kl_divergence, refusal_log_odds


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    # The paper's filters (the original code's `select_direction` defaults).
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layer_fraction: float = 0.2
    batch_size: int | str = 32  # or "auto" (`tlrefusal.batching`): each step records the size it ran at
    # Candidates scored in the same forward passes (rows per pass stay `batch_size`); exact, a speed lever only.
    candidates_per_pass: int = 6

    def __post_init__(self) -> None:
        if self.candidates_per_pass < 1:
            raise TlrefusalError(f"candidates_per_pass must be >= 1, got {self.candidates_per_pass}")
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise TlrefusalError(f"prune_layer_fraction must be in [0, 1), got {self.prune_layer_fraction}")
        if self.kl_threshold < 0:
            raise TlrefusalError(f"kl_threshold must be >= 0, got {self.kl_threshold}")
        object.__setattr__(self, "batch_size", parse_batch_size(self.batch_size))  # "8" -> 8, as the CLI gives

    def first_pruned_layer(self, n_layers: int) -> int:
        """Layers at or above this index are discarded: int(L * (1 - fraction))."""
        return int(n_layers * (1.0 - self.prune_layer_fraction))


@dataclass(frozen=True)
class CandidateScore:
    position: int
    layer: int
    bypass_score: float
    induce_score: float
    kl_score: float
    filtered: str | None = None  # why the candidate was discarded; None if it survived

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "CandidateScore":
        nan = float("nan")
        return cls(position=data["position"], layer=data["layer"],
                   bypass_score=nan if data["bypass_score"] is None else data["bypass_score"],
                   induce_score=nan if data["induce_score"] is None else data["induce_score"],
                   kl_score=nan if data["kl_score"] is None else data["kl_score"],
                   filtered=data.get("filtered"))


@dataclass(frozen=True)
class SelectionResult:
    candidates: tuple[CandidateScore, ...]
    chosen: CandidateScore | None
    config: SelectionConfig = field(default_factory=SelectionConfig)

    def filter_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.candidates:
            key = c.filtered or "kept"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def survivors(self) -> list[CandidateScore]:
        """Candidates that passed every filter, best (lowest bypass) first."""
        return sorted((c for c in self.candidates if c.filtered is None), key=lambda c: c.bypass_score)

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "chosen": None if self.chosen is None else self.chosen.to_json(),
            "filter_counts": self.filter_counts(),
            "candidates": [c.to_json() for c in self.candidates],
        }

    @classmethod
    def from_json(cls, data: dict) -> "SelectionResult":
        return cls(candidates=tuple(CandidateScore.from_json(c) for c in data["candidates"]),
                   chosen=None if data["chosen"] is None else CandidateScore.from_json(data["chosen"]),
                   # selection.json files written before candidates per pass scored one at a time
                   config=SelectionConfig(**{"candidates_per_pass": 1, **data["config"]}))


def filter_reason(score: CandidateScore, n_layers: int, config: SelectionConfig) -> str | None:
    """The first of the paper's filters that discards `score`, in the original code's order, or None."""
    if score.layer >= config.first_pruned_layer(n_layers):
        return f"layer >= {config.first_pruned_layer(n_layers)}"
    if any(math.isnan(s) for s in (score.bypass_score, score.induce_score, score.kl_score)):
        return "nan score"
    if score.kl_score > config.kl_threshold:
        return f"kl > {config.kl_threshold}"
    if score.induce_score < config.induce_threshold:
        return f"induce < {config.induce_threshold}"
    return None


def choose(candidates: list[CandidateScore], n_layers: int, config: SelectionConfig) -> SelectionResult:
    """Attach each candidate's filter reason and pick the survivor with the lowest bypass score."""
    judged = tuple(
        CandidateScore(c.position, c.layer, c.bypass_score, c.induce_score, c.kl_score,
                       filter_reason(c, n_layers, config))
        for c in candidates
    )
    survivors = [c for c in judged if c.filtered is None]
    chosen = min(survivors, key=lambda c: c.bypass_score) if survivors else None
    return SelectionResult(candidates=judged, chosen=chosen, config=config)


Key = tuple[int, int]  # a candidate: (position, layer)


def scored_keys(positions: Sequence[int], n_layers: int, config: SelectionConfig) -> list[Key]:
    """The candidates the layer filter keeps, in the one fixed order (layer-major, then position): the order
    one process scores them in."""
    return [(position, layer) for layer in range(min(config.first_pruned_layer(n_layers), n_layers))
            for position in positions]


def candidate_groups(keys: Sequence[Key], size: int) -> list[tuple[Key, ...]]:
    """`keys` in runs of `size`: the candidates that share forward passes. `distributed.share` deals out
    whole groups, so a candidate is batched with the same others (and scored to the same bits) whichever
    process scores it."""
    return [tuple(keys[start:start + size]) for start in range(0, len(keys), size)]


def candidate_table(positions: Sequence[int], n_layers: int, scores: Iterable[CandidateScore]) -> list[CandidateScore]:
    """Every (position, layer), in order, with its scores from `scores` (NaN where it was not scored)."""
    by_key = {(s.position, s.layer): s for s in scores}
    nan = float("nan")
    return [by_key.get((position, layer), CandidateScore(position, layer, nan, nan, nan))
            for position in positions for layer in range(n_layers)]


def score_candidates(
    model: LoadedModel,
    chat: ChatFormat,
    directions: Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_ids: list[int],
    config: SelectionConfig,
    progress: Progress = NO_PROGRESS,
) -> list[CandidateScore]:
    """bypass / induce / KL for every (position, layer) the layer filter keeps; NaN for the rest.

    `directions` is [n_pos, n_layer, d_model], indexed like `chat.positions`.
    """
    groups = candidate_groups(scored_keys(chat.positions, directions.shape[1], config), config.candidates_per_pass)
    scores = score_groups(model, chat, directions, harmful_val, harmless_val, refusal_ids, config, groups, progress)
    return candidate_table(chat.positions, directions.shape[1], scores)


def score_groups(
    model: LoadedModel,
    chat: ChatFormat,
    directions: Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_ids: list[int],
    config: SelectionConfig,
    groups: Sequence[Sequence[Key]],
    progress: Progress = NO_PROGRESS,
    on_scored: Callable[[list[CandidateScore]], None] | None = None,
    description: str = "Scoring candidate directions",
) -> list[CandidateScore]:
    """bypass / induce / KL of the candidates of `groups`, in that order; `on_scored` sees each group's scores
    as soon as the group is done.

    The candidates of a group share forward passes (`candidate_groups`). A candidate's scores depend on
    nothing but its group's directions and the val prompts (the same batches, whichever groups come before
    it), so any list of the groups scored in any process equals the same candidates of a full run bit for
    bit, given the same threads and devices.
    """
    n_pos, n_layers, _ = directions.shape
    if n_pos != len(chat.positions) or n_layers != model.n_layers:
        raise TlrefusalError(f"candidate directions have shape {tuple(directions.shape)}, expected "
                             f"({len(chat.positions)}, {model.n_layers}, {model.d_model})")
    scores: list[CandidateScore] = []
    if not groups:
        return scores
    if config.batch_size == AUTO:
        raise TlrefusalError("scoring needs a batch size; run_extract resolves 'auto' (tlrefusal.batching.run_batched)")
    bs = config.batch_size
    base_harmless = last_logits(model, chat, harmless_val, batch_size=bs)
    with progress.task(description, total=sum(map(len, groups))) as advance:
        for group in groups:
            rs = torch.stack([directions[chat.positions.index(position), layer] for position, layer in group])
            done = _score_group(model, chat, group, rs, harmful_val, harmless_val, base_harmless, refusal_ids, bs)
            scores += done
            if on_scored is not None:
                on_scored(done)
            advance(len(group))
    return scores


def _score_group(model: LoadedModel, chat: ChatFormat, group: Sequence[Key], rs: Tensor, harmful_val: list[str],
                 harmless_val: list[str], base_harmless: Tensor, refusal_ids: list[int], batch_size: int
                 ) -> list[CandidateScore]:
    """The scores of the candidates `group` (directions `rs`, one row each), all in the same forward passes."""
    layers = [layer for _, layer in group]
    rs = rs.to(model.device)  # once, not at every hook call
    # Harmful and harmless val share the ablation hooks: one stream of batches over both sets.
    ablated = variant_last_logits(model, chat, harmful_val + harmless_val,
                                  lambda rows: ablation_hooks(rs[rows], model.n_layers), len(group), batch_size)
    induced = variant_last_logits(model, chat, harmless_val,
                                  lambda rows: addition_hooks(rs[rows], [layers[i] for i in rows.tolist()], 1.0),
                                  len(group), batch_size)
    n_harmful = len(harmful_val)
    return [CandidateScore(position, layer,
                           bypass_score=refusal_log_odds(ablated[i, :n_harmful], refusal_ids).mean().item(),
                           induce_score=refusal_log_odds(induced[i], refusal_ids).mean().item(),
                           kl_score=kl_divergence(base_harmless, ablated[i, n_harmful:]).mean().item())
            for i, (position, layer) in enumerate(group)]
