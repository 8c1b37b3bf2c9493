"""Load a chat model into a TransformerLens `TransformerBridge`, with raw Hugging Face weights.

No weight processing (no LayerNorm folding, no centering): directions live in the coordinates that the
orthogonalized export writes (SPEC tlrefusal notes). Sources: the demo model, a local Hugging Face
folder, a GGUF file, or a hub id (downloaded into the Hugging Face cache as safetensors; pickled
`.bin` weights are never fetched).
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.progress import NO_PROGRESS, Progress

SourceKind = Literal["demo", "local", "gguf", "hub"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


@dataclass
class LoadedModel:
    bridge: "object"  # transformer_lens.model_bridge.TransformerBridge; kept loose to keep imports lazy
    tokenizer: "object"  # transformers.PreTrainedTokenizerBase
    source: ModelSource
    model_type: str
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return self.bridge.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.bridge.cfg.d_model

    @property
    def device(self) -> torch.device:
        return next(self.bridge.original_model.parameters()).device


def resolve_source(spec: str | None, cache_dir: Path | None = None, progress: Progress = NO_PROGRESS
                   ) -> ModelSource:
    """Turn what the user typed into a local file or folder, fetching the demo model or a hub id first."""
    if spec is None or spec == "demo":
        from tlrefusal.demo import ensure_demo_model

        return ModelSource("demo", "demo", ensure_demo_model(cache_dir, progress))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TlrefusalError(f"{path} is not a Hugging Face model folder (it has no config.json)")
        return ModelSource(spec, "local", path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TlrefusalError(f"{path} is a file but not a .gguf model; pass a model folder, a .gguf file "
                                 "or a hub id")
        return ModelSource(spec, "gguf", path.parent, gguf_file=path.name)
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise TlrefusalError(f"no model folder or file at {spec}")
    return ModelSource(spec, "hub", _download_from_hub(spec, progress))


def _download_from_hub(repo_id: str, progress: Progress) -> Path:
    from huggingface_hub import snapshot_download

    try:
        with progress.task(f"Fetching {repo_id} from the Hugging Face hub", total=None):
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
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: Progress = NO_PROGRESS,
) -> LoadedModel:
    """Load tokenizer and weights with `transformers`, then wrap them in a TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise TlrefusalError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    torch_dtype = DTYPES[dtype]
    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with progress.task(f"Loading {source.spec}", total=None):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **extra)
            hf_model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=torch_dtype, attn_implementation="eager",
                trust_remote_code=trust_remote_code, **extra,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise TlrefusalError(f"could not load the model at {source.path}: {first_line(exc)}") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise TlrefusalError(f"{source.spec} has no chat template; tlrefusal needs a chat model")
        prepare_tokenizer(tokenizer)
        hf_model.eval().to(device)
        try:
            bridge = TransformerBridge.boot_transformers(
                str(source.path), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch_dtype,
            )
        except (ValueError, NotImplementedError) as exc:
            raise TlrefusalError(f"TransformerLens cannot wrap {source.spec} "
                                 f"({hf_model.config.model_type}): {first_line(exc)}") from exc
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, source=source,
                       model_type=hf_model.config.model_type, dtype=torch_dtype)


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (the candidate positions are the last n tokens of every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # ORIG pads Llama-2/3 with EOS (SPEC 2); the pad id never reaches a real position anyway.
        tokenizer.pad_token = tokenizer.eos_token
