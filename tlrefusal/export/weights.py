"""Weight orthogonalization (the paper's Appendix E): which tensors write to the residual stream,
and the edit W' = W - r_hat r_hat^T W applied to each of them.

If the token embedding, any positional embedding, every attention output projection, every MLP output
projection and their biases are orthogonal to r_hat, then r_hat^T x = 0 for resid_pre, resid_mid and
resid_post of every layer, by induction over layers: the edited model's forward pass equals directional
ablation with hooks at every layer and position (`hooks.ablation`), with no hooks at run time, as long
as the unembedding is not edited: a tied one is untied unless the paper's edit is asked for (TIED_EMBEDDINGS).

The tensors are named through TransformerLens' architecture adapter (its component mapping from bridge
roles such as `blocks.attn.o` to Hugging Face module names), and their layout is read from the module
class of a model built on the meta device (`nn.Linear` stores [d_out, d_in], GPT-2's `Conv1D` stores
[d_in, d_out]), so nothing is guessed from tensor names or shapes.
"""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.ops import compute_dtype, project_out
from tlrefusal.errors import TlrefusalError, first_line

# What to do with an unembedding that shares the embedding's matrix (Gemma, SmolLM2, ...):
# "untie" (the default): the embedding is orthogonalized and lm_head keeps the original matrix, stored apart,
#   so the export computes exactly what hook ablation of the source computes.
# "shared": the paper's original code (SPEC 1.7): the shared matrix is orthogonalized once and stays shared,
#   so the unembedding loses its component along r too, W_U' = W_U (I - r_hat r_hat^T): logits change and the
#   export is NOT equal to hook ablation (it equals hook ablation with that edited unembedding).
TiedEmbeddings = Literal["untie", "shared"]
TIED_EMBEDDINGS: tuple[TiedEmbeddings, ...] = ("untie", "shared")


class PlanRules:
    """What follows from a plan's `tied_embeddings` and `post_norms`, for the safetensors and GGUF exports."""

    tied_embeddings: "TiedEmbeddings | None"
    post_norms: tuple[str, ...]

    @property
    def untie(self) -> bool:
        """The export stores the original matrix apart as the unembedding (untied)."""
        return self.tied_embeddings == "untie"

    @property
    def edits_unembedding(self) -> bool:
        """The unembedding is orthogonalized with the embedding (--tied-embeddings shared)."""
        return self.tied_embeddings == "shared"

    @property
    def exact(self) -> bool:
        """Orthogonalization equals hook ablation only when every writer adds straight to the stream."""
        return not self.post_norms

    def check(self, direction_shape: tuple[int, ...], d_model: int, architecture: str, approximate: bool) -> None:
        """One-line errors before anything is written: a direction of another width, and a model whose norms
        after the writers make the edit inexact unless --approximate."""
        if tuple(direction_shape) != (d_model,):
            raise TlrefusalError(f"the direction has shape {tuple(direction_shape)}, but the model's residual "
                                 f"stream has width {d_model}: it was extracted from another model")
        if not self.exact and not approximate:
            raise TlrefusalError(f"{architecture} puts a norm ({', '.join(self.post_norms)}) between each output "
                                 "projection and the residual stream, so orthogonalized weights cannot equal hook "
                                 "ablation; pass --approximate to export anyway and record the measured gap")


@dataclass(frozen=True)
class WeightPlan(PlanRules):
    """What orthogonalizing one architecture edits, in the checkpoint's own tensor names."""

    model_type: str
    d_model: int
    n_layers: int
    edits: dict[str, int]  # checkpoint tensor name -> index of its d_model axis
    embed_key: str
    unembed_key: str
    tied: bool  # the source's unembedding shares the embedding matrix
    post_norms: tuple[str, ...]  # norms between a writer and the residual stream (Gemma-2/3, OLMo-2, GLM-4)
    tied_embeddings: TiedEmbeddings | None = None  # what the export does with a tied unembedding; None if untied


EDIT_BLOCK_BYTES = 64 * 2**20  # float32 rows edited at a time


