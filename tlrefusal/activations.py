"""Forward passes over prompt batches: last-position logits and mean activations (SPEC 1.3, 1.4).

Every call tokenizes with the model's chat format (left padding, explicit attention mask) and runs the
TransformerBridge under `model.bridge.hooks(...)`, so interventions are plain hook lists.
"""
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hooks import MeanRecorder
from hooks.ablation import HookFn
from tlrefusal.chat import ChatFormat
from tlrefusal.model import LoadedModel
from tlrefusal.progress import Advance


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def last_logits(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    fwd_hooks: list[tuple[str, HookFn]] = (),
    batch_size: int = 32,
    advance: Advance | None = None,
) -> Float[Tensor, "n d_vocab"]:
    """Logits at the last prompt position, under `fwd_hooks`, as float32 on the CPU.

    `logits_to_keep=1` applies the unembedding at the last position only; the result is identical to
    slicing the full logits (tests/test_activations.py) and saves the vocabulary-sized matmul elsewhere.
    """
    out = []
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in batches(list(instructions), batch_size):
            ids, mask = chat.encode(batch)
            logits = model.bridge(ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1)
            out.append(logits[:, -1, :].float().cpu())
            if advance is not None:
                advance(len(batch))
    return torch.cat(out)


@torch.inference_mode()
def mean_activations(
    model: LoadedModel,
    chat: ChatFormat,
    instructions: Sequence[str],
    batch_size: int = 32,
    advance: Advance | None = None,
) -> Float[Tensor, "n_pos n_layer d_model"]:
    """Mean resid_pre over prompts at every layer and every post-instruction position, in float64.

    Per-prompt activations are never kept: the recorder adds each batch's rows into a float64 sum.
    The bridge runs the whole model; logits_to_keep=1 at least skips the full-sequence unembedding.
    """
    recorder = MeanRecorder(chat.positions, list(range(model.n_layers)), model.d_model)
    with model.bridge.hooks(fwd_hooks=recorder.hooks()):
        for batch in batches(list(instructions), batch_size):
            ids, mask = chat.encode(batch)
            model.bridge(ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1)
            if advance is not None:
                advance(len(batch))
    means = recorder.mean()
    if not torch.isfinite(means).all():
        raise FloatingPointError("mean activations contain NaN or inf")
    return means


def candidate_directions(
    harmful_mean: Float[Tensor, "n_pos n_layer d_model"], harmless_mean: Float[Tensor, "n_pos n_layer d_model"]
) -> Float[Tensor, "n_pos n_layer d_model"]:
    """r_i^(l) = mean_harmful(x_i^(l)) - mean_harmless(x_i^(l)); not normalised (SPEC 1.4)."""
    if harmful_mean.shape != harmless_mean.shape:
        raise ValueError(f"shape mismatch: {tuple(harmful_mean.shape)} vs {tuple(harmless_mean.shape)}")
    return harmful_mean - harmless_mean
