"""`tlrefusal eval RUN`: the paper's evaluations of a run's model and direction (its section 4 and Table 9).

RUN/eval/
  completions/<dataset>.<intervention>.jsonl  one {"prompt", "category", "completion"} per line
  completions/<dataset>.<intervention>.json   what produced them (model, direction, prompts, settings);
                                               a re-run with the same setup reuses the completions
  report.json                                  every number with its sample size
  report.md                                    the tables in the paper's layout
  plots/refusal.png                            refusal score per dataset and intervention
  plots/projection_vs_refusal.png              the magnitude study's scatter (hooked runs only)

Interventions come from `tlrefusal.interventions.intervention_table`: the run's model at baseline, under
directional ablation and under activation addition at the direction's layer. With `model` set (for
example a checkpoint from `tlrefusal orthogonalize`) that model is evaluated as it is, with no hooks
(`AS_LOADED`), and its numbers sit where ablation's would. The direction is the run's chosen one, or
with `layer` and `position` any candidate the run scored.
"""
import time
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import __version__, artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.ce import ce_interventions, ce_losses
from tlrefusal.evaluation.coherence import resolve_tasks, task_coherence
from tlrefusal.evaluation.completions import Completion, CompletionSetup, completion_setup, completions
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.guard import LlamaGuard
from tlrefusal.evaluation.magnitude import magnitude_study
from tlrefusal.evaluation.report import DirectionSummary, EvalReport, markdown_report
from tlrefusal.evaluation.scores import DatasetScores, InterventionScores, score_completions
from tlrefusal.evaluation.sets import EvalSet, eval_sets, magnitude_sets
from tlrefusal.interventions import AS_LOADED, InterventionTable, intervention_table
from tlrefusal.model import LoadedModel, load_model, resolve_source
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress

COHERENCE_KINDS = ("baseline", "ablation", "as loaded")  # lm-eval runs on these harmless rows, not on actadd


def run_eval(run_dir: Path, config: EvalConfig, cache_dir: Path | None = None,
             progress: Progress = NO_PROGRESS) -> EvalReport:
    """Evaluate the run; writes RUN/eval/ and returns the report."""
    started = time.perf_counter()
    run = _read_run(run_dir, config)
    run_config, direction = run.config, run.direction
    sets = eval_sets(run_dir, run_config, config, cache_dir)
    if config.tasks:
        resolve_tasks(config.tasks)  # an unknown task fails now, not after an hour of generation
    source = resolve_source(config.model or run_config["model"], cache_dir, progress)
    model = load_model(source, Placement(dtype=config.dtype or run_config["dtype"],
                                         device=config.device or run_config["device"]),
                       run_config["trust_remote_code"], progress)
    chat = ChatFormat.for_run(run_dir, model.tokenizer)
    if direction.vector.shape[0] != model.d_model:
        raise TlrefusalError(f"the run's direction has width {direction.vector.shape[0]}, the model {model.d_model}")
    r, layer = direction.vector, direction.layer
    hooked = config.model is None
    table = intervention_table(r, layer, model.n_layers, config.actadd_sign) if hooked else AS_LOADED

    out_dir = run_dir / artifacts.EVAL_DIR
    setup = completion_setup(run_dir, run_config, config, source, direction)
    guard = LlamaGuard(config.guard_model, model.dtype, str(model.device)) if config.guard_model else None
    scores, made = _refusal_and_safety(sets, table, out_dir, setup, model, chat, guard, config, progress)
    first_harmless = next(s.name for s in sets if s.label == "harmless")
    ce = ce_losses(model, chat, ce_interventions(table, r, layer, model.n_layers),
                   made[(first_harmless, table.harmless[0].name)], config, progress)
    magnitude = None
    if hooked:
        with progress.task("Magnitude study", total=None):
            magnitude = magnitude_study(model, chat, magnitude_sets(sets, config, cache_dir), r, layer,
                                        run.refusal_ids)
    coherence = task_coherence(model, [iv for iv in table.harmless if iv.kind in COHERENCE_KINDS], config.tasks,
                               config.coherence_limit, config.batch_size, progress)

    report = EvalReport(tool_version=__version__, run=str(run_dir), config=config, model=source, hooked=hooked,
                        direction=DirectionSummary(layer, direction.position, r.norm().item()),
                        refusal_and_safety=scores, ce_loss=ce, coherence=coherence, magnitude=magnitude,
                        seconds=round(time.perf_counter() - started, 1))
    _write(out_dir, report)
    return report


@dataclass(frozen=True)
class _Run:
    config: dict  # the run's resolved extract config
    refusal_ids: list[int]  # the refusal tokens its log-odds use
    direction: artifacts.RefusalDirection  # the direction to evaluate


def _read_run(run_dir: Path, config: EvalConfig) -> _Run:
    """What the evaluation needs from the run folder; a clear error for what is missing."""
    if not (run_dir / artifacts.CONFIG).is_file():
        raise TlrefusalError(f"{run_dir} is not a tlrefusal run folder (no {artifacts.CONFIG})")
    if not config.picks_candidate and not (run_dir / artifacts.DIRECTION).is_file():
        raise TlrefusalError(f"{run_dir} has no direction ({artifacts.DIRECTION}); `tlrefusal extract` chose none")
    if config.guard_model is not None and not (config.guard_model / artifacts.HF_CONFIG).is_file():
        raise TlrefusalError(f"no guard model at {config.guard_model} (expected a Hugging Face folder)")
    run_config = artifacts.read_json(run_dir / artifacts.CONFIG)["config"]
    refusal_ids = artifacts.read_json(run_dir / artifacts.MANIFEST)["refusal"]["token_ids"]
    return _Run(run_config, refusal_ids, artifacts.load_direction(run_dir, config.layer, config.position))


def _refusal_and_safety(sets: list[EvalSet], table: InterventionTable, out_dir: Path, setup: CompletionSetup,
                        model: LoadedModel, chat: ChatFormat, guard: LlamaGuard | None, config: EvalConfig,
                        progress: Progress
                        ) -> tuple[dict[str, DatasetScores], dict[tuple[str, str], list[Completion]]]:
    """Scores per set and intervention, and the completions they came from by (set name, intervention)."""
    per_set: dict[str, tuple[str, dict[str, InterventionScores]]] = {}
    made: dict[tuple[str, str], list[Completion]] = {}
    for eval_set in sets:
        for iv in table.for_label(eval_set.label):
            rows = completions(out_dir, eval_set, iv, setup, model, chat, config, progress)
            made[(eval_set.name, iv.name)] = rows
            per_set.setdefault(eval_set.name, (eval_set.label, {}))[1][iv.name] = \
                score_completions(rows, guard, progress, f"Llama Guard: {eval_set.name}, {iv.name}")
    return {name: DatasetScores(label, ivs) for name, (label, ivs) in per_set.items()}, made


def _write(out_dir: Path, report: EvalReport) -> None:
    """report.json, report.md and the plots."""
    import matplotlib.pyplot as plt

    from tlrefusal.plots import projection_scatter, refusal_bars

    artifacts.write_json(out_dir / artifacts.REPORT_JSON, report.to_json())
    artifacts.write_text(out_dir / artifacts.REPORT_MD, markdown_report(report))
    figures = {artifacts.REFUSAL_PLOT: refusal_bars(report.refusal_and_safety)}
    if report.magnitude is not None:
        figures[artifacts.PROJECTION_PLOT] = projection_scatter(report.magnitude, report.direction.layer)
    for name, figure in figures.items():
        artifacts.write_plot(out_dir / artifacts.EVAL_PLOTS_DIR / name, figure)
        plt.close(figure)
