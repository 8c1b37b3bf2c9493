"""The README's main job: build (or reuse) the refusing organism, extract its refusal direction, and show
what directional ablation and activation addition do to its refusals on held-out prompts.
"""
import random
from dataclasses import dataclass
from pathlib import Path

from hooks import ablation_hooks, addition_hooks
from tlrefusal import artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.data import load_prompts
from tlrefusal.generation import refusal_replies
from tlrefusal.model import ModelSource, load_model
from tlrefusal.organism import OrganismRecipe, build_organism
from tlrefusal.pipeline import ExtractConfig, ExtractResult, run_extract
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.selection import SelectionConfig

SUMMARY = "demo_summary.json"
ORTHOGONALIZED = "orthogonalized"  # the weight-orthogonalized organism, a Hugging Face folder in the run
# The organism's candidates move harmless next-token distributions more than the paper's 2B-70B models
# do (of recipe version 7's, one passes the paper's 0.1 filter, at KL 0.075; its neighbours cost 0.15-0.4;
# see the README), so the demo relaxes the KL filter, lest a rebuilt organism whose one survivor moved stop
# the main job, and prints that it did. `tlrefusal extract` keeps the paper's 0.1.
DEMO_KL_THRESHOLD = 2.0


@dataclass(frozen=True)
class DemoResult:
    organism_dir: Path
    organism_card: dict
    extract: ExtractResult
    refusal: dict | None  # label -> intervention -> {"rate", "n"}; None if no direction was chosen
    orthogonalized: dict | None = None  # the export's record (orthogonalization.json), with its verification


def run_demo(run_dir: Path, n_train: int = 128, n_val: int = 32, eval_n: int = 32, max_new_tokens: int = 32,
             kl_threshold: float = DEMO_KL_THRESHOLD, cache_dir: Path | None = None, force: bool = False,
             progress: Progress = NO_PROGRESS) -> DemoResult:
    folder, card = build_organism(OrganismRecipe(), cache_dir=cache_dir, progress=progress)
    config = ExtractConfig(model=str(folder), n_train=n_train, n_val=n_val,
                           selection=SelectionConfig(kl_threshold=kl_threshold))
    result = run_extract(config, run_dir, cache_dir=cache_dir, force=force, progress=progress)
    if result.direction is None:
        return DemoResult(folder, card, result, None)
    refusal = intervention_refusal(run_dir, folder, result.direction, eval_n, max_new_tokens, cache_dir, progress)
    record = export_for_run(run_dir, folder, progress)
    artifacts.write_json(run_dir / SUMMARY, {"organism": str(folder), "organism_key": card["key"],
                                             "chosen": result.selection.chosen.to_json(), "refusal": refusal,
                                             "max_new_tokens": max_new_tokens,
                                             "orthogonalized": {"folder": str(run_dir / ORTHOGONALIZED),
                                                                "verification": record["verification"]}})
    return DemoResult(folder, card, result, refusal, record)


def export_for_run(run_dir: Path, model_dir: Path, progress: Progress = NO_PROGRESS) -> dict:
    """Orthogonalize the model against the run's direction into RUN/orthogonalized (kept if it matches)."""
    from tlrefusal.export import RECORD, orthogonalize_direction

    out = run_dir / ORTHOGONALIZED
    if (out / RECORD).is_file():
        record = artifacts.read_json(out / RECORD)
        if record["direction"]["sha256"] == artifacts.file_sha256(run_dir / artifacts.DIRECTION):
            return record
    return orthogonalize_direction(run_dir, out, str(model_dir), force=True, progress=progress).record


def intervention_refusal(run_dir: Path, folder: Path, direction: artifacts.RefusalDirection, eval_n: int,
                         max_new_tokens: int,
                         cache_dir: Path | None, progress: Progress) -> dict:
    """Substring refusal of greedy replies to prompts extraction never saw, under each intervention.

    Activation addition follows the paper: -r on harmful prompts (a jailbreak), +r on harmless ones.
    """
    used = artifacts.sampled_instructions(run_dir)
    model = load_model(ModelSource(str(folder), "local", folder))
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    r, layer = direction.vector, direction.layer
    interventions = {
        "harmful": {"baseline": [], "ablation": ablation_hooks(r, model.n_layers),
                    "actadd (-r)": addition_hooks(r, layer, -1.0)},
        "harmless": {"baseline": [], "ablation": ablation_hooks(r, model.n_layers),
                     "actadd (+r)": addition_hooks(r, layer, 1.0)},
    }
    out: dict = {}
    for label, runs in interventions.items():
        pool = [p.instruction for p in load_prompts(f"demo-{label}", cache_dir) if p.instruction not in used]
        prompts = random.Random(0).sample(pool, min(eval_n, len(pool)))
        out[label] = {}
        for name, hooks in runs.items():
            rate, replies = refusal_replies(model, chat, prompts, max_new_tokens, progress,
                                            f"Held-out {label} replies, {name}", hooks)
            out[label][name] = {"rate": rate, "n": len(replies), "example": {"prompt": prompts[0], "reply": replies[0]}}
    return out
