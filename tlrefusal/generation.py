"""Batched greedy generation under hooks: left padding, explicit masks, KV cache, stop tokens.

A reply stops at EOS or the template's end-of-turn token (`stop="turn"`, the default), or at EOS only
(`stop="eos"`, the original code, whose replies run on past Llama-3's <|eot_id|> or Gemma's <end_of_turn>;
special tokens are stripped from the text either way).

Every greedy generation under hooks runs through `generate_batch`: Hugging Face's own `generate` on the
bridge's `original_model`. The TransformerBridge wraps the Hugging Face modules in place, so their forward
passes fire the bridge's hook points and whatever `bridge.hooks(...)` holds applies at every step, prompt
and KV-cached steps alike; the decoding loop is transformers' own, which runs at plain `generate` speed
where the bridge's Python loop (`bridge.generate`) ran at about 0.8x. tests/test_generation.py checks it
token for token against `bridge.generate` under the same hooks, and the bridge's KV-cached generation
against uncached and plain HF generation (the transformers pin depends on it).
"""
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from hooks.ablation import HookFn
from tlrefusal.activations import batches
from tlrefusal.chat import ChatFormat
from tlrefusal.model import LoadedModel
from tlrefusal.progress import Advance
from tlrefusal.reasoning import find_markers, marker_token_ids

if TYPE_CHECKING:
    from transformers import GenerationConfig


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
    stops = stop_tokens(chat, model.tokenizer, stop)
    rows = greedy_tokens(model, chat, instructions, max_new_tokens, fwd_hooks, stop_ids=stops,
                         batch_size=batch_size, advance=advance)
    return [decode_reply(model.tokenizer, row, stops) for row in rows]


@torch.inference_mode()
def greedy_tokens(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    max_new_tokens: int,
    fwd_hooks: list[tuple[str, HookFn]] = (),
    *,
    stop_ids: Sequence[int] = (),
    batch_size: int = 32,
    advance: Advance | None = None,
) -> list[list[int]]:
    """Each instruction's greedy new tokens (prompt excluded), in chat format, under `fwd_hooks`.

    With `stop_ids`, a row ends at its first stop token (kept; the row is padded after it while others run
    on, and a batch ends when every row has stopped). Without, every row gets exactly `max_new_tokens`
    tokens: benchmarks time generation this way, so that every side generates the same number of tokens.
    """
    rows: list[list[int]] = []
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in batches(list(instructions), batch_size):
            ids, mask = chat.encode(batch)
            out = generate_batch(model, ids, mask, max_new_tokens, stop_ids)
            rows += out[:, ids.shape[1]:].tolist()
            if advance is not None:
                advance(len(batch))
    return rows


def generate_batch(model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                   stop_ids: Sequence[int] = ()) -> torch.Tensor:
    """Left-padded prompts `ids` followed by their greedy continuations (on the CPU), under whatever hooks
    the bridge holds: Hugging Face `generate` on the bridge's modules, with the KV cache and `mask`.
    `stop_ids` as in `greedy_tokens`; rows are padded with the tokenizer's pad id (as `ChatFormat.encode`
    pads)."""
    pad = model.tokenizer.pad_token_id
    if pad is None:  # padding after a stop is cut off; any id does
        pad = stop_ids[0] if stop_ids else model.tokenizer.eos_token_id
    if pad is None:
        pad = 0
    config = greedy_config(max_new_tokens, stop_ids, pad)
    out = model.bridge.original_model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                               generation_config=config)
    return out.cpu()


def greedy_config(max_new_tokens: int, stop_ids: Sequence[int], pad_token_id: int | None) -> "GenerationConfig":
    """Plain greedy decoding, whatever the checkpoint's generation_config.json says.

    `generate` fills every field left None here from the model's own generation_config, so each setting
    that would change greedy tokens is given its neutral value explicitly: a checkpoint's repetition
    penalty or n-gram ban must not apply (the bridge's loop and the paper's code never applied them).
    Sampling settings (temperature, top_p, top_k) are left unset: greedy decoding never reads them, and
    setting them here would only make transformers warn that they are unused. Settings whose only neutral
    value is None (bad_words_ids, suppress_tokens, forced_bos/eos_token_id, sequence_bias) cannot be
    overridden this way and would still come from the checkpoint; chat checkpoints do not set them.
    """
    from transformers import GenerationConfig  # here: importing tlrefusal does not import transformers

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        # An empty list, not None: None would take the checkpoint's EOS. With no stop token every row runs
        # to max_new_tokens, and an EOS the model writes is a token like any other (as in the bridge's loop
        # with stop_at_eos=False); min_new_tokens would instead forbid EOS and change the tokens.
        eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id,
        do_sample=False, num_beams=1, num_return_sequences=1, use_cache=True,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, guidance_scale=1.0, min_length=0, min_new_tokens=0, renormalize_logits=False,
        remove_invalid_values=False,
        # What a checkpoint may set that would change the output's type or the decoding path.
        return_dict_in_generate=False, output_scores=False, output_logits=False, output_attentions=False,
        output_hidden_states=False, cache_implementation="dynamic", disable_compile=True,
    )


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
    equal completions files. A reasoning block's markers (`tlrefusal.reasoning`) stay even where the tokenizer
    registers them as special tokens, so the judge can tell the reasoning from the answer (Qwen3's and the
    R1 distills' '<think>' are not special, and decode as text anyway)."""
    kept = until_stop(tokens, stop_ids)
    markers = _special_marker_ids(tokenizer) & set(kept)
    if markers:
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        kept = [t for t in kept if t in markers or t not in special]
        return tokenizer.decode(kept, skip_special_tokens=False).strip()
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


def _special_marker_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's reasoning markers that are special tokens (decoding would strip them)."""
    ids = marker_token_ids(tokenizer, find_markers(tokenizer, ""))
    if not ids:
        return set()
    return ids & ({i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids))


def until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:cut]
