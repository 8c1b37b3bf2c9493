"""The README's main job: build (or reuse) the refusing organism, extract its refusal direction, and show
what directional ablation and activation addition do to its refusals on held-out prompts.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlrefusal import artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.data import load_prompts, sample_prompts
from tlrefusal.interventions import LABELS, Label, intervention_table
from tlrefusal.model import ModelSource, load_model
from tlrefusal.pipeline import ExtractConfig, ExtractResult, run_extract
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.refusal import RefusalRate, refusal_rate
from tlrefusal.selection import SelectionConfig

if TYPE_CHECKING:
    from tlrefusal.export import ExportRecord
    from tlrefusal.organism import BuiltOrganism

# The organism's candidates move harmless next-token distributions more than the paper's 2B-70B models
# do (of recipe version 7's, one passes the paper's 0.1 filter, at KL 0.075; its neighbours cost 0.15-0.4;
# see docs/organism.md), so the demo relaxes the KL filter, lest a rebuilt organism whose one survivor
# moved stop the main job, and prints that it did. `tlrefusal extract` keeps the paper's 0.1.
DEMO_KL_THRESHOLD = 2.0
HELD_OUT_SEED = 0  # the demo's held-out sample (extraction samples with 42)


@dataclass(frozen=True)
class DemoResult:
    organism: "BuiltOrganism"  # its folder and card
    extract: ExtractResult
    refusal: dict[Label, list[RefusalRate]] | None  # None if no direction was chosen
    orthogonalized: "ExportRecord | None" = None  # with its verification


def run_demo(run_dir: Path, n_train: int = 128, n_val: int = 32, eval_n: int = 32, max_new_tokens: int = 32,
             kl_threshold: float = DEMO_KL_THRESHOLD, cache_dir: Path | None = None, force: bool = False,
             progress: Progress = NO_PROGRESS, device: str = "cpu", dtype: str = "float32") -> DemoResult:
    from tlrefusal.organism import OrganismRecipe, build_organism

    organism = build_organism(OrganismRecipe(), cache_dir=cache_dir, progress=progress)
    config = ExtractConfig(model=str(organism.folder), n_train=n_train, n_val=n_val, device=device, dtype=dtype,
                           selection=SelectionConfig(kl_threshold=kl_threshold))
    result = run_extract(config, run_dir, cache_dir=cache_dir, force=force, progress=progress)
    if result.direction is None:
        return DemoResult(organism, result, None)
    refusal = intervention_refusal(run_dir, organism.folder, result.direction, eval_n, max_new_tokens, cache_dir,
                                   progress, device, dtype)
    record = export_for_run(run_dir, organism.folder, progress, device)
    artifacts.write_json(run_dir / artifacts.DEMO_SUMMARY, {
        "organism": str(organism.folder), "organism_key": organism.card.key,
        "chosen": result.selection.chosen.to_json(), "refusal": refusal_summary(refusal),
        "max_new_tokens": max_new_tokens,
        "orthogonalized": {"folder": str(run_dir / artifacts.ORTHOGONALIZED),
                           "verification": record.to_json()["verification"]}})
    return DemoResult(organism, result, refusal, record)


def export_for_run(run_dir: Path, model_dir: Path, progress: Progress = NO_PROGRESS, device: str = "cpu"
                   ) -> "ExportRecord":
    """Orthogonalize the model against the run's direction into RUN/orthogonalized (kept if it matches);
    returns the export's record. `device`: where its verification runs."""
    from tlrefusal.export import ExportRecord, orthogonalize_direction

    out = run_dir / artifacts.ORTHOGONALIZED
    if (out / artifacts.EXPORT_RECORD).is_file():
        record = ExportRecord.from_json(artifacts.read_json(out / artifacts.EXPORT_RECORD))
        if record.direction.sha256 == artifacts.file_sha256(run_dir / artifacts.DIRECTION):
            return record
    return orthogonalize_direction(run_dir, out, str(model_dir), force=True,
                                   placement=Placement(dtype="auto", device=device), progress=progress).record


def intervention_refusal(run_dir: Path, folder: Path, direction: artifacts.RefusalDirection, eval_n: int,
                         max_new_tokens: int, cache_dir: Path | None, progress: Progress, device: str = "cpu",
                         dtype: str = "float32") -> dict[Label, list[RefusalRate]]:
    """Substring refusal of greedy replies to demo prompts extraction never saw, under each intervention of
    the paper's table (-r on harmful prompts, +r on harmless ones)."""
    used = artifacts.sampled_instructions(run_dir)
    model = load_model(ModelSource(str(folder), "local", folder), Placement(dtype=dtype, device=device))
    chat = ChatFormat.for_run(run_dir, model.tokenizer)
    table = intervention_table(direction.vector, direction.layer, model.n_layers)
    out: dict[Label, list[RefusalRate]] = {}
    for label in LABELS:
        prompts = [p.instruction for p in sample_prompts(load_prompts(f"demo-{label}", cache_dir), eval_n,
                                                          HELD_OUT_SEED, exclude=used)]
        out[label] = [refusal_rate(model, chat, prompts, iv, max_new_tokens, progress,
                                   f"Held-out {label} replies, {iv.name}") for iv in table.for_label(label)]
    return out


def refusal_summary(refusal: dict[Label, list[RefusalRate]]) -> dict:
    """label -> intervention -> {"rate", "n", "example"}: the JSON of demo_summary.json."""
    return {label: {r.intervention: {"rate": r.rate, "n": r.n, "example": r.examples(1)[0]} for r in rates}
            for label, rates in refusal.items()}