def orthogonalize_tensor(weight: Tensor, unit_dir: Float[Tensor, " d_model"], axis: int,
                         block_bytes: int = EDIT_BLOCK_BYTES, inplace: bool = False) -> Tensor:
    """W' = W - r_hat r_hat^T W along `axis` (the d_model axis), computed in >= float32, cast back.

    `unit_dir` must already be normalised. A bias (1-D, axis 0) becomes b - (b . r_hat) r_hat. A matrix is
    edited a block of rows at a time (each row's own projection, so blocks do not change the result) into
    an output of its own dtype: memory is the tensor, its edited copy and one float32 block, so a bfloat16
    model's export peaks near its largest tensor in float32, not twice that. `inplace`: the edit is written
    into `weight` itself (a matrix; the GGUF export's dequantized float32 copy), which is returned.
    """
    if weight.ndim not in (1, 2) or weight.shape[axis] != unit_dir.shape[0]:
        raise ValueError(f"axis {axis} of a {tuple(weight.shape)} tensor is not d_model={unit_dir.shape[0]}")
    dtype = compute_dtype(weight.dtype)
    unit_dir = unit_dir.to(dtype)
    if weight.ndim == 1:
        return project_out(weight.to(dtype), unit_dir).to(weight.dtype)
    out = weight if inplace else torch.empty_like(weight, memory_format=torch.contiguous_format)
    rows, out_rows = weight.movedim(axis, -1), out.movedim(axis, -1)  # [n, d_model] views
    step = max(1, block_bytes // (rows.shape[-1] * torch.empty((), dtype=dtype).element_size()))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(dtype, copy=True)
        block.addr_(block @ unit_dir, unit_dir, alpha=-1)  # block -= (block . r_hat) r_hat^T: project_out per row
        out_rows[start:start + step] = block
    return out


def weight_plan(folder: Path, checkpoint_keys: set[str], trust_remote_code: bool = False,
                tied_embeddings: TiedEmbeddings = "untie") -> WeightPlan:
    """Name every residual-stream writer of the model in `folder` as a checkpoint tensor, with its axis.

    `tied_embeddings` (TIED_EMBEDDINGS) says what becomes of an unembedding tied to the embedding; on a
    model whose embeddings are not tied, "untie" has nothing to do (recorded as None) and "shared" is an
    error, since there is no shared matrix and editing a separate lm_head is not the paper's edit either.
    Raises TlrefusalError for an architecture TransformerLens cannot map or whose blocks have no single
    attention output and MLP output projection (mixture-of-experts, state-space models, ...), and for a
    checkpoint that lacks one of the tensors.
    """
    if tied_embeddings not in TIED_EMBEDDINGS:
        raise TlrefusalError(f"unknown tied-embeddings mode {tied_embeddings!r}; choose from "
                             f"{', '.join(TIED_EMBEDDINGS)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    roles = _adapter(config).component_mapping
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    prefix = model.base_model_prefix

    def key(module_path: str, param: str) -> str:
        """The checkpoint name of a parameter; some checkpoints (GPT-2's) omit the base model prefix."""
        name = f"{module_path}.{param}"
        if name in checkpoint_keys:
            return name
        if name.startswith(f"{prefix}.") and name[len(prefix) + 1:] in checkpoint_keys:
            return name[len(prefix) + 1:]
        raise TlrefusalError(f"the checkpoint has no tensor {name}; is a shard missing?")

    blocks = roles.get("blocks")
    attn = blocks.submodules.get("attn") if blocks is not None else None
    mlp = blocks.submodules.get("mlp") if blocks is not None else None
    if "embed" not in roles or attn is None or mlp is None or "o" not in attn.submodules \
            or "out" not in mlp.submodules:
        raise _unsupported(config.model_type, "its blocks have no single attention output and MLP output "
                           "projection (supported: Llama, Mistral, Qwen2, Gemma, GPT-2 and similar dense decoders)")

    edits: dict[str, int] = {}
    for role in ("embed", "pos_embed"):  # [n_tokens, d_model] tables: the rows are written to the stream
        if role in roles:
            edits[key(roles[role].name, "weight")] = 1
    n_layers = config.get_text_config().num_hidden_layers
    for layer in range(n_layers):
        for parent, child in ((attn, attn.submodules["o"]), (mlp, mlp.submodules["out"])):
            edits.update(_projection_edits(model, f"{blocks.name}.{layer}.{parent.name}.{child.name}", key))

    embeddings, unembedding = model.get_input_embeddings(), model.get_output_embeddings()
    post_norms = tuple(f"{blocks.name}.*.{sub.name}" for role, sub in blocks.submodules.items()
                       if role.endswith("_post"))
    unembed_name = f"{roles['unembed'].name}.weight" if "unembed" in roles else "lm_head.weight"
    tied = unembedding is not None and unembedding.weight is embeddings.weight
    if tied_embeddings == "shared" and not tied:
        raise TlrefusalError(f"--tied-embeddings shared: this {config.model_type} model does not tie its "
                             "unembedding to its embedding, so there is no shared matrix to edit; drop the option")
    if tied_embeddings == "shared" and unembed_name in checkpoint_keys:
        edits[unembed_name] = 1  # a checkpoint that also stores the tied copy: [vocab, d_model], edited alike
    return WeightPlan(model_type=config.model_type, d_model=embeddings.weight.shape[1], n_layers=n_layers,
                      edits=edits, embed_key=key(roles["embed"].name, "weight"), unembed_key=unembed_name,
                      tied=tied, post_norms=post_norms, tied_embeddings=tied_embeddings if tied else None)


def _projection_edits(model, path: str, key: Callable[[str, str], str]) -> dict[str, int]:
    """An output projection's weight (with the index of its d_model axis, read from its module class) and
    its bias, if any, in checkpoint names."""
    from transformers.pytorch_utils import Conv1D

    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise _unsupported(model.config.model_type, f"it has no module {path}") from None
    if isinstance(module, torch.nn.Linear):
        edits = {key(path, "weight"): 0}  # [d_model, d_in]
    elif isinstance(module, Conv1D):
        edits = {key(path, "weight"): 1}  # [d_in, d_model]
    else:
        raise _unsupported(model.config.model_type, f"{path} is a {type(module).__name__}, not a linear layer")
    if module.bias is not None:
        edits[key(path, "bias")] = 0
    return edits


def _unsupported(model_type: str, why: str) -> TlrefusalError:
    return TlrefusalError(f"cannot orthogonalize a {model_type} model: {why}")


def _adapter(config):
    """TransformerLens' architecture adapter for a Hugging Face config, without loading any weights.

    Uses the same calls as `TransformerBridge.boot_transformers`; tests/test_export.py fails if a
    TransformerLens release moves them.
    """
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    try:
        architecture = determine_architecture_from_hf_config(config)
        bridge_config = build_bridge_config_from_hf(config, architecture, config.model_type, None)
        return ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise TlrefusalError(f"TransformerLens has no architecture adapter for {config.model_type}: "
                             f"{first_line(exc)}") from exc
