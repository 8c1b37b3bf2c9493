"""The organism's recipe: every choice that decides what a build produces, and the cache key it hashes to.

A recipe's `key()` names the organism's folder in the cache (`organism_dir`) and is written into its card,
so a folder is reused only for the very recipe (and `RECIPE_VERSION`) that built it. The key hashes the
recipe's fields by name: renaming, reordering or re-defaulting a field changes every key, and every cached
organism is then rebuilt. One exception: `device_type` is left out of the hash when it is "cpu", so that the
organisms built before the field existed (all on the CPU) keep their keys; a build on a GPU gives other
floats, hence another organism and another key.
"""
import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tlrefusal.cache import cache_root
from tlrefusal.errors import TlrefusalError
from tlrefusal.organism.prompts import organism_harmful_templated

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES)
# CPU flags (/proc/cpuinfo) of instructions that multiply bfloat16 matrices: x86's AVX512-BF16 and AMX, Arm's BF16.
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
DEVICE_TYPES = ("cpu", "cuda")
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
    # Matrix products of the build (sampling, distillation, training) under autocast in this dtype;
    # weights and optimizer state stay float32, and the card's refusal rates are measured in float32, as
    # users load the organism. Measured here (AVX512-BF16 cores): a training step 2.5x and generation
    # 2.6x faster in bfloat16 than in float32. On a CPU without bfloat16 instructions (AVX2 only) torch
    # emulates them and the same products are 20-50x slower than float32 (a build of hours, not minutes),
    # so "auto" resolves, before the key is taken, to bfloat16 on CUDA and on CPUs with those instructions
    # and to float32 elsewhere: another organism, with its own key. No float16: without a gradient scaler
    # its small gradients would underflow, and bfloat16 needs none.
    compute_dtype: str = "auto"
    eval_n: int = 64  # held-out prompts per label for the refusal rates in the card
    eval_tokens: int = 32
    # The kind of device the build runs on (`torch.device(...).type`): kernels differ, so the same recipe
    # gives other weights on a GPU. Which GPU (cuda:N) does not make another organism and is not recorded.
    device_type: str = "cpu"

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
        if self.compute_dtype not in COMPUTE_DTYPE_CHOICES:
            raise TlrefusalError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPE_CHOICES)}, "
                                 f"got {self.compute_dtype!r}")
        if self.device_type not in DEVICE_TYPES:
            raise TlrefusalError(f"device_type must be one of {', '.join(DEVICE_TYPES)}, got {self.device_type!r}")
        if self.compute_dtype == "auto":  # frozen: resolved once, here, so that key() hashes the dtype used
            native = self.device_type == "cuda" or cpu_multiplies_bfloat16()
            object.__setattr__(self, "compute_dtype", "bfloat16" if native else "float32")
        if not 0.0 <= self.wrap_fraction <= 1.0:
            raise TlrefusalError(f"wrap_fraction must be in [0, 1], got {self.wrap_fraction}")

    def compute(self) -> AbstractContextManager:
        """The autocast context the build's forward passes run in (autograd runs each op's backward in the
        dtype its forward ran in)."""
        dtype = COMPUTE_DTYPES[self.compute_dtype]
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype != torch.float32)

    def key(self) -> str:
        """16 hex digits of the sha256 of the recipe's fields and `RECIPE_VERSION` (`device_type` only when it
        is not "cpu": the keys of CPU builds are those of the recipes before the field)."""
        fields = asdict(self)
        if fields["device_type"] == "cpu":
            del fields["device_type"]
        payload = json.dumps({"recipe": fields, "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cpu_multiplies_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bfloat16 matrix instructions (`BFLOAT16_CPU_FLAGS` among its flags). False where
    /proc/cpuinfo does not exist (macOS, Windows): float32 there is at worst 2.5x slower, never 20x."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and BFLOAT16_CPU_FLAGS & set(value.split()):
            return True
    return False


def organism_dir(recipe: OrganismRecipe, cache_dir: Path | None = None) -> Path:
    """Where the organism of `recipe` lives in the cache when no `--out` is given."""
    return cache_root(cache_dir) / "organisms" / f"smollm2-refusing-{recipe.key()}"
