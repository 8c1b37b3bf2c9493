"""Greedy completions per prompt set and intervention, saved in RUN/eval/completions/ and reused.

RUN/eval/completions/<set>.<intervention>.jsonl holds one {"prompt", "category", "completion"} a line;
<set>.<intervention>.json beside it records what produced them (`CompletionSetup` plus the intervention and
a hash of the prompts). A later evaluation whose record is equal reuses the completions instead of
generating them again; any difference (another model, direction, reply length, stop rule, dtype, device,
device map, quantization, backend, system prompt or template variables) regenerates.
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.chat import ChatOptions, run_options
from tlrefusal.data import Prompt, prompts_hash, read_text
from tlrefusal.evaluation.backends import Generator
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.sets import EvalSet, slug
from tlrefusal.interventions import Intervention
from tlrefusal.model import ModelSource
from tlrefusal.progress import Progress


@dataclass(frozen=True)
class Completion:
    prompt: str
    category: str | None
    completion: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Completion":
        return cls(prompt=data["prompt"], category=data["category"], completion=data["completion"])


@dataclass(frozen=True)
class CompletionSetup:
    """Everything besides the prompts and the intervention that decides what greedy decoding produces.

    `overrides` holds only what differs from the run's own setup and the defaults (a candidate direction
    picked by layer and position, another dtype or device, a device map, a quantization, stopping at EOS
    only, the vLLM backend and its tensor parallelism, a system prompt or template variables other than the
    run's), so completions recorded without any override stay
    reusable.
    """

    model: str  # the folder or file the weights were loaded from
    hooked: bool
    direction_sha256: str
    max_new_tokens: int
    overrides: tuple[tuple[str, object], ...] = ()

    def record(self, intervention: str, prompts: list[Prompt]) -> dict:
        """The JSON written beside the completions and compared on reuse."""
        return {"model": self.model, "hooked": self.hooked, "direction_sha256": self.direction_sha256,
                "max_new_tokens": self.max_new_tokens, **dict(self.overrides), "intervention": intervention,
                "prompts_sha256": prompts_hash(prompts)}


def eval_chat_options(run_dir: Path, config: EvalConfig) -> ChatOptions:
    """The system prompt and template variables the evaluation renders prompts with: the run's, each replaced
    where `config` gives one (what `ChatFormat.for_run(run_dir, tokenizer, config.system_prompt,
    config.chat_template_kwargs)` renders)."""
    return run_options(run_dir).override(config.system_prompt, config.chat_template_kwargs)


def completion_setup(run_dir: Path, run_config: dict, config: EvalConfig, source: ModelSource,
                     direction: artifacts.RefusalDirection) -> CompletionSetup:
    """The setup of this evaluation. The chosen direction is identified by its file's hash, as it always
    was; a candidate by the hash of its vector, with its layer and position."""
    overrides: dict[str, object] = {}
    if config.picks_candidate:
        vector = direction.vector.double().contiguous().numpy().tobytes()
        digest = hashlib.sha256(vector).hexdigest()
        overrides["candidate"] = {"layer": direction.layer, "position": direction.position}
    else:
        digest = artifacts.file_sha256(run_dir / artifacts.DIRECTION)
    for name in ("dtype", "device"):
        if getattr(config, name) is not None and getattr(config, name) != run_config[name]:
            overrides[name] = getattr(config, name)
    for name in ("device_map", "quantize"):  # how the weights are placed or rounded changes what is computed
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    if config.stop != "turn":
        overrides["stop"] = config.stop
    if config.backend != "bridge":  # other kernels, other batching: greedy replies may differ
        overrides["backend"] = config.backend
        overrides["tensor_parallel"] = config.tensor_parallel
    chat = eval_chat_options(run_dir, config)
    if chat != run_options(run_dir):  # another system prompt or template variables: other prompts
        overrides["chat"] = chat.to_json()
    return CompletionSetup(model=source.to_json()["loaded_from"], hooked=config.model is None,
                           direction_sha256=digest, max_new_tokens=config.max_new_tokens,
                           overrides=tuple(overrides.items()))


def completions(out_dir: Path, eval_set: EvalSet, intervention: Intervention, setup: CompletionSetup,
                generator: Generator, progress: Progress) -> list[Completion]:
    """Greedy completions of `eval_set` under `intervention` by `generator`, reused from `out_dir` when the same
    setup wrote them."""
    stem = f"{eval_set.name}.{slug(intervention.name.replace('+', 'plus ').replace('-', 'minus '))}"
    folder = out_dir / artifacts.COMPLETIONS_DIR
    jsonl, record_path = folder / f"{stem}.jsonl", folder / f"{stem}.json"
    record = setup.record(intervention.name, eval_set.prompts)
    if jsonl.is_file() and record_path.is_file() and artifacts.read_json(record_path) == record:
        return [Completion.from_json(json.loads(line)) for line in read_text(jsonl).splitlines()]
    with progress.task(f"Completions: {eval_set.name}, {intervention.name}", total=len(eval_set.prompts)) as advance:
        replies = generator.replies(eval_set.instructions, intervention, advance)
    rows = [Completion(p.instruction, p.category, reply) for p, reply in zip(eval_set.prompts, replies, strict=True)]
    artifacts.write_text(jsonl, "".join(json.dumps(row.to_json(), ensure_ascii=False) + "\n" for row in rows))
    artifacts.write_json(record_path, record)
    return rows
