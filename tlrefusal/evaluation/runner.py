"""`tlrefusal eval RUN`: the paper's evaluations of a run's model and direction (its section 4 and Table 9).

RUN/eval/
  completions/<dataset>.<intervention>.jsonl  one {"prompt", "category", "completion"} per line
  completions/<dataset>.<intervention>.json   what produced them (model, direction, prompts, settings);
                                               a re-run with the same setup reuses the completions
  scores.json                                  the judge: refusal and safety scores of every completion set
  loss.json, coherence.json, magnitude.json    CE loss, lm-eval coherence, the magnitude study (hooked runs)
                                               each step's file holds the key of what decided it, and a re-run
                                               with the same key reuses it (`tlrefusal.evaluation.stored`)
  report.json                                  every number with its sample size
  report.md                                    the tables in the paper's layout
  plots/refusal.png                            refusal score per dataset and intervention
  plots/projection_vs_refusal.png              the magnitude study's scatter (hooked runs only)

Interventions come from `tlrefusal.interventions.intervention_table`: the run's model at baseline, under
directional ablation and under activation addition at the direction's layer. With `model` set (for
example a checkpoint from `tlrefusal orthogonalize`) that model is evaluated as it is, with no hooks
(`AS_LOADED`), and its numbers sit where ablation's would. The direction is the run's chosen one, or
with `layer` and `position` any candidate the run scored. A step not asked for (no CE datasets, no tasks, no
hooks for the magnitude study) writes nothing and the report holds nothing for it.

Order, so that at most one model holds memory at a time: the evaluated model generates every completion set
under every intervention, then gives its CE losses, magnitude study and lm-eval coherence; it is freed; then
the Llama Guard model loads and judges every completion set, read from its file. The evaluated model loads only
when some completions or step is not stored for the same inputs, and the guard only when the judge's are not:
re-running a finished evaluation loads nothing. With `backend="vllm"` (a checkpoint as loaded) a vLLM engine
generates the completions and is freed, lm-eval's own vLLM model runs the coherence tasks and is freed, and CE
loss, which needs the bridge's logits, loads the checkpoint on the bridge last (`tlrefusal.evaluation.backends`).

`judge_only` (`tlrefusal eval RUN --judge-only`, e.g. with the guard on another machine) never loads the
evaluated model: it judges the completions on disk, which must all have been made by this evaluation's setup,
and reports CE loss, coherence and the magnitude study from their files where stored for this setup.
"""
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tlrefusal import __version__, artifacts
from tlrefusal.chat import ChatFormat, run_reasoning
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
from tlrefusal.evaluation.completion_files import CompletionFiles, completion_files
from tlrefusal.evaluation.completions import (
    Completion,
    CompletionSetup,
    completion_setup,
    completions,
    eval_chat_options,
)
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.guard import LlamaGuard, guard_tokenizer
from tlrefusal.evaluation.magnitude import MagnitudeStudy, magnitude_study
from tlrefusal.evaluation.report import DirectionSummary, EvalReport, markdown_report
from tlrefusal.evaluation.scores import DatasetScores, score_completions
from tlrefusal.evaluation.sets import EvalSet, eval_sets, magnitude_sets
from tlrefusal.evaluation.stored import (
    COHERENCE,
    LOSS,
    MAGNITUDE,
    SCORES,
    coherence_key,
    loss_key,
    magnitude_key,
    scores_key,
)
from tlrefusal.interventions import AS_LOADED, Intervention, InterventionTable, intervention_table
from tlrefusal.model import (
    DTYPES,
    LoadedModel,
    ModelSource,
    load_model,
    prepare_tokenizer,
    release_memory,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Advance, Progress
from tlrefusal.reasoning import Markers

COHERENCE_KINDS = ("baseline", "ablation", "as loaded")  # lm-eval runs on these harmless rows, not on actadd


def run_eval(run_dir: Path, config: EvalConfig, cache_dir: Path | None = None,
             progress: Progress = NO_PROGRESS, judge_only: bool = False) -> EvalReport:
    """Evaluate the run; writes RUN/eval/ and returns the report. `judge_only`: judge the completions already
    there without loading the evaluated model (module docstring)."""
    started = time.perf_counter()
    run = _read_run(run_dir, config)
    sets = eval_sets(run_dir, run.config, config, cache_dir)
    if not judge_only:  # everything that can fail fails now, not after an hour of generation
        if config.tasks:
            resolve_tasks(config.tasks)
        if config.backend == "vllm":
            import_vllm()
    source = _source_to_judge(run, config, cache_dir, progress) if judge_only else \
        resolve_source(config.model or run.config["model"], cache_dir, progress)
    if config.backend == "vllm" and source.gguf_file:
        raise TlrefusalError("--backend vllm takes a Hugging Face checkpoint folder, not a .gguf file")
    job = _Job(run_dir, run, sets, source, config.placement(run.config),
               completion_setup(run_dir, run.config, config, source, run.direction), config, cache_dir, progress)
    if judge_only:
        measured = _stored_measures(job)
    else:
        measured = _measure_with_vllm(job) if config.backend == "vllm" else _measure_on_bridge(job)
    release_memory()  # the evaluated model is gone (tests/test_eval_backends.py checks) before the guard loads
    scores = _scores(job, measured.table)

    direction = run.direction
    report = EvalReport(tool_version=__version__, run=str(run_dir), config=config, model=source,
                        hooked=config.model is None,
                        direction=DirectionSummary(direction.layer, direction.position, direction.vector.norm().item()),
                        refusal_and_safety=scores, ce_loss=measured.ce, coherence=measured.coherence,
                        magnitude=measured.magnitude, seconds=round(time.perf_counter() - started, 1),
                        chat=eval_chat_options(run_dir, config).to_json())
    _write(job.out_dir, report)
    return report


@dataclass(frozen=True)
class _Run:
    config: dict  # the run's resolved extract config
    refusal_ids: list[int]  # the refusal tokens its log-odds use
    direction: artifacts.RefusalDirection  # the direction to evaluate
    model: dict | None  # the manifest's record of the run's model (a hand-made run folder may have none)

    @property
    def n_layers(self) -> int | None:
        return (self.model or {}).get("n_layers")


def _read_run(run_dir: Path, config: EvalConfig) -> _Run:
    """What the evaluation needs from the run folder; a clear error for what is missing."""
    if not (run_dir / artifacts.CONFIG).is_file():
        raise TlrefusalError(f"{run_dir} is not a tlrefusal run folder (no {artifacts.CONFIG})")
    if not config.picks_candidate and not (run_dir / artifacts.DIRECTION).is_file():
        raise TlrefusalError(f"{run_dir} has no direction ({artifacts.DIRECTION}); `tlrefusal extract` chose none")
    if config.guard_model is not None:  # a folder that cannot judge fails now; the guard itself loads last
        guard_tokenizer(config.guard_model)
    run_config = artifacts.read_json(run_dir / artifacts.CONFIG)["config"]
    manifest = artifacts.read_json(run_dir / artifacts.MANIFEST)
    return _Run(run_config, manifest["refusal"]["token_ids"],
                artifacts.load_direction(run_dir, config.layer, config.position), manifest.get("model"))


def _source_to_judge(run: _Run, config: EvalConfig, cache_dir: Path | None, progress: Progress) -> ModelSource:
    """The evaluated model's source without fetching it: the run's manifest record of its own model (as on the
    machine that made the completions), or `config.model` resolved (a local folder as it is)."""
    if config.model is None and run.model is not None:
        return ModelSource.from_json(run.model)
    return resolve_source(config.model or run.config["model"], cache_dir, progress)


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

    @property
    def out_dir(self) -> Path:
        return self.run_dir / artifacts.EVAL_DIR


def _chat(job: "_Job", tokenizer) -> ChatFormat:
    """The run's chat format with the evaluation's system prompt and template variables where it gives them."""
    return ChatFormat.for_run(job.run_dir, tokenizer, job.config.system_prompt, job.config.chat_template_kwargs)


@dataclass(frozen=True)
class _Measured:
    """What the evaluated model gave besides its completions (no reference to the model itself: it is freed)."""

    table: InterventionTable
    ce: dict[str, CeDataset]
    magnitude: MagnitudeStudy | None
    coherence: dict[str, TaskCoherence]


class _BridgeModel:
    """The evaluated model on the bridge, loaded on first use: a re-run whose completions and steps are all
    stored loads none."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self._loaded: tuple[LoadedModel, ChatFormat] | None = None

    def get(self) -> tuple[LoadedModel, ChatFormat]:
        if self._loaded is None:
            job = self.job
            model = load_model(job.source, job.placement, job.trust_remote_code, job.progress)
            width = job.run.direction.vector.shape[0]
            if width != model.d_model:
                raise TlrefusalError(f"the run's direction has width {width}, the model {model.d_model}")
            if job.config.model is None and job.run.n_layers not in (None, model.n_layers):
                raise TlrefusalError(f"the run's manifest records {job.run.n_layers} layers, the model at "
                                     f"{job.source.path} has {model.n_layers}")
            self._loaded = (model, _chat(job, model.tokenizer))
        return self._loaded


@dataclass(frozen=True)
class _OnFirstUse:
    """A `Generator` made when first asked for replies, so that reused completions load no model."""

    make: Callable[[], Generator]

    def replies(self, instructions: Sequence[str], intervention: Intervention, advance: Advance) -> list[str]:
        return self.make().replies(instructions, intervention, advance)


def _measure_on_bridge(job: _Job) -> _Measured:
    """Completions, CE loss, magnitude study (hooked runs) and coherence, all on one bridge-loaded model, each
    taken from RUN/eval/ when stored for the same inputs."""
    config, r, layer = job.config, job.run.direction.vector, job.run.direction.layer
    bridge = _BridgeModel(job)
    hooked = config.model is None
    # The hooks need the layer count, which the run's manifest records: the model need not load to tell it.
    n_layers = job.run.n_layers or (bridge.get()[0].n_layers if hooked else 0)
    table = intervention_table(r, layer, n_layers, config.actadd_sign) if hooked else AS_LOADED
    _make_completions(job, table, _OnFirstUse(lambda: BridgeGenerator(*bridge.get(), config.max_new_tokens,
                                                                      config.batch_size, config.stop)))
    ce_ivs = ce_interventions(table, r, layer, n_layers)
    ce = _loss(job, table, ce_ivs, lambda rows: ce_losses(*bridge.get(), ce_ivs, rows, config, job.progress))
    magnitude = _magnitude(job, lambda sets: _magnitude_study(job, *bridge.get(), sets))
    coherence = _coherence(job, table, lambda ivs: task_coherence(
        bridge.get()[0], ivs, config.tasks, config.coherence_limit, config.batch_size, job.progress))
    return _Measured(table, ce, magnitude, coherence)


def _magnitude_study(job: _Job, model: LoadedModel, chat: ChatFormat, sets: dict[str, list[str]]) -> MagnitudeStudy:
    direction = job.run.direction
    with job.progress.task("Magnitude study", total=None):
        return magnitude_study(model, chat, sets, direction.vector, direction.layer, job.run.refusal_ids)


def _measure_with_vllm(job: _Job) -> _Measured:
    """A checkpoint as loaded: completions from a vLLM engine, coherence from lm-eval's vLLM model, each freed
    before the next loads; then CE loss on the bridge (it needs logits). Each engine or model starts only if
    what it gives is not stored for the same inputs."""
    from transformers import AutoTokenizer

    config = job.config
    dtype = resolve_dtype(job.source, job.placement.dtype)  # vLLM's own "auto" would turn float32 into half
    try:
        tokenizer = AutoTokenizer.from_pretrained(job.source.path, trust_remote_code=job.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TlrefusalError(f"could not load the tokenizer at {job.source.path}: {first_line(exc)}") from exc
    prepare_tokenizer(tokenizer)  # as `load_model` does: the same token ids as the bridge path
    generator = VllmGenerator(job.source.path, dtype, config.tensor_parallel, config.seed, job.trust_remote_code,
                              _chat(job, tokenizer), config.max_new_tokens, config.stop)
    _make_completions(job, AS_LOADED, generator)
    generator.close()
    coherence = _coherence(job, AS_LOADED, lambda ivs: _vllm_coherence(job, dtype))
    release_memory()
    ce = _loss(job, AS_LOADED, AS_LOADED.harmless, lambda rows: _bridge_ce(job, rows))
    return _Measured(AS_LOADED, ce, None, coherence)


def _vllm_coherence(job: _Job, dtype: str) -> dict[str, TaskCoherence]:
    lm = lm_eval_vllm(job.source.path, dtype, job.config.tensor_parallel, job.trust_remote_code)
    return tasks_under(lm, {"as loaded": nullcontext}, job.config.tasks, job.config.coherence_limit, job.progress)


def _bridge_ce(job: _Job, on_distribution: list[Completion]) -> dict[str, CeDataset]:
    """CE loss of the checkpoint as loaded, on the bridge (`--backend vllm`: vLLM gives no such logits)."""
    model = load_model(job.source, job.placement, job.trust_remote_code, job.progress)
    chat = _chat(job, model.tokenizer)
    return ce_losses(model, chat, AS_LOADED.harmless, on_distribution, job.config, job.progress)


def _stored_measures(job: _Job) -> _Measured:
    """`judge_only`: the interventions without the model, the completions checked, and the other steps' results
    as stored for this setup (else left out)."""
    config, direction = job.config, job.run.direction
    table, n_layers = AS_LOADED, 0
    if config.model is None:
        if job.run.n_layers is None:
            raise TlrefusalError(f"{job.run_dir / artifacts.MANIFEST} records no layer count, which --judge-only "
                                 f"needs; run `tlrefusal eval {job.run_dir}` without --judge-only")
        n_layers = job.run.n_layers
        table = intervention_table(direction.vector, direction.layer, n_layers, config.actadd_sign)
    _check_completions(job, table)
    ce_ivs = ce_interventions(table, direction.vector, direction.layer, n_layers)
    return _Measured(table, _loss(job, table, ce_ivs, None), _magnitude(job, None), _coherence(job, table, None))


def _check_completions(job: _Job, table: InterventionTable) -> None:
    """`judge_only`: every completion set of this evaluation is on disk, made by this evaluation's setup."""
    again = f"run `tlrefusal eval {job.run_dir}` without --judge-only first"
    for eval_set in job.sets:
        for iv in table.for_label(eval_set.label):
            files = completion_files(job.out_dir, eval_set, iv)
            missing = next((path for path in (files.jsonl, files.record) if not path.is_file()), None)
            if missing is not None:
                raise TlrefusalError(f"--judge-only: no {missing}; {again}")
            if artifacts.read_json(files.record) != job.setup.record(iv.name, eval_set.prompts):
                raise TlrefusalError(f"--judge-only: {files.jsonl} was made by another setup than this "
                                     f"evaluation's (see {files.record.name}); {again}")


def _make_completions(job: _Job, table: InterventionTable, generator: Generator) -> None:
    """Every set's completions under each of its label's interventions, in RUN/eval/completions/ (reused there
    when the same setup made them)."""
    for eval_set in job.sets:
        for iv in table.for_label(eval_set.label):
            completions(job.out_dir, eval_set, iv, job.setup, generator, job.progress)


def _read_completions(files: CompletionFiles) -> list[Completion]:
    return [Completion.from_json(row) for row in files.rows()]


# Each step below: nothing if not asked for; else its result stored for these inputs, else `run`'s (stored);
# `run` None (`judge_only`): the stored result or nothing.

def _loss(job: _Job, table: InterventionTable, interventions: tuple[Intervention, ...],
          run: Callable[[list[Completion]], dict[str, CeDataset]] | None) -> dict[str, CeDataset]:
    """CE loss; `run` takes the on-distribution text: the first harmless set's completions without intervention."""
    if not job.config.ce:
        return {}
    first_harmless = next(s for s in job.sets if s.label == "harmless")
    files = completion_files(job.out_dir, first_harmless, table.harmless[0])
    key = loss_key(job.setup, job.config, interventions, files.jsonl)
    if run is None:
        return LOSS.stored(job.out_dir, key) or {}
    return LOSS.reuse_or_run(job.out_dir, key, lambda: run(_read_completions(files)))


def _magnitude(job: _Job, run: Callable[[dict[str, list[str]]], MagnitudeStudy] | None) -> MagnitudeStudy | None:
    """The magnitude study of a hooked run; `run` takes the prompt sets."""
    if job.config.model is not None:
        return None
    sets = magnitude_sets(job.sets, job.config, job.cache_dir)
    key = magnitude_key(job.setup, sets, job.run.refusal_ids)
    if run is None:
        return MAGNITUDE.stored(job.out_dir, key)
    return MAGNITUDE.reuse_or_run(job.out_dir, key, lambda: run(sets))


def _coherence(job: _Job, table: InterventionTable,
               run: Callable[[list[Intervention]], dict[str, TaskCoherence]] | None) -> dict[str, TaskCoherence]:
    """lm-eval coherence; `run` takes the harmless interventions it runs under."""
    if not job.config.tasks:
        return {}
    interventions = [iv for iv in table.harmless if iv.kind in COHERENCE_KINDS]
    key = coherence_key(job.setup, job.config, [iv.name for iv in interventions])
    if run is None:
        return COHERENCE.stored(job.out_dir, key) or {}
    return COHERENCE.reuse_or_run(job.out_dir, key, lambda: run(interventions))


@dataclass(frozen=True)
class _GuardAt:
    """The Llama Guard model and where it runs."""

    path: Path
    dtype: torch.dtype
    device: str

    def key(self) -> dict:
        return {"model": str(self.path.resolve()), "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device}


def _guard_at(job: _Job) -> _GuardAt | None:
    """The guard on --guard-device in --guard-dtype, else where the evaluated model runs (its input device with
    a map) in its dtype, told without loading it."""
    config, placement = job.config, job.placement
    if config.guard_model is None:
        return None
    if config.guard_dtype is not None:
        dtype = resolve_dtype(ModelSource(str(config.guard_model), "local", config.guard_model), config.guard_dtype)
    else:
        dtype = resolve_dtype(job.source, placement.dtype)
    if config.guard_device is not None:
        device = resolve_device(config.guard_device)
    elif placement.dispatched:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = resolve_device(placement.device)
    return _GuardAt(config.guard_model, DTYPES[dtype], device)


def _scores(job: _Job, table: InterventionTable) -> dict[str, DatasetScores]:
    """Refusal and safety scores per set and intervention, judged from the completions files (stored in
    scores.json for their content and the guard)."""
    judged = [(eval_set, iv, completion_files(job.out_dir, eval_set, iv))
              for eval_set in job.sets for iv in table.for_label(eval_set.label)]
    guard_at = _guard_at(job)
    # A reasoning model's replies are judged on their final answers; its markers, and whether its generation
    # prompt opens the block, are read from the run's manifest, so --judge-only needs no model.
    markers, opened = run_reasoning(job.run_dir)
    key = scores_key(judged, None if guard_at is None else guard_at.key(), markers, opened)
    return SCORES.reuse_or_run(job.out_dir, key, lambda: _judge(judged, guard_at, job.progress, markers, opened))


def _judge(judged: list[tuple[EvalSet, Intervention, CompletionFiles]], guard_at: _GuardAt | None,
           progress: Progress, markers: Markers | None = None, opened: bool = False) -> dict[str, DatasetScores]:
    guard = None if guard_at is None else LlamaGuard(guard_at.path, guard_at.dtype, guard_at.device)
    per_set: dict[str, DatasetScores] = {}
    for eval_set, iv, files in judged:
        entry = per_set.setdefault(eval_set.name, DatasetScores(eval_set.label, {}))
        entry.interventions[iv.name] = score_completions(_read_completions(files), guard, progress,
                                                         f"Llama Guard: {eval_set.name}, {iv.name}", markers, opened)
    return per_set


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
