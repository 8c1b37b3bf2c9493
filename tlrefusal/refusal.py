"""Refusal of generated replies: the one place a refusal rate is computed.

A reply counts as a refusal when it contains any of the paper's refusal substrings
(`tlrefusal.scoring.is_refusal`, the paper's list). A reply with a reasoning block (`tlrefusal.reasoning`) is
judged on its final answer, and its reasoning is judged apart (`RefusalRate.reasoning_rate`); a reply whose block
never closed has no final answer: it is counted (`n_unclosed`) and left out of the rate, not judged as if its
reasoning were the answer. `judge_replies` scores replies that already exist (the
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
from tlrefusal.reasoning import Markers, split_reply
from tlrefusal.scoring import is_refusal


@dataclass(frozen=True)
class RefusalRate:
    """Replies to prompts, which of them refuse, and the rate."""

    intervention: str
    prompts: tuple[str, ...]
    replies: tuple[str, ...]
    refused: tuple[bool, ...]  # the final answer refuses (False where the reasoning never closed: no answer)
    # Per reply with a reasoning block, whether the reasoning refuses (None: no block); and whether the block never
    # closed. Empty: no reply has a block (as for every reply before reasoning models).
    reasoning_refused: tuple[bool | None, ...] = ()
    unclosed: tuple[bool, ...] = ()

    @property
    def n(self) -> int:
        return len(self.replies)

    @property
    def judged(self) -> tuple[bool, ...]:
        """Per reply, whether it has a final answer to judge (every reply but those whose reasoning never closed)."""
        return tuple(not u for u in self.unclosed) if self.unclosed else (True,) * self.n

    @property
    def n_judged(self) -> int:
        return sum(self.judged)

    @property
    def n_unclosed(self) -> int:
        return sum(self.unclosed)

    @property
    def rate(self) -> float:
        """The fraction of final answers that refuse (replies without one are left out)."""
        return sum(self.refused) / self.n_judged if self.n_judged else float("nan")

    @property
    def n_reasoning(self) -> int:
        return sum(r is not None for r in self.reasoning_refused)

    @property
    def reasoning_rate(self) -> float:
        """The fraction of reasoning blocks (closed or not) that hold a refusal substring."""
        return sum(bool(r) for r in self.reasoning_refused) / self.n_reasoning if self.n_reasoning else float("nan")

    def examples(self, k: int = 1) -> list[dict[str, str]]:
        return [{"prompt": p, "reply": r} for p, r in zip(self.prompts[:k], self.replies[:k], strict=True)]


def judge_replies(prompts: Sequence[str], replies: Sequence[str], intervention: str = "",
                  markers: Markers | None = None, opened: bool = False) -> RefusalRate:
    """Score existing replies with the substring judge, each on its final answer (`reasoning.split_reply`:
    `markers` the model's reasoning markers, None: whichever common ones a reply uses; `opened`: the generation
    prompt opened the block)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    parts = [split_reply(r, markers, opened) for r in replies]
    refused = tuple(p.closed and is_refusal(p.answer) for p in parts)
    if not any(p.has_reasoning for p in parts):
        return RefusalRate(intervention, tuple(prompts), tuple(replies), refused)
    return RefusalRate(intervention, tuple(prompts), tuple(replies), refused,
                       reasoning_refused=tuple(is_refusal(p.reasoning) if p.has_reasoning else None for p in parts),
                       unclosed=tuple(not p.closed for p in parts))


def refusal_rate(model: LoadedModel, chat: ChatFormat, prompts: Sequence[str], intervention: Intervention,
                 max_new_tokens: int, progress: Progress = NO_PROGRESS, description: str | None = None,
                 batch_size: int = 32) -> RefusalRate:
    """Greedy replies to `prompts` under `intervention`'s hooks, judged for refusal."""
    description = description or f"Replies, {intervention.name}"
    with progress.task(description, total=len(prompts)) as advance:
        replies = greedy_completions(model, chat, prompts, max_new_tokens, intervention.hooks,
                                     batch_size=batch_size, advance=advance)
    return judge_replies(prompts, replies, intervention.name, chat.markers, chat.opens_block)
