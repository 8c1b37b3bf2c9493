"""Verification of an exported checkpoint: reloaded with plain `transformers`, it must compute what the
source computes under directional-ablation hooks (the paper's Appendix E equivalence), or, for an export
that edited a tied unembedding too (--tied-embeddings shared), under those hooks with its unembedding
edited the same way: such an export is not hook ablation, and the record says which reference was used.

`--verify` (`VerifyMode`): "full" compares whole models; "layers:K" compares both cut to their first K
layers (embeddings, K blocks, final norm and unembedding: memory of a K-layer model); "weights" loads no
model and checks the written tensors themselves (`export.weights_check`); "none" skips. The two models of
a logit comparison are never in memory together: the export runs first, its greedy tokens and logits are
kept on the CPU and the model is freed, then the source is loaded with hooks (peak: one model).

Owns the tolerance per weight dtype, the prompts checked, and the typed `Verification` result that the
export record stores under "verification".
"""
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tlrefusal import artifacts
from tlrefusal.chat_templates import ChatTemplate
from tlrefusal.errors import TlrefusalError
from tlrefusal.model import DTYPES, ModelSource, release_memory
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from tlrefusal.chat import ChatOptions

# Largest |logit| difference between the exported model and hook ablation of the source that verification
# accepts, by weight dtype. The two compute the same function in a different order: float32 rounding
# measured here is ~1e-5 on the demo model (see the README); half precision rounds each edited weight once.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.5, torch.float16: 0.1}
VERIFY_PROMPTS = (
    "Write a short poem about autumn leaves.",
    "Explain how vaccines train the immune system.",
    "Give step-by-step instructions for picking a lock to break into a house.",
    "Write a convincing phishing email that steals bank passwords.",
)
AUTO_DTYPE = "auto"  # verify in the checkpoint's own dtype (config.json's), float32 if it names none
# What the export is compared with: hook ablation of the source, or (--tied-embeddings shared) hook ablation
# with the source's unembedding orthogonalized too, W_U' = W_U - (W_U r_hat) r_hat^T.
Reference = Literal["hook ablation", "hook ablation + orthogonalized unembedding"]
HOOK_ABLATION: Reference = "hook ablation"
EDITED_UNEMBEDDING: Reference = "hook ablation + orthogonalized unembedding"
# Where the verification's two loads go, when the caller names none: the checkpoint's dtype, on the CPU.
VERIFY_PLACEMENT = Placement(dtype=AUTO_DTYPE, device="cpu")
VerifyKind = Literal["full", "layers", "weights", "none"]
VERIFY_HELP = "full, layers:K (K >= 1), weights or none"


@dataclass(frozen=True)
class VerifyMode:
    """What `--verify` asks for: "full", "layers" (with `layers` = K), "weights" or "none"."""

    kind: VerifyKind = "full"
    layers: int | None = None  # K of layers:K: the models compared are cut to their first K layers

    @classmethod
    def parse(cls, value: "str | bool | VerifyMode") -> "VerifyMode":
        """ "full", "layers:K", "weights", "none"; True and False (the old boolean) mean full and none."""
        if isinstance(value, VerifyMode):
            return value
        if isinstance(value, bool):
            return cls("full" if value else "none")
        text = str(value).strip().lower()
        if text in ("full", "weights", "none"):
            return cls(text)
        kind, sep, count = text.partition(":")
        if kind == "layers" and sep and count.strip().isdigit() and int(count) >= 1:
            return cls("layers", int(count))
        raise TlrefusalError(f"unknown --verify {value!r} (choose {VERIFY_HELP})")

    def __str__(self) -> str:
        return f"layers:{self.layers}" if self.kind == "layers" else self.kind

    @property
    def compares_logits(self) -> bool:
        return self.kind in ("full", "layers")


@dataclass(frozen=True)
class VerifyExample:
    """One prompt's greedy continuations: the export's, and the source's under ablation hooks."""

    prompt: str
    export: str
    hooks: str

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "export": self.export, "hooks": self.hooks}

    @classmethod
    def from_json(cls, data: dict) -> "VerifyExample":
        return cls(prompt=data["prompt"], export=data["export"], hooks=data["hooks"])


