"""The evaluation steps after generation, each kept in RUN/eval/ with the key of what decided its numbers and
reused while that key is unchanged (file names in `tlrefusal.artifacts`):

  scores.json     the judge: refusal and safety scores of every completion set under each intervention
  loss.json       CE loss
  coherence.json  lm-eval coherence
  magnitude.json  the magnitude study

Each file holds {"key": ..., "result": ...}. A key holds what decides its step and nothing else, so a setting
that one step reads (the guard, --n-ce, --tasks) redoes that step only: the evaluated model (`model_key`), the
step's own settings, and by content hash the files it reads (the completions it judges or scores CE on, local
data and task files). Like the completions, a step is resumed by the presence of its file written for the same
inputs (docs/CONVENTIONS.md).
"""
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from tlrefusal import artifacts
from tlrefusal.evaluation.ce import CeDataset
from tlrefusal.evaluation.coherence import LmEvalResult, TaskCoherence, parse_task_spec
from tlrefusal.evaluation.completion_files import CompletionFiles
from tlrefusal.evaluation.completions import CompletionSetup
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.loss import CeLoss
from tlrefusal.evaluation.magnitude import MagnitudeStudy
from tlrefusal.evaluation.scores import DatasetScores
from tlrefusal.evaluation.sets import EvalSet
from tlrefusal.interventions import Intervention
from tlrefusal.reasoning import Markers

R = TypeVar("R")


@dataclass(frozen=True)
class Step(Generic[R]):
    """One stored step: its file in RUN/eval/ and its result's JSON form both ways."""

    file: str
    dump: Callable[[R], object]
    load: Callable[[object], R]

    def stored(self, out_dir: Path, key: dict) -> R | None:
        """The result stored for `key`; None without a file or with one stored for another key."""
        path = out_dir / self.file
        if not path.is_file():
            return None
        data = artifacts.read_json(path)
        return self.load(data["result"]) if data.get("key") == _as_json(key) else None

    def store(self, out_dir: Path, key: dict, result: R) -> R:
        artifacts.write_json(out_dir / self.file, {"key": key, "result": self.dump(result)})
        return result

    def reuse_or_run(self, out_dir: Path, key: dict, run: Callable[[], R]) -> R:
        """The result stored for `key`, else `run()`'s, stored over whatever was there."""
        stored = self.stored(out_dir, key)
        return stored if stored is not None else self.store(out_dir, key, run())


def _dump_each(results: dict) -> dict:
    return {name: result.to_json() for name, result in results.items()}


SCORES: Step[dict[str, DatasetScores]] = Step(
    artifacts.EVAL_SCORES, _dump_each, lambda data: {k: DatasetScores.from_json(v) for k, v in data.items()})
LOSS: Step[dict[str, CeDataset]] = Step(
    artifacts.EVAL_LOSS, _dump_each, lambda data: {k: CeDataset.from_json(v, CeLoss.from_json) for k, v in data.items()})
COHERENCE: Step[dict[str, TaskCoherence]] = Step(
    artifacts.EVAL_COHERENCE, _dump_each,
    lambda data: {k: TaskCoherence.from_json(v, LmEvalResult.from_json) for k, v in data.items()})
MAGNITUDE: Step[MagnitudeStudy] = Step(artifacts.EVAL_MAGNITUDE, MagnitudeStudy.to_json, MagnitudeStudy.from_json)


def model_key(setup: CompletionSetup) -> dict:
    """The evaluated model: the completions setup (weights, hooks, direction, dtype, device, map, quantization,
    backend) less the reply settings, which decide only the completions."""
    return {"model": setup.model, "hooked": setup.hooked, "direction_sha256": setup.direction_sha256,
            **{name: value for name, value in setup.overrides if name != "stop"}}


def loss_key(setup: CompletionSetup, config: EvalConfig, interventions: Sequence[Intervention],
             on_distribution: Path) -> dict:
    """CE loss: the model, the CE settings, the interventions, and the on-distribution completions by content."""
    return {"model": model_key(setup), "ce": list(config.ce), "ce_n": config.ce_n, "seed": config.seed,
            "pile": _source(config.pile) if "pile" in config.ce else None,
            "alpaca": _source(config.alpaca) if "alpaca" in config.ce else None,
            "on_distribution": artifacts.file_sha256(on_distribution) if "on-distribution" in config.ce else None,
            "interventions": [iv.name for iv in interventions]}


def coherence_key(setup: CompletionSetup, config: EvalConfig, interventions: Sequence[str]) -> dict:
    """lm-eval coherence: the model, the tasks (a local task file by content too), the document limit, lm-eval's
    batch size (padding can move the last digits) and the interventions."""
    return {"model": model_key(setup), "tasks": [_task(task) for task in config.tasks],
            "coherence_limit": config.coherence_limit, "batch_size": config.batch_size,
            "interventions": list(interventions)}


def magnitude_key(setup: CompletionSetup, sets: dict[str, list[str]], refusal_ids: list[int]) -> dict:
    """The magnitude study: the model and direction, each prompt set by content, the refusal tokens."""
    return {"model": model_key(setup), "sets": {name: _sha256(instructions) for name, instructions in sets.items()},
            "refusal_ids": refusal_ids}


def scores_key(judged: Sequence[tuple[EvalSet, Intervention, CompletionFiles]], guard: dict | None,
               markers: Markers | None = None, opened: bool = False) -> dict:
    """The judge: every judged completions file by content, the guard (None: substring refusal only), and a
    reasoning model's markers and whether its prompt opens the block (absent for models without markers, whose
    keys stay as they were)."""
    key = {"completions": [{"set": s.name, "label": s.label, "intervention": iv.name,
                            "sha256": artifacts.file_sha256(files.jsonl)} for s, iv, files in judged],
           "guard": guard}
    if markers is not None:
        key["reasoning"] = {**markers.to_json(), "opened": opened}
    return key


def _source(spec: str) -> str | dict:
    """A data source as a key holds it: a name as given, a local file by its content."""
    path = Path(spec).expanduser()
    return {"sha256": artifacts.file_sha256(path)} if path.is_file() else spec


def _task(task: str) -> str | dict:
    path = Path(parse_task_spec(task).name).expanduser()
    return {"task": task, "sha256": artifacts.file_sha256(path)} if path.is_file() else task


def _sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()


def _as_json(data: dict) -> dict:
    """`data` as its JSON file holds it (tuples become lists), for comparison with a stored key."""
    return json.loads(json.dumps(data, ensure_ascii=False))
