"""Forward passes over prompt batches: last-position logits and mean activations.

Every call tokenizes with the model's chat format (left padding, explicit attention mask) and runs the
TransformerBridge under `model.bridge.hooks(...)`, so interventions are plain hook lists.
"""
import copy
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hooks import MeanRecorder
from hooks.ablation import HookFn
from tlrefusal.chat import ChatFormat, left_pad
from tlrefusal.errors import TlrefusalError
from tlrefusal.model import LoadedModel
from tlrefusal.progress import Advance


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def length_sorted_batches(token_lists: Sequence[Sequence[int]], size: int):
    """Batches of row indices whose prompts have similar token lengths.

    Left padding costs compute in proportion to the length spread within a batch; sorting by length first
    removes most of it without changing any prompt's result (each row's logits depend only on its tokens).
    """
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    yield from batches(order, size)


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with (the chat template's head), leaving each prompt at least one more."""
    shortest = min(map(len, token_lists))
    n = 0
    while n < shortest - 1 and len({tokens[n] for tokens in token_lists}) == 1:
        n += 1
    return n


RowHooks = Callable[[Tensor], list[tuple[str, HookFn]]]  # a batch's rows' variant ids -> the batch's hooks


@torch.inference_mode()
def last_logits(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    fwd_hooks: list[tuple[str, HookFn]] = (),
    batch_size: int = 32,
    advance: Advance | None = None,
    share_prefix: bool = True,
) -> Float[Tensor, "n d_vocab"]:
    """Logits at the last prompt position, under `fwd_hooks`, as float32 on the CPU, in input order.

    Three savings leave every row's result unchanged (up to float rounding; tests compare with plain
    full passes): the template head that all prompts share is run once, under the same hooks, and its
    KV cache reused by every batch; prompts are batched by length, so little compute goes to padding;
    and `logits_to_keep=1` applies the unembedding at the last position only.
    """
    return variant_last_logits(model, chat, instructions, lambda rows: list(fwd_hooks), 1, batch_size, advance,
                               share_prefix)[0]


@torch.inference_mode()
def variant_last_logits(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    hooks_for: RowHooks,
    n_variants: int,
    batch_size: int = 32,
    advance: Advance | None = None,
    share_prefix: bool = True,
) -> Float[Tensor, "n_variants n d_vocab"]:
    """`last_logits` of every prompt under each of `n_variants` interventions, in one stream of batches.

    Each prompt runs once per variant, and the rows of all variants are batched together by length, so a
    batch holds several variants' rows: matmuls stay long while the length spread within a batch (the
    padding) shrinks. `hooks_for(variants)` gives the hooks of a batch whose rows belong to `variants` (a
    LongTensor, one id per row), for example ablation of one direction per row. The template head runs once
    per variant, under that variant's hooks; each row reuses its own variant's head cache. One variant is
    `last_logits` exactly (the same batches).
    """
    tokens = chat.tokenize(instructions)
    n_shared = shared_prefix_length(tokens) if share_prefix else 0
    rows = [(variant, i) for variant in range(n_variants) for i in range(len(tokens))]
    out = torch.empty(0)
    head = tokens[0][:n_shared]
    prefix_cache = _variant_head_cache(model, head, hooks_for, n_variants, batch_size)
    for batch in length_sorted_batches([tokens[i] for _, i in rows], batch_size):
        variants = torch.tensor([rows[r][0] for r in batch])
        prompts = [rows[r][1] for r in batch]
        ids, mask, kwargs = _suffix_inputs(model, chat, [tokens[i] for i in prompts], n_shared, prefix_cache,
                                           variants)
        with model.bridge.hooks(fwd_hooks=hooks_for(variants)):
            logits = model.bridge(ids, attention_mask=mask, logits_to_keep=1, **kwargs)[:, -1, :].float().cpu()
        if not out.numel():
            out = torch.empty(n_variants, len(tokens), logits.shape[-1])
        out[variants, torch.tensor(prompts)] = logits
        if advance is not None:
            advance(len(batch))
    return out


def _head_cache(model: LoadedModel, head: Sequence[int], n_rows: int = 1):
    """The KV cache of the template head every prompt starts with, `n_rows` times (None if there is none)."""
    if not head:
        return None
    _, cache = model.bridge(torch.tensor([list(head)] * n_rows, device=model.device),
                            return_type="logits_and_cache", logits_to_keep=1)
    return cache


def _variant_head_cache(model: LoadedModel, head: Sequence[int], hooks_for: RowHooks, n_variants: int,
                        batch_size: int):
    """The head's KV cache with row v run under variant v's hooks, in passes of at most `batch_size` rows."""
    caches = []
    for variants in batches(torch.arange(n_variants), batch_size):
        with model.bridge.hooks(fwd_hooks=hooks_for(variants)):
            caches.append(_head_cache(model, head, len(variants)))
    if len(caches) == 1 or caches[0] is None:
        return caches[0]
    # More variants than rows in a batch: stack the passes' caches row-wise, layer by layer. Only plain key/value
    # layers hold nothing else that rows would need (indexer keys, recurrent states, shared layers do).
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    merged = caches[0]
    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in merged.layers):
        raise TlrefusalError(f"this model's KV cache cannot be split into batches of {batch_size} rows across "
                             f"{n_variants} candidates: give --candidates-per-pass <= --batch-size")
    for i, layer in enumerate(merged.layers):
        layer.keys = torch.cat([cache.layers[i].keys for cache in caches])
        layer.values = torch.cat([cache.layers[i].values for cache in caches])
    return merged


