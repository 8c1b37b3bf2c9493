"""The intervention table: what runs on each prompt set when a direction is put to the test.

The paper (section 3) checks a refusal direction r found at layer l in three ways:
- baseline: the model as it is;
- directional ablation: x <- x - (x . r_hat) r_hat at every residual writer of every layer and position
  (`hooks.ablation_hooks`): harmful prompts should no longer be refused;
- activation addition at layer l: x <- x - r on harmful prompts (a jailbreak) and x <- x + r on harmless
  ones (refusal induced). The NNsight replication adds +r on both (`actadd_sign="plus"`), which lets its
  published numbers be compared.

Every place that evaluates interventions (the demo job, `tlrefusal eval`, the benchmarks) takes its
table from `intervention_table`, so the names and signs are the same everywhere. A model evaluated "as
loaded" (an orthogonalized checkpoint) has one row per prompt set and no hooks.
"""
from dataclasses import dataclass, field
from typing import Literal

import torch

from hooks import ablation_hooks, addition_hooks
from hooks.ablation import HookFn

Label = Literal["harmful", "harmless"]
ActaddSign = Literal["paper", "plus"]
LABELS: tuple[Label, ...] = ("harmful", "harmless")


@dataclass(frozen=True)
class Intervention:
    """One row of the table: a display name ("actadd (-r)"), the hooks that implement it, and for activation
    addition the coefficient c of x <- x + c r."""

    name: str
    kind: Literal["baseline", "ablation", "actadd", "as loaded"]
    hooks: list[tuple[str, HookFn]] = field(default_factory=list)
    coeff: float | None = None


BASELINE = Intervention("baseline", "baseline")  # the model as it is


@dataclass(frozen=True)
class InterventionTable:
    """The interventions to run on harmful and on harmless prompts."""

    harmful: tuple[Intervention, ...]
    harmless: tuple[Intervention, ...]

    def for_label(self, label: Label) -> tuple[Intervention, ...]:
        return self.harmful if label == "harmful" else self.harmless

    def by_kind(self, label: Label, kind: str) -> Intervention | None:
        return next((iv for iv in self.for_label(label) if iv.kind == kind), None)


def intervention_table(vector: torch.Tensor, layer: int, n_layers: int, actadd_sign: ActaddSign = "paper"
                       ) -> InterventionTable:
    """Baseline, ablation of `vector` everywhere, and activation addition of it at `layer` (signs: module doc)."""
    if actadd_sign not in ("paper", "plus"):
        raise ValueError(f"actadd_sign must be 'paper' or 'plus', got {actadd_sign!r}")
    harmful_coeff = -1.0 if actadd_sign == "paper" else 1.0

    def rows(coeff: float) -> tuple[Intervention, ...]:
        return (BASELINE,
                Intervention("ablation", "ablation", ablation_hooks(vector, n_layers)),
                Intervention(f"actadd ({'-' if coeff < 0 else '+'}r)", "actadd", addition_hooks(vector, layer, coeff),
                             coeff))

    return InterventionTable(harmful=rows(harmful_coeff), harmless=rows(1.0))


AS_LOADED = InterventionTable(harmful=(Intervention("as loaded", "as loaded"),),
                              harmless=(Intervention("as loaded", "as loaded"),))
