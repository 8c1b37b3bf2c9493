"""`EvalConfig`: what `tlrefusal eval` evaluates and how, with fast defaults, and the `paper` preset.

The defaults run on a CPU in minutes. `EvalConfig.resolve(paper=True, ...)` (`tlrefusal eval --paper`) sets
what the original code did (`paper_settings`); settings given explicitly override the preset. The resolved
config, with `paper`, is recorded in RUN/eval/report.json.
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tlrefusal.chat import TemplateKwargs, format_template_kwargs, parse_template_kwargs
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.coherence import DEFAULT_TASKS
from tlrefusal.model import check_dtype, resolve_device
from tlrefusal.placement import Placement

CE_DATASETS = ("pile", "alpaca", "on-distribution")
# How the evaluation sets are drawn (`tlrefusal.evaluation.sets`):
# "held-out": n prompts of each pool, seeded, leaving out every prompt the run sampled;
# "paper": harmful sets whole, in order; harmless sets drawn from the run's own seeded sampling stream,
#          continued after its four train/val draws (the original's harmless_test sample).
EVAL_SETS = ("held-out", "paper")
# Where a reply stops (`tlrefusal.generation`): "turn": EOS or the template's end-of-turn token;
# "eos": the tokenizer's EOS only (the original code: Llama-3 replies run on past <|eot_id|>).
STOPS = ("turn", "eos")
# What generates the completions (`tlrefusal.evaluation.backends`): "bridge", the TransformerBridge, with or
# without hooks; "vllm", a vLLM engine over a checkpoint evaluated as it is (`model`), no hooks.
BACKENDS = ("bridge", "vllm")
HOOKED_VLLM_ERROR = ("--backend vllm cannot project out a direction (vLLM runs no hooks): it evaluates a checkpoint "
                     "as it is; give --model CHECKPOINT (e.g. from `tlrefusal orthogonalize`), or use --backend "
                     "bridge for the hooked interventions")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    # Empty: the run's own harmful / harmless pools, minus every prompt the run sampled (held out).
    harmful: tuple[str, ...] = ()
    harmless: tuple[str, ...] = ()
    n: int = 100  # prompts per dataset (the paper: JailbreakBench's 100 and 100 Alpaca test prompts)
    max_new_tokens: int = 512  # the paper's, after HarmBench
    batch_size: int = 16
    actadd_sign: str = "paper"  # "paper": -r on harmful, +r on harmless; "plus": +r on both (NNsight replication)
    model: str | None = None  # evaluate this model without hooks instead of the run's model with hooks
    guard_model: Path | None = None  # a local Llama Guard 2 folder; None: safety score unavailable
    ce: tuple[str, ...] = CE_DATASETS
    ce_n: int = 64  # sequences per CE dataset (the paper: 4,096; see the README for the cost here)
    pile: str = "pile"  # a text file / .jsonl with a "text" field, or "pile" (monology/pile-uncopyrighted)
    alpaca: str = "alpaca"  # a .json/.jsonl with instruction + output, or "alpaca" (tatsu-lab/alpaca)
    magnitude: tuple[str, ...] = ()  # extra prompt sets for the magnitude study (e.g. xstest)
    tasks: tuple[str, ...] = DEFAULT_TASKS  # lm-eval task names or local task YAML files; () for none
    coherence_limit: int | None = 100  # documents per lm-eval (sub)task; None: all (the paper)
    seed: int = 42
    eval_sets: str = "held-out"  # see EVAL_SETS; the paper: "paper"
    stop: str = "turn"  # see STOPS; the paper: "eos"
    paper: bool = False  # the `paper_settings` preset was applied (recorded in the report)
    # Any candidate the run scored instead of its chosen direction (both or neither).
    layer: int | None = None
    position: int | None = None
    # None: the run's own. Under --backend vllm they apply to what runs on transformers (CE loss, the guard).
    device: str | None = None
    dtype: str | None = None
    # Several devices and quantized loading of the evaluated model (`tlrefusal.placement.Placement`); None:
    # one device, full precision (never the run's: each is given for this evaluation).
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    quantize: str | None = None
    # The Llama Guard model's device and dtype; None: the evaluated model's (its input device with a map).
    guard_device: str | None = None
    guard_dtype: str | None = None
    backend: str = "bridge"  # see BACKENDS
    tensor_parallel: int = 1  # GPUs per vLLM engine (--backend vllm)
    # The prompts' system message and template variables (`tlrefusal.chat.ChatOptions`); None: the run's (its
    # manifest). system_prompt: "default" (none passed), "none" (an empty one) or the text.
    system_prompt: str | None = None
    chat_template_kwargs: TemplateKwargs | None = None

    def __post_init__(self) -> None:
        if self.chat_template_kwargs is not None:  # canonical pairs, also from a report's spelling
            object.__setattr__(self, "chat_template_kwargs", parse_template_kwargs(self.chat_template_kwargs))
        if self.coherence_limit is not None and self.coherence_limit < 1:
            raise TlrefusalError(f"coherence_limit must be at least 1 (or None for all), got {self.coherence_limit}")
        for name in ("n", "max_new_tokens", "batch_size", "ce_n"):
            if getattr(self, name) < 1:
                raise TlrefusalError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, choices in (("eval_sets", EVAL_SETS), ("stop", STOPS)):
            if getattr(self, name) not in choices:
                raise TlrefusalError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.actadd_sign not in ("paper", "plus"):
            raise TlrefusalError(f"actadd_sign must be 'paper' or 'plus', got {self.actadd_sign!r}")
        unknown = set(self.ce) - set(CE_DATASETS)
        if unknown:
            raise TlrefusalError(f"unknown CE dataset {sorted(unknown)[0]!r} (choose from {', '.join(CE_DATASETS)})")
        if (self.layer is None) != (self.position is None):
            raise TlrefusalError("layer and position go together: give both to pick a candidate, or neither")
        for name in ("dtype", "guard_dtype"):
            if getattr(self, name) is not None:
                check_dtype(getattr(self, name))
        self.placement({"device": "cpu", "dtype": "float32"})  # a bad map, budget or quantization fails now
        if self.guard_device is not None:
            resolve_device(self.guard_device)  # the guard loads last: a typo must not wait for it
        if self.backend not in BACKENDS:
            raise TlrefusalError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.tensor_parallel < 1:
            raise TlrefusalError(f"tensor_parallel must be at least 1, got {self.tensor_parallel}")
        if self.backend == "vllm":
            if self.model is None:
                raise TlrefusalError(HOOKED_VLLM_ERROR)
            if self.quantize is not None:
                raise TlrefusalError("--quantize loads through bitsandbytes on the bridge; vLLM serves the "
                                     "checkpoint as saved: drop --quantize or use --backend bridge")
        elif self.tensor_parallel != 1:
            raise TlrefusalError("--tensor-parallel splits a vLLM engine: it needs --backend vllm")

    @classmethod
    def resolve(cls, paper: bool = False, **given) -> "EvalConfig":
        """The config from the settings given explicitly, over the paper's preset if `paper`, over the defaults."""
        return cls(**{**(paper_settings() if paper else {}), **given})

    @property
    def picks_candidate(self) -> bool:
        return self.layer is not None

    def placement(self, run_config: dict) -> Placement:
        """Where the evaluated model loads: this config's device and dtype, else the run's; its map, budget,
        offload folder and quantization."""
        return Placement(device=self.device or run_config["device"], dtype=self.dtype or run_config["dtype"],
                         device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder,
                         quantize=self.quantize)

    def to_json(self) -> dict:
        data = asdict(self)
        data["guard_model"] = str(self.guard_model) if self.guard_model else None
        if self.chat_template_kwargs is not None:  # spelled as the flag takes it, as in a run's config.json
            data["chat_template_kwargs"] = format_template_kwargs(self.chat_template_kwargs) or "none"
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EvalConfig":
        """The config a report recorded (fields a report predates take their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        if values.get("guard_model") is not None:
            values["guard_model"] = Path(values["guard_model"])
        return cls(**values)


def paper_settings() -> dict:
    """What the original code evaluates (SPEC 1.8-1.11): JailbreakBench whole and 100 harmless test prompts
    from the seed-42 stream, replies stopped at EOS only, 512 new tokens, -r on harmful prompts, CE over
    2,048 batches of 2 sequences per dataset, and the paper's benchmark settings on every document."""
    from tlrefusal.evaluation.coherence import PAPER_TASKS

    return {"paper": True, "harmful": ("jailbreakbench",), "eval_sets": "paper", "stop": "eos", "n": 100,
            "max_new_tokens": 512, "actadd_sign": "paper", "ce_n": 4096, "tasks": PAPER_TASKS,
            "coherence_limit": None}
