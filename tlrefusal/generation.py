"""Batched greedy generation under hooks: left padding, explicit masks, KV cache, stop at EOS.

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
) -> list[str]:
    """Greedy replies, cut at the first stop token (EOS or the template's end of turn), special tokens
    stripped."""
    tokenizer = model.tokenizer
    stops = list(chat.stop_ids) or [tokenizer.eos_token_id]
    replies: list[str] = []
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in batches(list(instructions), batch_size):
            ids, mask = chat.encode(batch)
            out = model.bridge.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                        max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=True,
                                        eos_token_id=stops, return_type="tokens", verbose=False)
            for row in out[:, ids.shape[1]:].tolist():
                replies.append(tokenizer.decode(until_stop(row, stops), skip_special_tokens=True).strip())
            if advance is not None:
                advance(len(batch))
    return replies


def until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:cut]
