"""How the organism learns: training examples, the reply-only loss, the training loop, and the base model's
own text (its sampled user turns, and its replies as distillation targets).

Harmful prompts are trained towards short refusals; harmless ones towards the base model's own first
reply tokens, as its top-k next-token distribution at each greedy reply position or as the greedy tokens
alone (self-distillation, so its ordinary behaviour stays). The loss covers only those first reply
tokens, where the decision to refuse is made, and the unembedding runs only at those positions.

Token ids, masks and targets are built on the CPU and moved to the model's device (`model.device`) where a
forward pass takes them; what is kept between steps (examples, soft targets, losses) stays on the CPU.
"""
import random
from dataclasses import dataclass

import torch

from tlrefusal.errors import TlrefusalError
from tlrefusal.organism.prompts import SELF_INSTRUCT_STARTERS
from tlrefusal.organism.recipe import OrganismRecipe
from tlrefusal.progress import NO_PROGRESS, Advance, Progress


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    # Optional soft targets per reply position: top-k token ids and their probabilities, [n_target, k].
    soft_ids: torch.Tensor | None = None
    soft_probs: torch.Tensor | None = None
    weight: float = 1.0  # of each of its reply tokens in the batch's weighted mean


def normalise_prompt(text: str) -> str:
    """Lower case, runs of white space as one space: how prompts are compared for overlap."""
    return " ".join(text.lower().split())


