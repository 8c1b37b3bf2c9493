"""A Hugging Face checkpoint's weights written into an existing GGUF file's layout: the same metadata and
tokenizer, every tensor replaced (`tlrefusal organism --gguf FILE`, the organism in the demo GGUF's layout).

Not a converter: the template GGUF must be of the same architecture and shape (a fine-tune of the model it
was made from). Names come from the gguf package's own map (`gguf.get_tensor_name_map`); the one layout
change is Llama's attention q/k rows, which llama.cpp stores interleaved per head for its rotary embedding
(row 2i holds what Hugging Face keeps in row i, row 2i+1 what it keeps in row i + head_dim/2), and which
transformers un-interleaves when it loads a GGUF file. Matrices are written in `type_name` (default Q8_0),
vectors (norms, biases) in F32. The tensors go through the GGUF export's own writer (`gguf_file.write_gguf`).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError
from tlrefusal.export.checkpoint import ShardReader, read_checkpoint
from tlrefusal.export.gguf_file import (
    REQUANTIZABLE,
    check_row_length,
    encode_uint32,
    quantized,
    read_gguf,
    write_gguf,
)
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.publish import atomic_file

_INTERLEAVED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's q/k rows (halves paired: i with i + head_dim/2) in llama.cpp's order (pairs 2i, 2i+1)."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class LayoutResult:
    out: Path
    n_tensors: int
    type_name: str
    max_abs_logit_diff: float  # the written file (transformers) against the checkpoint, on the check prompts
    argmax_equal: int  # prompts whose next-token argmax agrees
    n_prompts: int


def write_in_gguf_layout(folder: Path, template: Path, out: Path, type_name: str = "Q8_0",
                         progress: Progress = NO_PROGRESS) -> LayoutResult:
    """Write the safetensors weights of `folder` in the layout of the GGUF file `template` to `out`, then load
    `out` with transformers and compare its logits with the checkpoint's (reported, not a pass/fail)."""
    import gguf

    type_name = type_name.upper()
    if type_name not in REQUANTIZABLE:
        raise TlrefusalError(f"GGUF type {type_name}: choose one of {', '.join(REQUANTIZABLE)}")
    file = read_gguf(template)
    arch = file.metadata.get("general.architecture")
    if arch != "llama":
        raise TlrefusalError(f"{template.name} is a {arch} file; writing into a GGUF layout supports llama only")
    config = artifacts.read_json(folder / artifacts.HF_CONFIG)
    for key, ours in (("block_count", "num_hidden_layers"), ("embedding_length", "hidden_size"),
                      ("attention.head_count", "num_attention_heads"),
                      ("attention.head_count_kv", "num_key_value_heads")):
        if file.metadata.get(f"{arch}.{key}") != config.get(ours):
            raise TlrefusalError(f"{template.name} has {arch}.{key} = {file.metadata.get(f'{arch}.{key}')}, the "
                                 f"checkpoint {ours} = {config.get(ours)}: not the same shape of model")
    checkpoint = read_checkpoint(folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    readers = {name: ShardReader(folder / shard) for shard, keys in checkpoint.shards.items() for name in keys}
    hf_of = {}
    for name in readers:
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None or mapped not in file.tensors:
            raise TlrefusalError(f"the checkpoint's {name} has no place in {template.name} (mapped: {mapped})")
        hf_of[mapped] = name
    missing = [name for name in file.tensors if name not in hf_of]
    if missing:
        raise TlrefusalError(f"the checkpoint has nothing for {template.name}'s {missing[0]}")

    def values(gguf_name: str):
        def make() -> np.ndarray:
            array = readers[hf_of[gguf_name]].read(hf_of[gguf_name]).float().numpy()
            kind = gguf_name.split(".")[-2]
            if kind in _INTERLEAVED:
                array = interleave_rope_rows(array, config[_INTERLEAVED[kind]])
            return array
        return make

    tensors = []
    for tensor in file.tensors.values():
        kind = type_name if len(tensor.shape) > 1 else "F32"
        check_row_length(tensor.name, kind, tensor.shape[-1])
        tensors.append(quantized(tensor.name, kind, tensor.shape, values(tensor.name)))
    metadata = dict(file.raw_metadata)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{type_name}", None) or getattr(gguf.LlamaFileType,
                                                                                      f"ALL_{type_name}", None)
    if "general.file_type" in metadata and file_type is not None:
        metadata["general.file_type"] = encode_uint32("general.file_type", int(file_type))
    with progress.task(f"Writing {folder.name} in {template.name}'s layout ({type_name})", total=None):
        atomic_file(out, lambda tmp: write_gguf(tmp, file.version, file.alignment, list(metadata.values()),
                                                tensors))
    diff, equal, n = _compare(folder, out, progress)
    return LayoutResult(out, len(tensors), type_name, diff, equal, n)


def _compare(folder: Path, out: Path, progress: Progress) -> tuple[float, int, int]:
    """(max |logit difference|, prompts whose next-token argmax agrees, prompts): the GGUF file against the
    checkpoint, both loaded with plain transformers in float32 on the CPU, one after the other."""
    import torch

    from tlrefusal.chat import ChatFormat
    from tlrefusal.export.verify import VERIFY_PROMPTS, _tokenizer, load_plain
    from tlrefusal.model import release_memory
    from tlrefusal.placement import Placement

    chat = ChatFormat.from_tokenizer(_tokenizer(folder, trust_remote_code=False))
    placement = Placement(dtype="float32", device="cpu")
    logits = []
    with torch.inference_mode():
        for path, gguf_file in ((folder, None), (out.parent, out.name)):
            model = load_plain(path, placement, False, progress, gguf_file=gguf_file)
            logits.append([model(input_ids=chat.encode([p])[0]).logits[0].float() for p in VERIFY_PROMPTS])
            del model
            release_memory()
    diff = max((a - b).abs().max().item() for a, b in zip(*logits, strict=True))
    equal = sum(int(a[-1].argmax() == b[-1].argmax()) for a, b in zip(*logits, strict=True))
    return diff, equal, len(VERIFY_PROMPTS)
