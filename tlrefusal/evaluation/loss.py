"""CE loss on harmless text (the paper's Table 9): a token-weighted mean of -log p over masked tokens, float64 sums.

A `LossSequence` is token ids and the index of the first token whose prediction counts:
- the Pile: raw text, no template, truncated to 256 tokens; every token after the first counts;
- Alpaca and on-distribution: the instruction in the chat template, then a reply (Alpaca's reference
  output, or the model's own baseline completion); only the reply tokens count.
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


def reply_sequence(chat: ChatFormat, instruction: str, reply: str) -> LossSequence | None:
    """Instruction in chat format + reply; only the reply's tokens count (the paper's loss mask)."""
    prompt = chat.tokenizer.encode(chat.format(instruction), add_special_tokens=False)
    reply_ids = chat.tokenizer.encode(reply, add_special_tokens=False)
    return LossSequence(prompt + reply_ids, len(prompt)) if reply_ids else None


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