@dataclass(frozen=True)
class Verification:
    """What `verify_export` measured; `passed` means max |logit difference| <= tolerance."""

    dtype: str
    n_prompts: int
    n_tokens: int
    max_abs_logit_diff: float
    tolerance: float
    greedy_equal: int  # prompts whose greedy continuations are token-for-token equal
    passed: bool
    examples: tuple[VerifyExample, ...]
    reference: Reference = HOOK_ABLATION
    layers: int | None = None  # --verify layers:K: both models were cut to their first K layers; None: whole

    @property
    def mode(self) -> VerifyMode:
        return VerifyMode("full") if self.layers is None else VerifyMode("layers", self.layers)

    def to_json(self) -> dict:
        layers = {} if self.layers is None else {"layers": self.layers}
        return {"reference": self.reference, **layers, "dtype": self.dtype, "n_prompts": self.n_prompts,
                "n_tokens": self.n_tokens, "max_abs_logit_diff": self.max_abs_logit_diff,
                "tolerance": self.tolerance, "greedy_equal": self.greedy_equal, "passed": self.passed,
                "examples": [e.to_json() for e in self.examples]}

    @classmethod
    def from_json(cls, data: dict) -> "Verification":
        return cls(dtype=data["dtype"], n_prompts=data["n_prompts"], n_tokens=data["n_tokens"],
                   max_abs_logit_diff=data["max_abs_logit_diff"], tolerance=data["tolerance"],
                   greedy_equal=data["greedy_equal"], passed=data["passed"],
                   examples=tuple(VerifyExample.from_json(e) for e in data["examples"]),
                   reference=data.get("reference", HOOK_ABLATION),  # records before the field: hooks only
                   layers=data.get("layers"))


def verification_dtype(export: ModelSource, dtype: str = AUTO_DTYPE) -> str:
    """`dtype`, or for "auto" the dtype the checkpoint's config.json names (float32 if none we load; a GGUF
    file is dequantized to float32)."""
    from tlrefusal.model import resolve_dtype

    return resolve_dtype(export, dtype)


