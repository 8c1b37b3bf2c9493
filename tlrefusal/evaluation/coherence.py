"""Coherence benchmarks through the EleutherAI LM Evaluation Harness, run in-process (the paper's coherence
evaluation).

The TransformerBridge wraps the Hugging Face model's own modules in place, so lm-eval's own
`transformers` model class (`HFLM`) driven over `bridge.original_model` runs every forward pass through
the bridge's hook points: inside `bridge.hooks(...)`, log-likelihoods, rolling log-likelihoods and
generation are all under the intervention. No lm-eval code is reimplemented, so scores are computed
exactly as the harness computes them for any model (tests compare with lm-eval's `hf` model loaded
from the same folder, and with an orthogonalized checkpoint).

Like the paper, no chat template is applied. Tasks come by lm-eval name (the hub supplies their data)
or as local task YAML files.
"""
import functools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml

from hooks.ablation import HookFn
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.evaluation.per_intervention import PerIntervention
from tlrefusal.interventions import Intervention
from tlrefusal.model import LoadedModel
from tlrefusal.progress import NO_PROGRESS, Progress

DEFAULT_TASKS = ("mmlu", "arc_challenge", "truthfulqa_mc2")


def resolve_tasks(tasks: Sequence[str]) -> tuple[list[str], object]:
    """Task names for lm-eval and a TaskManager that knows any local YAML files among `tasks`."""
    names, include = [], []
    for task in tasks:
        path = Path(task)
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
            names.append(str(data["task"]))
            include.append(str(path.resolve().parent))
        else:
            names.append(task)
    manager = _task_manager(tuple(sorted(set(include))))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TlrefusalError(f"unknown lm-eval task {unknown[0]!r} (see `lm-eval ls tasks`, or pass a task YAML)")
    return names, manager


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
    """lm-eval's numeric metrics per (sub)task and how many documents each used."""

    metrics: dict[str, dict[str, float]]
    n_samples: dict[str, int | None]

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "n_samples": self.n_samples}

    @classmethod
    def from_json(cls, data: dict) -> "LmEvalResult":
        return cls(metrics=data["metrics"], n_samples=data["n_samples"])


# One lm-eval task under each intervention, or why it could not run.
TaskCoherence = PerIntervention[LmEvalResult]


def run_lm_eval(lm, tasks: Sequence[str], hooks_context=None, limit: int | float | None = None,
                num_fewshot: int | None = None, seed: int = 1234) -> LmEvalResult:
    """Evaluate an lm-eval model on `tasks`: numeric metrics per task and sample counts."""
    from lm_eval import simple_evaluate

    names, manager = resolve_tasks(tasks)
    with hooks_context or nullcontext():
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    metrics = {task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and not k.startswith("alias")}
               for task, values in results["results"].items()}
    samples = {task: n.get("effective", n.get("original")) if isinstance(n, dict) else n
               for task, n in results.get("n-samples", {}).items()}
    return LmEvalResult(metrics=metrics, n_samples=samples)


def coherence(model: LoadedModel, interventions: dict[str, list[tuple[str, HookFn]]], tasks: Sequence[str],
              limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8
              ) -> dict[str, LmEvalResult]:
    """lm-eval scores per intervention (an empty hook list is the model as loaded)."""
    lm = lm_eval_model(model, batch_size)
    return {name: run_lm_eval(lm, tasks, model.bridge.hooks(fwd_hooks=list(hooks)), limit, num_fewshot)
            for name, hooks in interventions.items()}


def task_coherence(model: LoadedModel, interventions: Sequence[Intervention], tasks: Sequence[str],
                   limit: int | None, batch_size: int, progress: Progress = NO_PROGRESS) -> dict[str, TaskCoherence]:
    """Each task under each intervention, one lm-eval call apiece (`tlrefusal eval`'s coherence section).

    A hub task whose data cannot be fetched is reported unavailable; a local task file that fails is an error.
    """
    lm = lm_eval_model(model, batch_size) if tasks else None
    out: dict[str, TaskCoherence] = {}
    for task in tasks:
        runs: dict[str, LmEvalResult] = {}
        for iv in interventions:
            try:
                with progress.task(f"lm-eval: {task}, {iv.name}", total=None):
                    runs[iv.name] = run_lm_eval(lm, [task], model.bridge.hooks(fwd_hooks=list(iv.hooks)), limit=limit)
            except Exception as exc:  # lm-eval and datasets raise many types when the hub is out of reach
                if Path(task).suffix in (".yaml", ".yml"):
                    raise
                out[task] = TaskCoherence(unavailable=f"could not run {task}: {first_line(exc)}")
                break
        else:
            out[task] = TaskCoherence(runs=runs)
    return out