def _suffix_inputs(model: LoadedModel, chat: ChatFormat, token_lists, n_shared: int, prefix_cache,
                   cache_rows: Tensor | None = None):
    """Left-padded ids of each prompt after the shared head, the mask over head + suffix, and the cache.

    Row k reuses row `cache_rows[k]` of the head cache (row 0 for every prompt by default)."""
    ids, mask = left_pad([tokens[n_shared:] for tokens in token_lists], chat.tokenizer.pad_token_id)
    kwargs = {}
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        rows = torch.zeros(len(token_lists), dtype=torch.long) if cache_rows is None else cache_rows
        cache.reorder_cache(rows.to(model.device))
        mask = torch.cat([torch.ones(len(token_lists), n_shared, dtype=mask.dtype), mask], dim=1)
        kwargs["past_key_values"] = cache
    return ids.to(model.device), mask.to(model.device), kwargs


@torch.inference_mode()
def mean_activations(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    batch_size: int = 32,
    advance: Advance | None = None,
    share_prefix: bool = True,
) -> Float[Tensor, "n_pos n_layer d_model"]:
    """Mean resid_pre over prompts at every layer and every post-instruction position, in float64.

    Per-prompt activations are never kept: the recorder adds each batch's rows into a float64 sum. As in
    `last_logits`, the shared template head runs once (without the recorder: nothing is read there, and
    the post-instruction positions always lie after it), prompts are batched by length, and
    logits_to_keep=1 skips the full-sequence unembedding.
    """
    recorder = MeanRecorder(chat.positions, list(range(model.n_layers)), model.d_model)
    tokens = chat.tokenize(instructions)
    n_shared = 0
    if share_prefix:  # the recorded positions -n_eoi..-1 must stay in every prompt's own part
        n_shared = max(0, min(shared_prefix_length(tokens), min(map(len, tokens)) - len(chat.positions)))
    prefix_cache = _head_cache(model, tokens[0][:n_shared])
    with model.bridge.hooks(fwd_hooks=recorder.hooks()):
        for indices in length_sorted_batches(tokens, batch_size):
            ids, mask, kwargs = _suffix_inputs(model, chat, [tokens[i] for i in indices], n_shared, prefix_cache)
            model.bridge(ids, attention_mask=mask, logits_to_keep=1, **kwargs)
            if advance is not None:
                advance(len(indices))
    means = recorder.mean()
    if not torch.isfinite(means).all():
        raise FloatingPointError("mean activations contain NaN or inf")
    return means


def candidate_directions(
    harmful_mean: Float[Tensor, "n_pos n_layer d_model"], harmless_mean: Float[Tensor, "n_pos n_layer d_model"]
) -> Float[Tensor, "n_pos n_layer d_model"]:
    """r_i^(l) = mean_harmful(x_i^(l)) - mean_harmless(x_i^(l)); not normalised."""
    if harmful_mean.shape != harmless_mean.shape:
        raise ValueError(f"shape mismatch: {tuple(harmful_mean.shape)} vs {tuple(harmless_mean.shape)}")
    return harmful_mean - harmless_mean