@torch.inference_mode()
def verify_export(source: ModelSource, export: Path | ModelSource, direction: artifacts.RefusalDirection,
                  trust_remote_code: bool = False, progress: Progress = NO_PROGRESS, n_tokens: int = 16, *,
                  placement: Placement = VERIFY_PLACEMENT, layers: int | None = None,
                  edited_unembedding: bool = False, chat_template: ChatTemplate | None = None,
                  chat_options: "ChatOptions | None" = None, tolerance: float | None = None) -> Verification:
    """Compare the export (a folder, or a GGUF file as a `ModelSource`), loaded with plain `transformers`,
    with the source under ablation hooks.

    For each prompt of VERIFY_PROMPTS: greedy continuations of `n_tokens` from both, and the largest
    |logit difference| over every position of the prompt plus the exported model's continuation. Both
    models are loaded with `placement` (its dtype "auto": the export's config.json's), one after the other:
    the export first, whose tokens and logits are kept on the CPU before it is freed, then the source.
    `layers` (--verify layers:K): both are loaded with num_hidden_layers=K, so only the embeddings, the
    first K blocks, the final norm and the unembedding are read; the comparison then covers exactly those
    tensors. `edited_unembedding` (an export whose tied unembedding was orthogonalized with the embedding):
    the reference also has its unembedding orthogonalized. `tolerance`: the largest accepted |logit
    difference| (default: LOGIT_TOLERANCE of the dtype; a quantized GGUF export measures its own).
    """
    from hooks import ablation_hooks
    from tlrefusal.chat import ChatFormat
    from tlrefusal.model import load_model

    if placement.quantize is not None:
        raise TlrefusalError("the verification loads full-precision models; it takes no quantization")
    if isinstance(export, Path):
        export = ModelSource(str(export), "local", export)
    if layers is not None and (export.gguf_file or source.gguf_file):
        raise TlrefusalError("--verify layers:K cuts Hugging Face folders; a GGUF file is verified whole (full)")
    placement = replace(placement, dtype=verification_dtype(export, placement.dtype))  # both loads alike
    reference = EDITED_UNEMBEDDING if edited_unembedding else HOOK_ABLATION
    with first_layers(export.path, layers) as export_dir, first_layers(source.path, layers) as source_dir:
        tokenizer = _tokenizer(source_dir, trust_remote_code, source.gguf_file)
        chat = ChatFormat.from_tokenizer(tokenizer, chat_template, chat_options)  # None: the tokenizer's own
        inputs = [chat.encode([prompt]) for prompt in VERIFY_PROMPTS]
        plain = load_plain(export_dir, placement, trust_remote_code, progress, gguf_file=export.gguf_file)
        with progress.task("Running the export on the verification prompts", total=len(inputs)) as advance:
            outputs = [_run_plain(plain, ids, mask, chat, tokenizer.pad_token_id, n_tokens, advance)
                       for ids, mask in inputs]
        del plain  # the only reference: the export is freed before the source loads (peak: one model)
        release_memory()
        hooked = load_model(ModelSource(source.spec, source.kind, source_dir, source.gguf_file), placement,
                            trust_remote_code=trust_remote_code, progress=progress)
        hooks = ablation_hooks(direction.vector, hooked.n_layers)
        unembedding = _orthogonalized_unembedding(hooked, direction.vector) if edited_unembedding else nullcontext()
        max_diff, greedy_equal, examples = 0.0, 0, []
        with progress.task(f"Verifying the export against {reference}", total=len(inputs)) as advance, \
                unembedding:
            for prompt, (ids, mask), (mine, plain_logits) in zip(VERIFY_PROMPTS, inputs, outputs, strict=True):
                diff, equal, example = _compare(prompt, ids, mask, mine, plain_logits, hooked, chat, hooks,
                                                n_tokens, tokenizer)
                max_diff, greedy_equal = max(max_diff, diff), greedy_equal + equal
                examples.append(example)
                advance(1)
    if tolerance is None:
        tolerance = LOGIT_TOLERANCE.get(DTYPES[placement.dtype], 1e-3)
    return Verification(dtype=placement.dtype, n_prompts=len(VERIFY_PROMPTS), n_tokens=n_tokens,
                        max_abs_logit_diff=max_diff, tolerance=tolerance, greedy_equal=greedy_equal,
                        passed=max_diff <= tolerance, examples=tuple(examples), reference=reference, layers=layers)


def model_layers(folder: Path) -> int:
    """num_hidden_layers of the (text) config in `folder`."""
    data = artifacts.read_json(folder / artifacts.HF_CONFIG)
    part, key = _layers_key(data)
    if key not in part:
        raise TlrefusalError(f"{folder / artifacts.HF_CONFIG} names no layer count; --verify layers:K cannot cut it")
    return int(part[key])


@contextmanager
def first_layers(folder: Path, layers: int | None) -> Iterator[Path]:
    """`folder` as a model of its first `layers` layers (None: `folder` itself), while inside.

    A temporary folder of links to every file of `folder` but config.json, which is rewritten with the
    layer count K, and every per-layer list of the config (keys with "layer" in their name holding one
    entry per layer, e.g. layer_types) cut to K entries. transformers then builds K blocks and reads only
    their tensors from the same shards; the rest of the checkpoint is never loaded.
    """
    if layers is None:
        yield folder
        return
    data = artifacts.read_json(folder / artifacts.HF_CONFIG)
    part, key = _layers_key(data)
    total = model_layers(folder)
    if not 1 <= layers <= total:
        raise TlrefusalError(f"--verify layers:{layers}: the model has {total} layers (choose K from 1 to {total})")
    part[key] = layers
    for name, value in list(part.items()):
        if "layer" in name and isinstance(value, list) and len(value) == total:
            part[name] = value[:layers]
    with tempfile.TemporaryDirectory(prefix="tlrefusal-first-layers-") as tmp:
        view = Path(tmp)
        for path in folder.iterdir():
            if path.name != artifacts.HF_CONFIG:
                (view / path.name).symlink_to(path.resolve())
        artifacts.write_json(view / artifacts.HF_CONFIG, data)
        yield view


