"""Reasoning ("thinking") blocks: their markers, a reply split into reasoning and final answer, and whether a
chat template's generation prompt leads into a block.

Reasoning models write `<think> ... </think>` before their answer: Qwen3 with thinking on writes the opener
itself; the DeepSeek-R1 distills' template puts it at the end of the generation prompt, so their replies hold only
the closer. The markers are read, not assumed per family: a pair `<NAME>` / `</NAME>` with NAME one of
`REASONING_NAMES`, found among the tokenizer's added tokens or in the template's text (`find_markers`).

Two things follow (the paper's models predate reasoning, so neither is in the paper):
- The refusal judge, the guard and on-distribution CE look at the final answer (`split_reply`), and the eval report
  gives the refusal rate inside the reasoning beside it. A reply whose block never closes within the token budget
  has no final answer: it is counted as unclosed and left out of the rates, never judged as if it were one.
- Extraction scores refusal at the first reply position, which for a reasoning model is the opener, not 'I'.
  `prompt_state` tells whether the generation prompt leaves the model at the start of an answer (no block, or a
  closed empty one: thinking off) or inside an open block; `tlrefusal.chat.ChatFormat.check_refusal_position`
  turns that into a one-line error naming the option to pass.
"""
from dataclasses import dataclass

# Tag names reasoning models use for their block (Qwen3, QwQ and the DeepSeek-R1 distills: think).
REASONING_NAMES = ("think", "thinking", "reasoning", "thought")
# Template variables that switch a hybrid model's thinking off, tried only to tell the user which one to pass:
# enable_thinking (Qwen3, SmolLM3) and thinking (DeepSeek-V3.1).
THINKING_OFF = (("enable_thinking", False), ("thinking", False))

# What the text after the instruction does (`prompt_state`): no reasoning marker; a closed block (thinking
# disabled: the empty block belongs to the post-instruction tokens); a block opened and left open.
NO_BLOCK, CLOSED_BLOCK, OPEN_BLOCK = "none", "closed", "open"


@dataclass(frozen=True)
class Markers:
    """A reasoning block's opener and closer, e.g. '<think>' and '</think>'."""

    open: str
    close: str

    def to_json(self) -> dict:
        return {"open": self.open, "close": self.close}


DEFAULT_MARKERS = tuple(Markers(f"<{name}>", f"</{name}>") for name in REASONING_NAMES)


def find_markers(tokenizer, template_text: str) -> Markers | None:
    """The reasoning markers of a model: the first pair of `DEFAULT_MARKERS` whose opener and closer are both
    tokens the tokenizer added (special or not), else both in the chat template's text; None for neither."""
    added = set(tokenizer.get_added_vocab()) if tokenizer is not None else set()
    for found_in in (added, template_text or ""):
        for markers in DEFAULT_MARKERS:
            if markers.open in found_in and markers.close in found_in:
                return markers
    return None


def marker_token_ids(tokenizer, markers: Markers | None) -> set[int]:
    """The ids of the markers where each is one token of the tokenizer's (empty if they are not tokens)."""
    if markers is None:
        return set()
    added = tokenizer.get_added_vocab()
    return {added[m] for m in (markers.open, markers.close) if m in added}


def prompt_state(suffix: str, markers: Markers | None) -> str:
    """What the text after the instruction does: OPEN_BLOCK (its last opener is not followed by a closer),
    CLOSED_BLOCK (it holds a closer after its last opener) or NO_BLOCK (no marker, or no markers known)."""
    if markers is None:
        return NO_BLOCK
    last_open, last_close = suffix.rfind(markers.open), suffix.rfind(markers.close)
    if last_open > last_close:
        return OPEN_BLOCK
    return CLOSED_BLOCK if last_close >= 0 else NO_BLOCK


@dataclass(frozen=True)
class SplitReply:
    """A reply cut at its reasoning block. `reasoning` None: the reply has no block, and `answer` is all of it."""

    reasoning: str | None
    answer: str  # the final answer; "" where the block never closed
    closed: bool  # False: the block opened (in the reply or in the prompt) and never closed: no final answer
    answer_start: int  # where `answer` starts in the reply (its length where there is none)

    @property
    def has_reasoning(self) -> bool:
        return self.reasoning is not None


def split_reply(reply: str, markers: Markers | None = None, opened: bool = False) -> SplitReply:
    """Reasoning and final answer of a reply.

    `markers`: the model's (`find_markers`); None: whichever of `DEFAULT_MARKERS` the reply uses. `opened`: the
    generation prompt itself opened the block (the reply then holds only its closer, or none if it never closed).
    Everything before the first closer is reasoning (an opener at its start dropped); the answer is what follows
    the closer, whitespace trimmed. A reply that opens a block (or follows a prompt that did) and never closes it
    has no answer.
    """
    if markers is None:
        used = [m for m in DEFAULT_MARKERS if m.close in reply or reply.lstrip().startswith(m.open)]
        markers = used[0] if used else DEFAULT_MARKERS[0]
    end = reply.find(markers.close)
    if end >= 0:
        start = end + len(markers.close)
        start += len(reply[start:]) - len(reply[start:].lstrip())  # the answer starts after the whitespace
        return SplitReply(_drop_opener(reply[:end], markers).strip(), reply[start:].rstrip(), True, start)
    if opened or reply.lstrip().startswith(markers.open):
        return SplitReply(_drop_opener(reply, markers).strip(), "", False, len(reply))
    return SplitReply(None, reply, True, 0)


def _drop_opener(text: str, markers: Markers) -> str:
    stripped = text.lstrip()
    return stripped[len(markers.open):] if stripped.startswith(markers.open) else text