@torch.no_grad()
def self_instruct_prompts(model, chat, n: int, rng: random.Random, max_tokens: int, exclude: set[str],
                          batch_size: int = 64, advance: Advance | None = None) -> list[str]:
    """`n` distinct user messages sampled from the chat model itself (Magpie, Xu et al. 2024).

    The model is given the chat template's head up to where the user's message starts, plus a first word
    from SELF_INSTRUCT_STARTERS (or none), and samples the rest (temperature 1, top-p 0.95) until its
    end-of-turn token. A message still open after `max_tokens` is cut after its last sentence end. Messages
    of fewer than three words, repeats, and any whose normalised text is in `exclude` are dropped.
    """
    from tlrefusal.chat import left_pad

    tokenizer, stop = chat.tokenizer, list(chat.stop_ids)
    head = chat.head
    n_head = len(tokenizer.encode(head, add_special_tokens=False))
    seen, prompts = set(exclude), []
    for _ in range(50 * (1 + n // batch_size)):  # bounded: a model that never writes usable messages fails
        if len(prompts) >= n:
            break
        rows = [tokenizer.encode(head + rng.choice(SELF_INSTRUCT_STARTERS), add_special_tokens=False)
                for _ in range(batch_size)]
        ids, mask = left_pad(rows, tokenizer.pad_token_id)
        torch.manual_seed(rng.getrandbits(63))  # seeds the GPUs' generators too
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                             temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=max_tokens, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
        for prompt_ids, new in zip(rows, out[:, ids.shape[1]:].tolist(), strict=True):
            end = min((new.index(t) for t in stop if t in new), default=None)
            # The starter and what follows it, decoded together so that the space between them stays.
            text = tokenizer.decode(prompt_ids[n_head:] + new[:end], skip_special_tokens=True).strip()
            if end is None:  # still open at max_tokens
                cut = max(text.rfind(c) for c in ".?!\n")
                text = text[:cut + 1].strip() if cut > 0 else ""
            key = normalise_prompt(text)
            if len(text.split()) < 3 or key in seen:
                continue
            seen.add(key)
            prompts.append(text)
            if advance is not None:
                advance(1)
            if len(prompts) == n:
                break
    if len(prompts) < n:
        raise TlrefusalError(f"the base model wrote only {len(prompts)} usable prompts of the {n} asked for")
    return prompts


@torch.no_grad()  # not inference_mode: the soft targets take part in training's autograd graph
def distill_targets(model, chat, prompts: list[str], n_tokens: int, top_k: int = 0, batch_size: int = 32,
                    advance: Advance | None = None
                    ) -> list[tuple[list[int], torch.Tensor | None, torch.Tensor | None]]:
    """The base model's first `n_tokens` greedy reply tokens per prompt (ending at EOS if it comes first),
    with, if `top_k` > 0, its top-k next-token ids and probabilities at each of those positions."""
    eos = chat.tokenizer.eos_token_id
    targets = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids, mask = chat.encode(batch)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=chat.tokenizer.pad_token_id, output_scores=top_k > 0,
                             return_dict_in_generate=True)
        if top_k > 0:  # kept until training: on the CPU
            top = torch.stack(out.scores, dim=1).float().softmax(-1).topk(top_k, dim=-1)
            top_ids, top_probs = top.indices.cpu(), top.values.cpu()
        for row, tokens in enumerate(out.sequences[:, ids.shape[1]:].tolist()):
            n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            if top_k <= 0:
                targets.append((tokens[:n], None, None))
            else:
                targets.append((tokens[:n], top_ids[row, :n].clone(), top_probs[row, :n].clone()))
        if advance is not None:
            advance(len(batch))
    return targets


def reply_loss(model, batch: list[Example], pad_id: int, share_prefix: bool = True) -> torch.Tensor:
    """Mean cross-entropy over reply tokens only, each weighted by its example's weight; the unembedding runs
    only at those positions.

    A position with soft targets q (top-k, renormalised) contributes -sum_i q_i log p_i; a position with a
    hard target t contributes -log p_t. With `share_prefix`, the chat template's head that every prompt of
    the batch starts with (SmolLM2's default system prompt: about half of each sequence) runs once and its
    KV cache, still in the autograd graph, is repeated across the batch: the same loss and gradients
    (causal attention: the head never sees what follows it) for less compute.
    """
    from tlrefusal.activations import shared_prefix_length

    n_head = shared_prefix_length([e.prompt_ids for e in batch]) if share_prefix else 0
    seqs = [(e.prompt_ids + e.target_ids)[n_head:] for e in batch]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    predicts = torch.zeros((len(seqs), width), dtype=torch.bool)  # position i predicts token i + 1
    for row, (e, seq) in enumerate(zip(batch, seqs, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        predicts[row, len(e.prompt_ids) - n_head - 1: len(seq) - 1] = True
    device = model.device
    ids, mask, predicts = ids.to(device), mask.to(device), predicts.to(device)
    decoder, kwargs = model.get_decoder(), {}
    if n_head:
        head = torch.tensor([batch[0].prompt_ids[:n_head]], device=device)
        cache = decoder(input_ids=head, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(batch))
        kwargs["past_key_values"] = cache
        mask = torch.cat([torch.ones(len(batch), n_head, dtype=mask.dtype, device=device), mask], dim=1)
    hidden = decoder(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state  # right padding
    logp = model.get_output_embeddings()(hidden[predicts]).float().log_softmax(-1)  # rows in batch order
    labels = ids[:, 1:][predicts[:, :-1]]
    return _weighted_reply_mean(batch, logp, labels)


def _weighted_reply_mean(batch: list[Example], logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the per-token losses; `logp` and `labels` hold the reply positions in batch order
    (on the model's device, where the examples' weights and soft targets are moved)."""
    device = logp.device
    pieces, weights, row = [], [], 0
    for e in batch:
        weights.append(torch.full((len(e.target_ids),), e.weight, device=device))
        n = len(e.target_ids)
        lp = logp[row:row + n]
        if e.soft_ids is None:
            pieces.append(-lp.gather(-1, labels[row:row + n].unsqueeze(-1)).squeeze(-1))
        else:
            ids, q = soft_targets(e, device)
            pieces.append(-(q * lp.gather(-1, ids)).sum(-1))
        row += n
    losses, weights = torch.cat(pieces), torch.cat(weights)
    return (weights * losses).sum() / weights.sum()


def soft_targets(example: Example, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An example's top-k ids and their probabilities renormalised to sum to 1 (q), on `device`."""
    probs = example.soft_probs.to(device)
    return example.soft_ids.to(device), probs / probs.sum(-1, keepdim=True)


def check_freeze_below(recipe: OrganismRecipe, n_layers: int) -> None:
    """`freeze_below` can only be checked against a model: the build checks it before any work, `train` again."""
    if recipe.freeze_below > n_layers:
        raise TlrefusalError(f"freeze_below {recipe.freeze_below} exceeds the model's {n_layers} layers")


def train(model, examples: list[Example], recipe: OrganismRecipe, pad_id: int, progress: Progress = NO_PROGRESS
          ) -> list[float]:
    """AdamW over every weight but the (tied) embeddings and the first `freeze_below` layers; one loss value
    per step is returned."""
    if recipe.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    layers = model.get_decoder().layers
    check_freeze_below(recipe, len(layers))
    for layer in layers[:recipe.freeze_below]:
        layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    n_steps = recipe.epochs * -(-len(examples) // recipe.batch_size)
    losses: list[float] = []
    model.train()
    with progress.task("Safety-tuning the organism", total=n_steps) as advance:
        for _ in range(recipe.epochs):
            order = examples[:]
            rng.shuffle(order)
            for start in range(0, len(order), recipe.batch_size):
                with recipe.compute():
                    loss = reply_loss(model, order[start:start + recipe.batch_size], pad_id)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                advance(1)
    model.eval()
    return losses
