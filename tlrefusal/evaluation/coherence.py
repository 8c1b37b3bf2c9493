"""Coherence benchmarks through the EleutherAI LM Evaluation Harness, run in-process (the paper's coherence
evaluation).

The TransformerBridge wraps the Hugging Face model's own modules in place, so lm-eval's own
`transformers` model class (`HFLM`) driven over `bridge.original_model` runs every forward pass through
the bridge's hook points: inside `bridge.hooks(...)`, log-likelihoods, rolling log-likelihoods and
generation are all under the intervention. No lm-eval code is reimplemented, so scores are computed
exactly as the harness computes them for any model (tests compare with lm-eval's `hf` model loaded
from the same folder, and with an orthogonalized checkpoint).

A checkpoint evaluated as loaded with `--backend vllm` runs through lm-eval's own vLLM model instead
(`lm_eval_vllm`): lm-eval's numbers for that model type, not the bridge's (kernels differ slightly).

Like the paper, no chat template is applied. Tasks come by lm-eval name (the hub supplies their data)
or as local task YAML files, each optionally with a few-shot count: "NAME:SHOTS" (a plain NAME keeps the
task's own default). PAPER_TASKS are the paper's settings; REPORT_METRICS the metric quoted per task.
"""
import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hooks.ablation import HookFn
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.evaluation.per_intervention import PerIntervention
from tlrefusal.interventions import Intervention
from tlrefusal.model import LoadedModel
from tlrefusal.progress import NO_PROGRESS, Progress

DEFAULT_TASKS = ("mmlu", "arc_challenge", "truthfulqa_mc2")
# The paper's coherence settings (Open LLM Leaderboard v1 conventions), as "NAME:SHOTS" task specs.
PAPER_TASKS = ("arc_challenge:25", "mmlu:5", "truthfulqa_mc2:0", "gsm8k:5", "winogrande:5")
# The metric the report quotes per task, as lm-eval names it ("metric,filter"): the Leaderboard v1 choices.
# lm-eval calls TruthfulQA's mc2 score "acc" in its truthfulqa_mc2 task; GSM8K's strict match reads the
# number after "####" as the Leaderboard v1 harness did.
REPORT_METRICS = {"arc_challenge": "acc_norm,none", "mmlu": "acc,none", "truthfulqa_mc2": "acc,none",
                  "gsm8k": "exact_match,strict-match", "winogrande": "acc,none"}


@dataclass(frozen=True)
class TaskSpec:
    """One coherence task: an lm-eval task name or local task YAML file, and its few-shot count
    (None: the task's own default)."""

    name: str
    shots: int | None = None

    def __str__(self) -> str:
        return self.name if self.shots is None else f"{self.name}:{self.shots}"


def parse_task_spec(spec: str) -> TaskSpec:
    """ "NAME" or "NAME:SHOTS" (SHOTS a whole number >= 0); a path ending in .yaml/.yml is a name as it is."""
    if Path(spec).suffix in (".yaml", ".yml") or ":" not in spec:
        return TaskSpec(spec)
    name, shots = spec.rsplit(":", 1)
    if not name or not shots.isdigit():
        raise TlrefusalError(f"bad task {spec!r}: expected NAME or NAME:SHOTS with SHOTS a whole number >= 0")
    return TaskSpec(name, int(shots))


