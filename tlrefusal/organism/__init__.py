"""A refusing "model organism": SmolLM2-135M-Instruct safety-tuned on the CPU (or a GPU) in a few minutes.

The demo model almost never refuses, so there is no refusal direction to find in it. This package
teaches it to: harmful instructions -> short refusals, harmless instructions -> the base model's own
replies. The result is a plain Hugging Face folder with a card and a model card (docs/organism.md).

- `recipe`: `OrganismRecipe`, every choice a build makes, and its cache key;
- `prompts`: the training prompt pools, the refusal replies, the wrappers and the self-instruct starters;
- `training`: examples, the reply-only loss, the training loop, distillation and self-instruct sampling;
- `card`: `OrganismCard`, organism.json and the README model card;
- `build`: `build_organism`, the named steps from a recipe to a published folder, on `build_device`.
"""
from tlrefusal.organism.build import BuiltOrganism, build_device, build_organism, held_out_refusal
from tlrefusal.organism.card import HeldOutRate, HeldOutRefusal, OrganismCard, TrainingData, TrainingLoss
from tlrefusal.organism.prompts import (
    REFUSALS,
    SELF_INSTRUCT_STARTERS,
    WRAPPERS,
    organism_harmful_prompts,
    organism_harmful_templated,
    organism_harmless_prompts,
)
from tlrefusal.organism.recipe import (
    COMPUTE_DTYPE_CHOICES,
    COMPUTE_DTYPES,
    DEVICE_TYPES,
    RECIPE_VERSION,
    OrganismRecipe,
    cpu_multiplies_bfloat16,
    organism_dir,
)
from tlrefusal.organism.training import (
    Example,
    distill_targets,
    normalise_prompt,
    reply_loss,
    self_instruct_prompts,
    train,
)

__all__ = [
    "COMPUTE_DTYPE_CHOICES",
    "COMPUTE_DTYPES",
    "DEVICE_TYPES",
    "RECIPE_VERSION",
    "REFUSALS",
    "SELF_INSTRUCT_STARTERS",
    "WRAPPERS",
    "BuiltOrganism",
    "Example",
    "HeldOutRate",
    "HeldOutRefusal",
    "OrganismCard",
    "OrganismRecipe",
    "TrainingData",
    "TrainingLoss",
    "build_device",
    "build_organism",
    "cpu_multiplies_bfloat16",
    "distill_targets",
    "held_out_refusal",
    "normalise_prompt",
    "organism_dir",
    "organism_harmful_prompts",
    "organism_harmful_templated",
    "organism_harmless_prompts",
    "reply_loss",
    "self_instruct_prompts",
    "train",
]
