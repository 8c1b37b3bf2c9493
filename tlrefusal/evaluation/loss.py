"""CE loss on harmless text (the paper's Table 9): a token-weighted mean of -log p over masked tokens, float64 sums.

A `LossSequence` is token ids and the index of the first token whose prediction counts:
- the Pile: raw text, no template, truncated to 256 tokens; every token after the first counts;
- Alpaca and on-distribution: the instruction in the chat template, then a reply (Alpaca's reference
  output, or the model's own baseline completion), tokenized together as one string, as the original
  code does (SPEC 1.10); the tokens after the first run of post-instruction tokens count (`eoi_end`).
  Where the template's last token and the reply's first merge (Llama-2: '[/INST] ' + 'Sure' gives
  ']', '▁Sure'), the original finds the run only by its fuzzy match and the reply's first token is not
  scored; this module does the same.
"""
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from hooks.ablation import HookFn
from tlrefusal.activations import batches
from tlrefusal.chat import ChatFormat, left_pad
from tlrefusal.model import LoadedModel
from tlrefusal.progress import Advance

PILE_MAX_TOKENS = 256


@dataclass(frozen=True)
class LossSequence:
    ids: list[int]
    first_target: int  # ids[first_target:] are predicted and scored; >= 1

    def __post_init__(self) -> None:
        if not 1 <= self.first_target < len(self.ids):
            raise ValueError(f"first_target {self.first_target} leaves no scored token in {len(self.ids)} tokens")


def text_sequence(tokenizer, text: str, max_tokens: int = PILE_MAX_TOKENS) -> LossSequence | None:
    """Raw text (the Pile): BOS if the tokenizer adds one, truncated; every token after the first counts."""
    ids = tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
    return LossSequence(ids, 1) if len(ids) >= 2 else None


def reply_sequence(chat: ChatFormat, instruction: str, reply: str, score_from: int = 0) -> LossSequence | None:
    """Instruction in chat format + reply, tokenized as one string; the tokens after the first eoi run count,
    and with `score_from` (a character offset into the reply: where a reasoning model's final answer starts) only
    the tokens from there on, the reasoning before it in context but not scored.

    None when nothing would be scored: an empty reply, or no eoi run found (the original would then
    score the prompt's tokens too)."""
    prompt = chat.format(instruction)
    ids = chat.text_ids(prompt + reply)
    first = eoi_end(ids, chat.eoi_ids)
    if first is not None and score_from > 0:
        # The first token that differs from the prompt and reasoning tokenized alone holds answer text.
        before = chat.text_ids(prompt + reply[:score_from])
        first = max(first, next((i for i, (a, b) in enumerate(zip(ids, before, strict=False)) if a != b),
                                min(len(ids), len(before))))
    return LossSequence(ids, first) if first is not None and first < len(ids) else None


def eoi_end(ids: Sequence[int], eoi: Sequence[int]) -> int | None:
    """The index after the first run of the post-instruction tokens `eoi` in `ids` (the original's loss mask,
    `evaluate_loss.py`): scanning i from 0, the first i where ids[i:i+n] equals eoi, or, for a 6-token eoi
    (Llama-2's tokenization is not clean), where at least 4 of the 6 match; None if there is none."""
    n = len(eoi)
    for i in range(len(ids) - n + 1):
        matches = sum(a == b for a, b in zip(ids[i:i + n], eoi, strict=True))
        if matches == n or (n == 6 and matches >= n - 2):
            return i + n
    return None


@dataclass(frozen=True)
class CeLoss:
    """Token-weighted CE loss over `tokens` scored tokens of `sequences` sequences, and its exp."""

    loss: float
    perplexity: float
    tokens: int
    sequences: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CeLoss":
        return cls(**data)


@torch.inference_mode()
def ce_loss(model: LoadedModel, sequences: Sequence[LossSequence], fwd_hooks: list[tuple[str, HookFn]] = (),
            batch_size: int = 8, advance: Advance | None = None) -> CeLoss:
    """Sum of -log p(token) over scored tokens / their count."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    pad = model.tokenizer.pad_token_id
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in batches(list(sequences), batch_size):
            ids, mask = left_pad([s.ids for s in batch], pad)
            logits = model.bridge(ids.to(model.device), attention_mask=mask.to(model.device))
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
            nll = -logp.gather(-1, ids[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1).cpu().double()
            scored = torch.zeros_like(nll, dtype=torch.bool)
            width = ids.shape[1]
            for row, s in enumerate(batch):
                start = width - len(s.ids)  # left padding
                scored[row, start + s.first_target - 1:] = True
            total += nll[scored].sum()
            count += int(scored.sum())
            if advance is not None:
                advance(len(batch))
    loss = (total / max(count, 1)).item()
    return CeLoss(loss=loss, perplexity=float(torch.exp(torch.tensor(loss))), tokens=count,
                  sequences=len(sequences))