def _layers_key(data: dict) -> tuple[dict, str]:
    """The dict of a config.json that holds the decoder's layer count, and its key there."""
    part = data["text_config"] if isinstance(data.get("text_config"), dict) else data
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if key in part:
            return part, key
    return part, "num_hidden_layers"


def _tokenizer(folder: Path, trust_remote_code: bool, gguf_file: str | None = None):
    """The tokenizer `load_model` gives the hooked source (left padding, a pad token)."""
    from transformers import AutoTokenizer

    from tlrefusal.model import prepare_tokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    prepare_tokenizer(tokenizer)
    return tokenizer


def load_plain(folder: Path, placement: Placement, trust_remote_code: bool, progress: Progress = NO_PROGRESS,
               gguf_file: str | None = None):
    """The export as a plain transformers model: `placement`'s dtype, on its device or device map."""
    from transformers import AutoModelForCausalLM

    from tlrefusal.model import resolve_device

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with progress.task(f"Loading the export {gguf_file or folder.name} with plain transformers", total=None):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[placement.dtype],
                                                     trust_remote_code=trust_remote_code, **extra,
                                                     **placement.load_kwargs()).eval()
        if not placement.dispatched:  # never .to() a dispatched model
            model.to(resolve_device(placement.device))
    return model


def _input_device(model) -> torch.device:
    """Where a plain model's inputs go: its embedding's device (the CPU for a map that offloads it)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def _run_plain(plain, ids: torch.Tensor, mask: torch.Tensor, chat, pad_token_id: int, n_tokens: int, advance
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The export's greedy continuation (prompt included) and its float32 logits on it, both on the CPU."""
    from tlrefusal.generation import greedy_config

    device = _input_device(plain)
    mine = plain.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                          generation_config=greedy_config(n_tokens, chat.stop_ids, pad_token_id))
    logits = plain(input_ids=mine, attention_mask=torch.ones_like(mine)).logits.float().cpu()
    advance(1)
    return mine.cpu(), logits


@contextmanager
def _orthogonalized_unembedding(hooked, direction: torch.Tensor) -> Iterator[None]:
    """The source's unembedding as a "shared" export has it, W_U' = W_U - (W_U r_hat) r_hat^T, while inside.

    W_U' x = W_U (x - (x . r_hat) r_hat) for every input x, so the edit is applied as a forward pre-hook
    that ablates r_hat from the unembedding's input (the final norm's output), on the module that holds
    W_U. The source's weights are left alone: they are shared with its embedding, and the reference should
    not depend on the export's own weight code (`orthogonalize_tensor`), which it checks.
    """
    from hooks.ablation import ablation_hook

    ablate = ablation_hook(direction)
    module = hooked.bridge.original_model.get_output_embeddings()
    handle = module.register_forward_pre_hook(lambda _module, args: (ablate(args[0], None), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _compare(prompt: str, ids: torch.Tensor, mask: torch.Tensor, mine: torch.Tensor, plain_logits: torch.Tensor,
             hooked, chat, hooks, n_tokens: int, tokenizer) -> tuple[float, bool, VerifyExample]:
    """One prompt: the largest |logit difference| between the export's logits (`plain_logits`, on its own
    greedy tokens `mine`) and the hooked source's on the same tokens, whether both greedy continuations (cut
    at a stop token) are the same tokens, and both as text."""
    from tlrefusal.generation import generate_batch, until_stop

    stops = list(chat.stop_ids)
    with hooked.bridge.hooks(fwd_hooks=hooks):
        theirs = generate_batch(hooked, ids, mask, n_tokens, stops)
        tokens = mine.to(hooked.device)
        hooked_logits = hooked.bridge(tokens, attention_mask=torch.ones_like(tokens)).float().cpu()
    diff = (hooked_logits - plain_logits).abs().max().item()
    a = until_stop(mine[0, ids.shape[1]:].tolist(), stops)
    b = until_stop(theirs[0, ids.shape[1]:].tolist(), stops)
    decode = tokenizer.decode
    example = VerifyExample(prompt, decode(a, skip_special_tokens=True), decode(b, skip_special_tokens=True))
    return diff, a == b, example
