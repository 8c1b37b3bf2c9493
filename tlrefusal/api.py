"""Conveniences of the Python API (`import tlrefusal as tl`) that take plain values where the library's
functions take resolved objects: a model by name, prompts without a chat format."""
from collections.abc import Sequence
from pathlib import Path

from tlrefusal.chat import ChatFormat
from tlrefusal.interventions import BASELINE, Intervention
from tlrefusal.model import LoadedModel, resolve_source
from tlrefusal.model import load_model as _load
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.refusal import RefusalRate
from tlrefusal.refusal import refusal_rate as _refusal_rate


def load_model(model: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
               cache_dir: Path | None = None, progress: Progress = NO_PROGRESS, *, device_map: str | None = None,
               max_memory: str | None = None, offload_folder: str | None = None, quantize: str | None = None
               ) -> LoadedModel:
    """A chat model by built-in name (organism, smollm2), local folder, .gguf file or hub id; the keywords
    are the CLI's placement flags (`tlrefusal.placement.Placement`)."""
    placement = Placement(dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder, quantize=quantize)  # checked before any download
    return _load(resolve_source(model, cache_dir, progress), placement, trust_remote_code, progress)


def refusal_rate(model: LoadedModel, prompts: Sequence[str], intervention: Intervention = BASELINE,
                 max_new_tokens: int = 32, batch_size: int = 32, chat: ChatFormat | None = None) -> RefusalRate:
    """Greedy replies to `prompts` under `intervention`, judged for refusal; `chat`: the format (default: the
    model's own chat template; `ChatFormat.for_run(RUN, model.tokenizer)` for a run's)."""
    chat = chat or ChatFormat.from_tokenizer(model.tokenizer)
    return _refusal_rate(model, chat, prompts, intervention, max_new_tokens, batch_size=batch_size)
