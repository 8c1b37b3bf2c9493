"""The prompt sets `tlrefusal eval` scores: named, labelled harmful or harmless, sampled once.

`EvalConfig.eval_sets` says how:
- "held-out" (the default): n prompts of each source, seeded; without sources of its own, an evaluation
  takes the run's harmful and harmless pools; either way every prompt the run sampled for training or
  validation is left out, so no prompt that chose the direction also scores it;
- "paper" (the original code, SPEC 1.8): harmful sets whole, in their order (JailbreakBench's 100); each
  harmless set is n prompts drawn by continuing the run's own seeded sampling stream after its four
  train/val draws (`tlrefusal.data.sample_splits` with the stream kept), as the original draws 100 of its harmless_test split.
"""
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.data import Prompt, load_pools, load_prompts, prompts_hash, sample_prompts, sample_splits
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
    """Harmful sets, then harmless ones: `config`'s sources or the run's pools, drawn as `config.eval_sets` says."""
    if config.eval_sets == "paper":
        return _paper_sets(run_dir, run_config, config, cache_dir)
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


def _paper_sets(run_dir: Path, run_config: dict, config: EvalConfig, cache_dir: Path | None) -> list[EvalSet]:
    """The original's sets: harmful sources whole; harmless ones `random.sample(pool, n)` from the run's stream."""
    if not config.harmless:
        raise TlrefusalError("the paper's evaluation sets need a harmless test pool: --harmless FILE (the paper "
                             "draws 100 prompts of its harmless_test split)")
    harmful = {slug(s): EvalSet("harmful", slug(s), load_prompts(s, cache_dir)) for s in config.harmful
               or (run_config["harmful"],)}
    pools = {slug(s): load_prompts(s, cache_dir) for s in config.harmless}  # every source loads before the replay
    stream = run_sampling_stream(run_dir, run_config, cache_dir)
    harmless = {name: EvalSet("harmless", name, stream.sample(pool, min(config.n, len(pool))))
                for name, pool in pools.items()}
    return [*harmful.values(), *harmless.values()]


def run_sampling_stream(run_dir: Path, run_config: dict, cache_dir: Path | None) -> random.Random:
    """The run's seeded random stream after its four train/val draws, replayed from its recorded config on
    its own pools (which must be unchanged since extraction: their hashes are in RUN/config.json)."""
    recorded = artifacts.read_json(run_dir / artifacts.CONFIG).get("data_sha256", {})
    try:
        pools = load_pools(run_config, cache_dir)
    except TlrefusalError as exc:
        raise TlrefusalError(f"the paper's harmless sample replays the run's sampling, which needs its pools: "
                             f"{exc}") from exc
    for name, pool in pools.items():
        if name in recorded and prompts_hash(pool) != recorded[name]:
            raise TlrefusalError(f"the run's {name} pool {run_config[name]} has changed since extraction, so its "
                                 "sampling cannot be replayed")
    stream = random.Random(run_config["seed"])
    sample_splits(pools["harmful"], pools["harmless"], run_config["n_train"], run_config["n_val"],
                  run_config["seed"], pools.get("harmful_val"), pools.get("harmless_val"), rng=stream)
    return stream


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
