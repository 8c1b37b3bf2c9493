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

Order, so that at most one model holds memory at a time: the evaluated model generates every completion set
under every intervention, then gives its CE losses, magnitude study and lm-eval coherence; it is freed; then
the Llama Guard model loads and judges every completion set. With `backend="vllm"` (a checkpoint as loaded) a
vLLM engine generates the completions and is freed, lm-eval's own vLLM model runs the coherence tasks and is
freed, and CE loss, which needs the bridge's logits, loads the checkpoint on the bridge last
(`tlrefusal.evaluation.backends`).
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tlrefusal import __version__, artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.evaluation.backends import (
    BridgeGenerator,
    Generator,
    VllmGenerator,
    import_vllm,
)
from tlrefusal.evaluation.ce import CeDataset, ce_interventions, ce_losses
from tlrefusal.evaluation.coherence import (
    TaskCoherence,
    lm_eval_vllm,
    resolve_tasks,
    task_coherence,
    tasks_under,
)
from tlrefusal.evaluation.completions import Completion, CompletionSetup, completion_setup, completions
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.guard import LlamaGuard, guard_tokenizer
from tlrefusal.evaluation.magnitude import MagnitudeStudy, magnitude_study
from tlrefusal.evaluation.report import DirectionSummary, EvalReport, markdown_report
from tlrefusal.evaluation.scores import DatasetScores, InterventionScores, score_completions
from tlrefusal.evaluation.sets import EvalSet, eval_sets, magnitude_sets
from tlrefusal.interventions import AS_LOADED, InterventionTable, intervention_table
from tlrefusal.model import (
    DTYPES,
    ModelSource,
    load_model,
    prepare_tokenizer,
    release_memory,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress

COHERENCE_KINDS = ("baseline", "ablation", "as loaded")  # lm-eval runs on these harmless rows, not on actadd


def run_eval(run_dir: Path, config: EvalConfig, cache_dir: Path | None = None,
             progress: Progress = NO_PROGRESS) -> EvalReport:
    """Evaluate the run; writes RUN/eval/ and returns the report."""
    started = time.perf_counter()
    run = _read_run(run_dir, config)
    sets = eval_sets(run_dir, run.config, config, cache_dir)
    # Everything that can fail fails now, not after an hour of generation.
    if config.tasks:
        resolve_tasks(config.tasks)
    if config.backend == "vllm":
        import_vllm()
    source = resolve_source(config.model or run.config["model"], cache_dir, progress)
    if config.backend == "vllm" and source.gguf_file:
        raise TlrefusalError("--backend vllm takes a Hugging Face checkpoint folder, not a .gguf file")
    job = _Job(run_dir, run, sets, source, config.placement(run.config),
               completion_setup(run_dir, run.config, config, source, run.direction), config, cache_dir, progress)
    measured = _measure_with_vllm(job) if config.backend == "vllm" else _measure_on_bridge(job)
    release_memory()  # the evaluated model is gone (tests/test_eval_backends.py checks) before the guard loads
    scores = _judge(sets, measured, _guard(config, measured), progress)

    direction = run.direction
    report = EvalReport(tool_version=__version__, run=str(run_dir), config=config, model=source,
                        hooked=config.model is None,
                        direction=DirectionSummary(direction.layer, direction.position, direction.vector.norm().item()),
                        refusal_and_safety=scores, ce_loss=measured.ce, coherence=measured.coherence,
                        magnitude=measured.magnitude, seconds=round(time.perf_counter() - started, 1))
    _write(run_dir / artifacts.EVAL_DIR, report)
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
    if config.guard_model is not None:  # a folder that cannot judge fails now; the guard itself loads last
        guard_tokenizer(config.guard_model)
    run_config = artifacts.read_json(run_dir / artifacts.CONFIG)["config"]
    refusal_ids = artifacts.read_json(run_dir / artifacts.MANIFEST)["refusal"]["token_ids"]
    return _Run(run_config, refusal_ids, artifacts.load_direction(run_dir, config.layer, config.position))


@dataclass(frozen=True)
class _Job:
    """What one evaluation works from."""

    run_dir: Path
    run: _Run
    sets: list[EvalSet]
    source: ModelSource
    placement: Placement  # the evaluated model's
    setup: CompletionSetup
    config: EvalConfig
    cache_dir: Path | None
    progress: Progress

    @property
    def trust_remote_code(self) -> bool:
        return self.run.config["trust_remote_code"]


@dataclass(frozen=True)
class _Measured:
    """What the evaluated model produced (no reference to the model itself: it is freed after), and where the
    guard goes by default (the evaluated model's input device and dtype)."""

    table: InterventionTable
    made: dict[tuple[str, str], list[Completion]]  # completions by (set name, intervention)
    ce: dict[str, CeDataset]
    magnitude: MagnitudeStudy | None
    coherence: dict[str, TaskCoherence]
    device: str
    dtype: torch.dtype


def _measure_on_bridge(job: _Job) -> _Measured:
    """Completions, CE loss, magnitude study (hooked runs) and coherence, all on one bridge-loaded model."""
    config, direction = job.config, job.run.direction
    model = load_model(job.source, job.placement, job.trust_remote_code, job.progress)
    chat = ChatFormat.for_run(job.run_dir, model.tokenizer)
    if direction.vector.shape[0] != model.d_model:
        raise TlrefusalError(f"the run's direction has width {direction.vector.shape[0]}, the model {model.d_model}")
    r, layer = direction.vector, direction.layer
    hooked = config.model is None
    table = intervention_table(r, layer, model.n_layers, config.actadd_sign) if hooked else AS_LOADED
    made = _all_completions(job, table, BridgeGenerator(model, chat, config.max_new_tokens, config.batch_size,
                                                        config.stop))
    ce = ce_losses(model, chat, ce_interventions(table, r, layer, model.n_layers), _on_distribution(job, table, made),
                   config, job.progress)
    magnitude = None
    if hooked:
        with job.progress.task("Magnitude study", total=None):
            magnitude = magnitude_study(model, chat, magnitude_sets(job.sets, config, job.cache_dir), r, layer,
                                        job.run.refusal_ids)
    coherence = task_coherence(model, [iv for iv in table.harmless if iv.kind in COHERENCE_KINDS], config.tasks,
                               config.coherence_limit, config.batch_size, job.progress)
    return _Measured(table, made, ce, magnitude, coherence, device=str(model.device), dtype=model.dtype)


def _measure_with_vllm(job: _Job) -> _Measured:
    """A checkpoint as loaded: completions from a vLLM engine, coherence from lm-eval's vLLM model, each freed
    before the next loads; then CE loss on the bridge (it needs logits), which loads only if CE is asked for."""
    from transformers import AutoTokenizer

    config = job.config
    dtype = resolve_dtype(job.source, job.placement.dtype)  # vLLM's own "auto" would turn float32 into half
    try:
        tokenizer = AutoTokenizer.from_pretrained(job.source.path, trust_remote_code=job.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TlrefusalError(f"could not load the tokenizer at {job.source.path}: {first_line(exc)}") from exc
    prepare_tokenizer(tokenizer)  # as `load_model` does: the same token ids as the bridge path
    generator = VllmGenerator(job.source.path, dtype, config.tensor_parallel, config.seed, job.trust_remote_code,
                              ChatFormat.for_run(job.run_dir, tokenizer), config.max_new_tokens, config.stop)
    made = _all_completions(job, AS_LOADED, generator)
    generator.close()
    coherence = _vllm_coherence(job, dtype) if config.tasks else {}
    release_memory()
    ce = _bridge_ce(job, _on_distribution(job, AS_LOADED, made)) if config.ce else {}
    device = resolve_device(job.placement.device) if not job.placement.dispatched else \
        "cuda" if torch.cuda.is_available() else "cpu"
    return _Measured(AS_LOADED, made, ce, None, coherence, device=device, dtype=DTYPES[dtype])


def _vllm_coherence(job: _Job, dtype: str) -> dict[str, TaskCoherence]:
    lm = lm_eval_vllm(job.source.path, dtype, job.config.tensor_parallel, job.trust_remote_code)
    return tasks_under(lm, {"as loaded": nullcontext}, job.config.tasks, job.config.coherence_limit, job.progress)


def _bridge_ce(job: _Job, on_distribution: list[Completion]) -> dict[str, CeDataset]:
    """CE loss of the checkpoint as loaded, on the bridge (`--backend vllm`: vLLM gives no such logits)."""
    model = load_model(job.source, job.placement, job.trust_remote_code, job.progress)
    chat = ChatFormat.for_run(job.run_dir, model.tokenizer)
    return ce_losses(model, chat, AS_LOADED.harmless, on_distribution, job.config, job.progress)


def _all_completions(job: _Job, table: InterventionTable, generator: Generator
                     ) -> dict[tuple[str, str], list[Completion]]:
    """Every set's completions under each of its label's interventions, by (set name, intervention)."""
    out_dir = job.run_dir / artifacts.EVAL_DIR
    return {(eval_set.name, iv.name): completions(out_dir, eval_set, iv, job.setup, generator, job.progress)
            for eval_set in job.sets for iv in table.for_label(eval_set.label)}


def _on_distribution(job: _Job, table: InterventionTable, made: dict[tuple[str, str], list[Completion]]
                     ) -> list[Completion]:
    """The on-distribution CE text: the first harmless set's completions without intervention."""
    first_harmless = next(s.name for s in job.sets if s.label == "harmless")
    return made[(first_harmless, table.harmless[0].name)]


def _guard(config: EvalConfig, measured: _Measured) -> LlamaGuard | None:
    """The Llama Guard model on --guard-device in --guard-dtype, else where the evaluated model was."""
    if config.guard_model is None:
        return None
    dtype = measured.dtype
    if config.guard_dtype is not None:
        dtype = DTYPES[resolve_dtype(ModelSource(str(config.guard_model), "local", config.guard_model),
                                     config.guard_dtype)]
    device = resolve_device(config.guard_device) if config.guard_device is not None else measured.device
    return LlamaGuard(config.guard_model, dtype, device)


def _judge(sets: list[EvalSet], measured: _Measured, guard: LlamaGuard | None, progress: Progress
           ) -> dict[str, DatasetScores]:
    """Refusal and safety scores per set and intervention."""
    per_set: dict[str, tuple[str, dict[str, InterventionScores]]] = {}
    for eval_set in sets:
        for iv in measured.table.for_label(eval_set.label):
            rows = measured.made[(eval_set.name, iv.name)]
            per_set.setdefault(eval_set.name, (eval_set.label, {}))[1][iv.name] = \
                score_completions(rows, guard, progress, f"Llama Guard: {eval_set.name}, {iv.name}")
    return {name: DatasetScores(label, ivs) for name, (label, ivs) in per_set.items()}


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