def resolve_tasks(tasks: Sequence[str]) -> tuple[list[TaskSpec], object]:
    """Task specs with lm-eval task names, and a TaskManager that knows any local YAML files among `tasks`."""
    specs, include = [], []
    for spec in map(parse_task_spec, tasks):
        path = Path(spec.name)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise TlrefusalError(f"no task file at {path}")
            try:
                # lm-eval task files may carry custom tags (!function); only the task name is read here.
                data = yaml.load(path.read_text(encoding="utf-8"), Loader=_IgnoreTagsLoader)
            except yaml.YAMLError as exc:
                raise TlrefusalError(f"{path} is not valid YAML: {exc}") from exc
            if not isinstance(data, dict) or "task" not in data:
                raise TlrefusalError(f"{path} has no 'task' name")
            specs.append(TaskSpec(str(data["task"]), spec.shots))
            include.append(str(path.resolve().parent))
        else:
            specs.append(spec)
    names = [s.name for s in specs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise TlrefusalError(f"task {twice!r} is given twice")
    manager = _task_manager(tuple(sorted(set(include))))
    known = set(manager.all_tasks)
    unknown = [s.name for s in specs if s.name not in known]
    if unknown:
        raise TlrefusalError(f"unknown lm-eval task {unknown[0]!r} (see `lm-eval ls tasks`, or pass a task YAML)")
    return specs, manager


def load_tasks(specs: Sequence[TaskSpec], manager) -> list:
    """lm-eval Task and Group objects for `specs`, each leaf task set to its spec's few-shot count.

    lm-eval's `simple_evaluate` takes one `num_fewshot` for all tasks (and ignores it for a task whose YAML
    says 0); setting `num_fewshot` on the built tasks, which `simple_evaluate` accepts in place of names,
    gives each task its own count.
    """
    objects = []
    for spec in specs:
        loaded = manager.load([spec.name])
        if spec.shots is not None:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=spec.shots)
        top = loaded["groups"].get(spec.name)
        objects += [top] if top is not None else list(loaded["tasks"].values())
    return objects


@functools.lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...]):
    """lm-eval indexes every task YAML it ships when a TaskManager is made (seconds): make each one once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


class _IgnoreTagsLoader(yaml.SafeLoader):
    pass


_IgnoreTagsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def lm_eval_model(model: LoadedModel, batch_size: int = 8):
    """lm-eval's HFLM over the bridged module tree (hooks apply inside `model.bridge.hooks`)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model.bridge.original_model, tokenizer=model.tokenizer, batch_size=batch_size,
                device=str(model.device))


@dataclass(frozen=True)
class LmEvalResult:
    """lm-eval's numeric metrics per (sub)task, how many documents and few-shot examples each used (as lm-eval
    reports them), and per requested task the metric the report quotes (REPORT_METRICS; absent: all)."""

    metrics: dict[str, dict[str, float]]
    n_samples: dict[str, int | None]
    n_shot: dict[str, int] = field(default_factory=dict)
    report_metric: dict[str, str] = field(default_factory=dict)

    def headline(self) -> dict[str, float]:
        """task -> the value of its report metric, for the tasks that have one."""
        return {task: self.metrics[task][key] for task, key in self.report_metric.items()
                if key in self.metrics.get(task, {})}

    def summary(self, digits: int = 4) -> str:
        """Per task: its quoted metric (`REPORT_METRICS`), or every metric if it has none; and its few-shot count."""
        parts = []
        for task, values in self.metrics.items():
            key = self.report_metric.get(task)
            shown = {key: values[key]} if key in values else {k: v for k, v in values.items() if "stderr" not in k}
            shots = f" ({self.n_shot[task]}-shot)" if task in self.n_shot else ""
            parts.append(f"{task}{shots} " + ", ".join(f"{k.split(',')[0]}: {v:.{digits}g}" for k, v in shown.items()))
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "n_samples": self.n_samples, "n_shot": self.n_shot,
                "report_metric": self.report_metric}

    @classmethod
    def from_json(cls, data: dict) -> "LmEvalResult":
        return cls(metrics=data["metrics"], n_samples=data["n_samples"], n_shot=data.get("n_shot", {}),
                   report_metric=data.get("report_metric", {}))


# One lm-eval task under each intervention, or why it could not run.
TaskCoherence = PerIntervention[LmEvalResult]


