"""Refusal of generated replies: the one place a refusal rate is computed.

A reply counts as a refusal when it contains any of the paper's refusal substrings
(`tlrefusal.scoring.is_refusal`, the paper's list). `judge_replies` scores replies that already exist (the
completions `tlrefusal eval` saved); `refusal_rate` generates greedy replies to prompts under an
intervention and scores them. The organism's model card, the demo job, `tlrefusal eval` and the
benchmarks all go through these two functions.
"""
from collections.abc import Sequence
from dataclasses import dataclass

from tlrefusal.chat import ChatFormat
from tlrefusal.generation import greedy_completions
from tlrefusal.interventions import Intervention
from tlrefusal.model import LoadedModel
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.scoring import is_refusal


@dataclass(frozen=True)
class RefusalRate:
    """Replies to prompts, which of them refuse, and the rate."""

    intervention: str
    prompts: tuple[str, ...]
    replies: tuple[str, ...]
    refused: tuple[bool, ...]

    @property
    def n(self) -> int:
        return len(self.replies)

    @property
    def rate(self) -> float:
        return sum(self.refused) / self.n if self.n else float("nan")

    def examples(self, k: int = 1) -> list[dict[str, str]]:
        return [{"prompt": p, "reply": r} for p, r in zip(self.prompts[:k], self.replies[:k], strict=True)]


def judge_replies(prompts: Sequence[str], replies: Sequence[str], intervention: str = "") -> RefusalRate:
    """Score existing replies with the substring judge."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    return RefusalRate(intervention, tuple(prompts), tuple(replies), tuple(is_refusal(r) for r in replies))


def refusal_rate(model: LoadedModel, chat: ChatFormat, prompts: Sequence[str], intervention: Intervention,
                 max_new_tokens: int, progress: Progress = NO_PROGRESS, description: str | None = None,
                 batch_size: int = 32) -> RefusalRate:
    """Greedy replies to `prompts` under `intervention`'s hooks, judged for refusal."""
    description = description or f"Replies, {intervention.name}"
    with progress.task(description, total=len(prompts)) as advance:
        replies = greedy_completions(model, chat, prompts, max_new_tokens, intervention.hooks,
                                     batch_size=batch_size, advance=advance)
    return judge_replies(prompts, replies, intervention.name)
