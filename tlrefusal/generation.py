"""Batched greedy generation under hooks: left padding, explicit masks, KV cache, stop at EOS.

A reply stops at EOS or the template's end-of-turn token (`stop="turn"`, the default), or at EOS only
(`stop="eos"`, the original code, whose replies run on past Llama-3's <|eot_id|> or Gemma's <end_of_turn>;
special tokens are stripped from the text either way).

The TransformerBridge's KV-cached generation is checked against uncached and plain HF generation in
tests/test_generation.py (the transformers pin depends on it).
"""
from collections.abc import Sequence

import torch

from hooks.ablation import HookFn
from tlrefusal.activations import batches
from tlrefusal.chat import ChatFormat
from tlrefusal.model import LoadedModel
from tlrefusal.progress import Advance


@torch.inference_mode()
def greedy_completions(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    max_new_tokens: int,
    fwd_hooks: list[tuple[str, HookFn]] = (),
    batch_size: int = 32,
    advance: Advance | None = None,
    stop: str = "turn",
) -> list[str]:
    """Greedy replies, cut at the first stop token (`stop_tokens`), special tokens stripped."""
    tokenizer = model.tokenizer
    stops = stop_tokens(chat, tokenizer, stop)
    replies: list[str] = []
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in batches(list(instructions), batch_size):
            ids, mask = chat.encode(batch)
            out = model.bridge.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                        max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=bool(stops),
                                        eos_token_id=stops or None, return_type="tokens", verbose=False)
            replies += [decode_reply(tokenizer, row, stops) for row in out[:, ids.shape[1]:].tolist()]
            if advance is not None:
                advance(len(batch))
    return replies


def stop_tokens(chat: ChatFormat, tokenizer, stop: str) -> list[int]:
    """The tokens that end a reply: "turn": EOS and the template's end of turn; "eos": the tokenizer's EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop == "eos":
        return eos
    if stop == "turn":
        return list(chat.stop_ids) or eos
    raise ValueError(f"stop must be 'turn' or 'eos', got {stop!r}")


def decode_reply(tokenizer, tokens: list[int], stop_ids: Sequence[int]) -> str:
    """A reply's text: its tokens before the first stop token, special tokens stripped, whitespace trimmed.
    Every backend decodes with this one function (`tlrefusal.evaluation.backends`), so equal tokens make
    equal completions files."""
    return tokenizer.decode(until_stop(tokens, stop_ids), skip_special_tokens=True).strip()


def until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:cut]