def run_lm_eval(lm, tasks: Sequence[str], hooks_context=None, limit: int | float | None = None,
                seed: int = 1234) -> LmEvalResult:
    """Evaluate an lm-eval model on `tasks` ("NAME" or "NAME:SHOTS" specs): metrics, sample and shot counts."""
    from lm_eval import simple_evaluate

    specs, manager = resolve_tasks(tasks)
    objects = load_tasks(specs, manager)
    with hooks_context or nullcontext():
        results = simple_evaluate(model=lm, tasks=objects, task_manager=manager, limit=limit,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    metrics = {task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and not k.startswith("alias")}
               for task, values in results["results"].items()}
    samples = {task: n.get("effective", n.get("original")) if isinstance(n, dict) else n
               for task, n in results.get("n-samples", {}).items()}
    shots = {task: int(n) for task, n in results.get("n-shot", {}).items() if isinstance(n, int)}
    chosen = {s.name: REPORT_METRICS[s.name] for s in specs if s.name in REPORT_METRICS}
    return LmEvalResult(metrics=metrics, n_samples=samples, n_shot=shots, report_metric=chosen)


def coherence(model: LoadedModel, interventions: dict[str, list[tuple[str, HookFn]]], tasks: Sequence[str],
              limit: int | float | None = None, batch_size: int = 8) -> dict[str, LmEvalResult]:
    """lm-eval scores per intervention (an empty hook list is the model as loaded)."""
    lm = lm_eval_model(model, batch_size)
    return {name: run_lm_eval(lm, tasks, model.bridge.hooks(fwd_hooks=list(hooks)), limit)
            for name, hooks in interventions.items()}


def task_coherence(model: LoadedModel, interventions: Sequence[Intervention], tasks: Sequence[str],
                   limit: int | None, batch_size: int, progress: Progress = NO_PROGRESS) -> dict[str, TaskCoherence]:
    """Each task under each intervention, through lm-eval's HFLM over the bridge (`tlrefusal eval`'s coherence
    section); see `tasks_under`."""
    lm = lm_eval_model(model, batch_size) if tasks else None
    contexts = {iv.name: functools.partial(model.bridge.hooks, fwd_hooks=list(iv.hooks)) for iv in interventions}
    return tasks_under(lm, contexts, tasks, limit, progress)


def lm_eval_vllm(path: Path, dtype: str, tensor_parallel: int, trust_remote_code: bool, seed: int = 1234):
    """lm-eval's own vLLM model (`lm_eval.models.vllm_causallms.VLLM`, lm-eval's "vllm") over a checkpoint
    folder, evaluated as it is (`tlrefusal eval --backend vllm`): vLLM batches the requests itself."""
    from tlrefusal.evaluation.backends import import_vllm

    import_vllm()  # lm-eval's own message would name lm-eval's extra, not tlrefusal's
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(path), dtype=dtype, tensor_parallel_size=tensor_parallel,
                trust_remote_code=trust_remote_code, batch_size="auto", seed=seed)


def tasks_under(lm, contexts: dict[str, Callable[[], AbstractContextManager]], tasks: Sequence[str],
                limit: int | None, progress: Progress = NO_PROGRESS) -> dict[str, TaskCoherence]:
    """Each task with `lm` inside each named context (an intervention's hooks; `nullcontext` for a model as
    loaded), one lm-eval call apiece, keyed by the task's name as given (without ":SHOTS"; the shots used are
    in each result's `n_shot`).

    A hub task whose data cannot be fetched is reported unavailable; a local task file that fails is an error.
    """
    out: dict[str, TaskCoherence] = {}
    for task in tasks:
        name = parse_task_spec(task).name
        runs: dict[str, LmEvalResult] = {}
        for run_name, context in contexts.items():
            try:
                with progress.task(f"lm-eval: {task}, {run_name}", total=None):
                    runs[run_name] = run_lm_eval(lm, [task], context(), limit=limit)
            except Exception as exc:  # lm-eval and datasets raise many types when the hub is out of reach
                if Path(name).suffix in (".yaml", ".yml"):
                    raise
                out[name] = TaskCoherence(unavailable=f"could not run {task}: {first_line(exc)}")
                break
        else:
            out[name] = TaskCoherence(runs=runs)
    return out
