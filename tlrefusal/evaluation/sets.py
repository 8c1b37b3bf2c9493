"""The held-out prompt sets `tlrefusal eval` scores: named, labelled harmful or harmless, sampled once.

Without sets of its own, an evaluation takes the run's harmful and harmless pools minus every prompt the
run sampled for training or validation, so no prompt that chose the direction also scores it.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.data import Prompt, load_prompts, sample_prompts
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.interventions import LABELS, Label


@dataclass(frozen=True)
class EvalSet:
    """A sampled prompt set; `name` (a file source's stem) names its completions files and report rows."""

    label: Label
    name: str
    prompts: list[Prompt]

    @property
    def instructions(self) -> list[str]:
        return [p.instruction for p in self.prompts]


def eval_sets(run_dir: Path, run_config: dict, config: EvalConfig, cache_dir: Path | None) -> list[EvalSet]:
    """Harmful sets, then harmless ones: `config`'s sources or the run's pools, minus the prompts the run used."""
    used = artifacts.sampled_instructions(run_dir)
    sets: dict[tuple[str, str], EvalSet] = {}  # a later source of the same label and name replaces an earlier
    for label in LABELS:
        for source in getattr(config, label) or (run_config[label],):
            pool = load_prompts(source, cache_dir)
            prompts = sample_prompts(pool, config.n, config.seed, exclude=used)
            if not prompts:
                raise TlrefusalError(f"{source} has no prompt the run did not already use")
            sets[(label, slug(source))] = EvalSet(label, slug(source), prompts)
    return list(sets.values())


def magnitude_sets(sets: list[EvalSet], config: EvalConfig, cache_dir: Path | None) -> dict[str, list[str]]:
    """The magnitude study's prompt sets: every evaluated set, then `config.magnitude`'s, sampled alike."""
    study = {s.name: s.instructions for s in sets}
    for source in config.magnitude:
        study[source] = [p.instruction for p in sample_prompts(load_prompts(source, cache_dir), config.n, config.seed)]
    return study


def slug(text: str) -> str:
    """A file-name-safe name: a file source's stem, or the text itself."""
    name = Path(text).stem if Path(text).suffix else text
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
