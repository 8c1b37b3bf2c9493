"""Load a chat model into a TransformerLens `TransformerBridge`, with raw Hugging Face weights.

No weight processing (no LayerNorm folding, no centering): directions live in the coordinates that the
orthogonalized export writes. Sources: a built-in model's name (`tlrefusal.assets`), a local Hugging
Face folder, a GGUF file, or a hub id (downloaded into the Hugging Face cache as safetensors; pickled
`.bin` weights are never fetched).
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tlrefusal import artifacts
from tlrefusal.assets import model_asset
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.placement import Placement, check_realized_map
from tlrefusal.precision import DTYPE_CHOICES, DTYPE_NAMES
from tlrefusal.progress import NO_PROGRESS, Progress

SourceKind = Literal["builtin", "local", "gguf", "hub"]
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
DEVICE_HELP = "auto (cuda if there is one, else cpu), cpu, cuda or cuda:N"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What a hub download fetches: config, tokenizer, chat template and safetensors weights, never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """What the user asked for (`spec`) and the local file or folder the weights are read from."""

    spec: str
    kind: SourceKind
    path: Path
    gguf_file: str | None = None

    def to_json(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "loaded_from": str(self.path.resolve()),
                "gguf_file": self.gguf_file}

    @classmethod
    def from_json(cls, data: dict) -> "ModelSource":
        return cls(data["spec"], data["kind"], Path(data["loaded_from"]), data.get("gguf_file"))


@dataclass
class LoadedModel:
    bridge: "object"  # transformer_lens.model_bridge.TransformerBridge; kept loose to keep imports lazy
    tokenizer: "object"  # transformers.PreTrainedTokenizerBase
    source: ModelSource
    model_type: str
    dtype: torch.dtype
    placement: Placement = field(default_factory=Placement)

    @property
    def n_layers(self) -> int:
        return self.bridge.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.bridge.cfg.d_model

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (with a device map, modules may sit elsewhere)."""
        return torch.device(self.bridge.cfg.device)


def resolve_source(spec: str, cache_dir: Path | None = None, progress: Progress = NO_PROGRESS) -> ModelSource:
    """Turn what the user typed into a local file or folder, fetching a built-in model or a hub id first."""
    if (asset := model_asset(spec)) is not None:
        return ModelSource(spec, "builtin", asset.fetch(cache_dir, progress))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / artifacts.HF_CONFIG).is_file():
            raise TlrefusalError(f"{path} is not a Hugging Face model folder (it has no config.json)")
        return ModelSource(spec, "local", path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TlrefusalError(f"{path} is a file but not a .gguf model; pass a model folder, a .gguf file "
                                 "or a hub id")
        return ModelSource(spec, "gguf", path.parent, gguf_file=path.name)
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise TlrefusalError(f"no model folder or file at {spec}")
    return ModelSource(spec, "hub", _download_from_hub(spec))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # huggingface_hub draws its own download bars: a multi-GB download must not look frozen
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors come in many types (offline, gated, missing); all are fatal here
        reason = first_line(exc)
        raise TlrefusalError(f"could not get '{repo_id}' from the Hugging Face hub or its cache ({reason}); "
                             "pass a local model folder or a .gguf file instead") from exc
    if not any(folder.glob("*.safetensors")):
        raise TlrefusalError(f"'{repo_id}' has no safetensors weights; tlrefusal does not load pickled weights")
    return folder


def load_model(
    source: ModelSource,
    placement: Placement | None = None,
    trust_remote_code: bool = False,
    progress: Progress = NO_PROGRESS,
) -> LoadedModel:
    """Load tokenizer and weights with `transformers`, then wrap them in a TransformerBridge.

    One device: the model is loaded, then moved there. A device map: accelerate places it while loading
    (`Placement.load_kwargs`) and the bridge takes it as it is; its device (where inputs go) is the
    embedding's, which the bridge reads from the dispatched model.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement or Placement()
    torch_dtype = DTYPES[resolve_dtype(source, placement.dtype)]
    device = None if placement.dispatched else resolve_device(placement.device)
    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    load_kwargs = placement.load_kwargs()  # a missing bitsandbytes fails here, before anything loads
    if placement.quantize is not None and device is not None:
        load_kwargs["device_map"] = {"": device}  # bitsandbytes places quantized weights while loading
    with progress.task(f"Loading {source.spec}", total=None):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **extra)
            # Eager attention: the bridge computes attention itself on the hooked path (its own eager
            # implementation, which its hook_pattern / hook_attn_scores need) and forces eager on the model it
            # wraps, so sdpa here would not speed up a hooked pass; loading eager keeps the unhooked and hooked
            # forwards the same function (benchmarks/README.md, attention).
            hf_model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=torch_dtype, attn_implementation="eager",
                trust_remote_code=trust_remote_code, **extra, **load_kwargs,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise TlrefusalError(f"could not load the model at {source.path}: {first_line(exc)}") from exc
        # A tokenizer without a chat template loads: `--chat-template` gives a run one (Qwen-1 chat has none),
        # and `ChatFormat` refuses a model that has neither, naming the option.
        prepare_tokenizer(tokenizer)
        hf_model.eval()
        if "device_map" not in load_kwargs:  # never .to() a dispatched model (accelerate #1613)
            hf_model.to(device)
        check_realized_map(getattr(hf_model, "hf_device_map", None))
        try:
            bridge = TransformerBridge.boot_transformers(
                str(source.path), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch_dtype,
            )
        except (ValueError, NotImplementedError) as exc:
            raise TlrefusalError(f"TransformerLens cannot wrap {source.spec} "
                                 f"({hf_model.config.model_type}): {first_line(exc)}") from exc
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, source=source,
                       model_type=hf_model.config.model_type, dtype=torch_dtype, placement=placement)


def check_dtype(dtype: str) -> None:
    """Refuse a dtype name tlrefusal does not load in (before anything is loaded or written)."""
    if dtype not in DTYPE_CHOICES:
        raise TlrefusalError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPE_CHOICES)})")


def resolve_dtype(source: ModelSource, dtype: str) -> str:
    """The dtype name to load in: `dtype` itself, or for "auto" the one the checkpoint's config.json names."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype
    config = source.path / artifacts.HF_CONFIG
    if source.gguf_file or not config.is_file():
        return "float32"  # a GGUF file is dequantized to float32
    data = artifacts.read_json(config)
    named = data.get("dtype") or data.get("torch_dtype") or (data.get("text_config") or {}).get("torch_dtype")
    return named if named in DTYPES else "float32"


def resolve_device(device: str) -> str:
    """"auto" -> cuda if torch sees a GPU, else cpu; anything else is checked by torch, and a GPU must be one
    torch sees (a one-line error before anything loads, not a CUDA error after)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise TlrefusalError(f"unknown device '{device}' ({DEVICE_HELP})") from exc
    if where.type == "cuda" and (where.index or 0) >= gpu_count():
        raise TlrefusalError(f"--device {device}: torch sees {gpu_count()} GPU(s); use --device cpu (or auto)")
    return device


def release_memory() -> None:
    """Give a freed model's memory back before the next one loads: collect reference cycles (a model's modules
    hold some) and hand cached CUDA blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (the candidate positions are the last n tokens of every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # the original code pads Llama-2/3 with EOS; the pad id never reaches a real position anyway.
        tokenizer.pad_token = tokenizer.eos_token
