"""Tiny random GGUF model files, written here, for tests that need a GGUF without a network.

`write_tiny_gguf` writes a two-layer "llama" (grouped-query attention, RMS norms, no biases) or "gpt2"
(learned position embeddings, LayerNorm with biases, biases on every projection) in llama.cpp's tensor
names and metadata keys, with the byte-level BPE tokenizer and chat template of `tests/tiny.py`. Every 2-D
weight matrix is stored in one ggml type (`TINY_QTYPES`); 1-D tensors (norm gains and biases) stay F32.
Norm gains are drawn away from 1, as in `tests/tiny.py`.

Layout notes (what `transformers` expects when it dequantizes such a file):
- GGUF shapes are in ggml order (ne0 first = torch's last dim). `GGUFWriter.add_tensor` takes the
  torch-layout array; a quantized matrix goes in as its uint8 blocks, shape (rows, bytes per row), with
  `raw_dtype`, and the writer turns that back into (rows, columns). A row (ne0) must hold whole blocks:
  32 values for Q8_0/Q4_1, 256 for Q4_K, so the Q4_K models are wider (`tiny_dims`).
- llama: llama.cpp stores attn_q/attn_k with the rotary halves interleaved; `transformers` undoes that on
  load (`LlamaTensorProcessor`), so the loaded q_proj/k_proj are a row permutation of the file's. Nothing
  else moves.
- gpt2: the file holds every matrix as an nn.Linear (out, in); `transformers` transposes attn_qkv,
  attn_output, ffn_up and ffn_down into GPT-2's Conv1D (in, out) on load. token_embd, position_embd and
  output are not transposed. GPT-2's GGUF config has no key for the number of positions (`n_positions`
  keeps its default, 1024), so position_embd has 1024 rows; nor for the MLP width (`n_inner` stays None,
  i.e. 4 * n_embd).
- tying: `transformers` ties the unembedding to token_embd exactly when the file has no output.weight.
"""
from pathlib import Path

import gguf
import numpy as np

from tests.tiny import byte_bpe_tokenizer

TINY_QTYPES = ("F32", "F16", "Q8_0", "Q4_1", "Q4_K")  # names of gguf.GGMLQuantizationType members
ARCHES = ("llama", "gpt2")
N_LAYERS = 2
N_HEAD = 4
N_HEAD_KV = 2  # llama only: grouped-query attention
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M}  # general.file_type, informative only
GPT2_POSITIONS = 1024  # GPT2Config.n_positions' default; the GGUF config cannot change it


def tiny_dims(arch: str, qtype: str) -> tuple[int, int]:
    """(d_model, d_ff) for a model of this architecture whose matrices are stored as `qtype`."""
    d_model = 256 if qtype == "Q4_K" else 64  # a Q4_K row (ne0) holds whole 256-value super-blocks
    d_ff = 4 * d_model if arch == "gpt2" else 2 * d_model  # GPT-2's GGUF config leaves n_inner = 4 * n_embd
    return d_model, d_ff


def quantize(values: np.ndarray, qtype: str,
             rng: np.random.Generator) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """`values` (torch layout, float32) as the array `GGUFWriter.add_tensor` takes for `qtype`, and the type.

    Q4_K cannot be quantized by the gguf package, so its blocks are drawn at random instead (`values` then
    only gives the shape): the matrix is whatever those blocks dequantize to.
    """
    kind = gguf.GGMLQuantizationType[qtype]
    if kind == gguf.GGMLQuantizationType.Q4_K:
        return random_q4_k(values.shape, rng), kind
    return gguf.quants.quantize(values.astype(np.float32), kind), kind


def random_q4_k(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random, valid Q4_K blocks for a (rows, cols) matrix, cols a multiple of 256: uint8 (rows, cols/256*144)

    A block of 256 values is fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins (8 of each), then
    128 bytes of 4-bit quants q; value = d * scale_j * q - dmin * min_j in sub-block j (32 values). With
    dmin = 8 d and min_j ~ scale_j the values centre near 0 with a step d * scale_j ~ 0.005..0.02, so
    |w| ~ 0.02..0.15.
    """
    rows, cols = shape
    if cols % gguf.QK_K:
        raise ValueError(f"a Q4_K row needs a multiple of {gguf.QK_K} values, not {cols}")
    n = rows * cols // gguf.QK_K
    d = np.full((n, 1), 3e-4, dtype=np.float16)
    dmin = np.full((n, 1), 8 * 3e-4, dtype=np.float16)
    sc = rng.integers(16, 64, size=(n, 8))
    mn = np.clip(sc + rng.integers(-3, 4, size=(n, 8)), 0, 63)
    scales = np.zeros((n, 12), dtype=np.uint8)
    # the layout Q4_K.get_scale_min unpacks: bytes 0-3 scales 0-3 (low 6 bits) + high 2 bits of scales 4-7,
    # bytes 4-7 the same for mins, bytes 8-11 low nibble = scales 4-7, high nibble = mins 4-7 (low 4 bits)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = rng.integers(0, 256, size=(n, gguf.QK_K // 2), dtype=np.uint8)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def _tokenizer_fields(writer: gguf.GGUFWriter, family: str) -> int:
    """Write the tiny byte-level BPE tokenizer of `tests/tiny.py` as GGUF metadata; returns the vocab size."""
    import json

    tok = byte_bpe_tokenizer(family)
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    assert None not in tokens, "the tiny tokenizer's ids are not contiguous"
    added = {entry.content: entry for entry in tok.added_tokens_decoder.values()}
    token_types = [
        gguf.TokenType.CONTROL if t in added and added[t].special
        else gguf.TokenType.USER_DEFINED if t in added
        else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in token_types])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)
    return len(tokens)


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: str = "Q8_0", tied: bool = True, seed: int = 0,
                    family: str = "qwen", alignment: int | None = None) -> Path:
    """A tiny random model as a GGUF file at `path` (returned).

    arch: "llama" (GQA: 4 query heads, 2 key/value heads) or "gpt2" (position embeddings, biases on
    attn_output and ffn_down). qtype: the ggml type (a `TINY_QTYPES` name) of every 2-D weight matrix,
    position_embd and the unembedding included; 1-D tensors (norms, biases) stay F32. tied=True: no
    output.weight (the unembedding shares token_embd); tied=False: a separate output.weight. family: the
    chat family of the tokenizer (`tests.tiny.FAMILIES`). Weights have std ~0.05; norm gains are uniform in
    0.5..1.5. alignment: a general.alignment other than GGUF's default 32.
    """
    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r}: choose from {ARCHES}")
    if qtype not in TINY_QTYPES:
        raise ValueError(f"qtype {qtype!r}: choose from {TINY_QTYPES}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    d_model, d_ff = tiny_dims(arch, qtype)
    head_dim = d_model // N_HEAD

    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(FILE_TYPES[qtype])
    vocab_size = _tokenizer_fields(writer, family)
    writer.add_block_count(N_LAYERS)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(N_HEAD)
    if arch == "llama":
        writer.add_context_length(256)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab_size)
    else:
        writer.add_context_length(GPT2_POSITIONS)
        writer.add_layer_norm_eps(1e-5)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def matrix(name: str, rows: int, cols: int, std: float = 0.05) -> None:
        data, kind = quantize(rng.normal(0.0, std, size=(rows, cols)).astype(np.float32), qtype, rng)
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)

    def vector(name: str, size: int, gain: bool = False) -> None:
        values = rng.uniform(0.5, 1.5, size) if gain else rng.normal(0.0, 0.05, size)
        writer.add_tensor(name, values.astype(np.float32))

    matrix("token_embd.weight", vocab_size, d_model)
    if arch == "gpt2":
        matrix("position_embd.weight", GPT2_POSITIONS, d_model)
    for layer in range(N_LAYERS):
        blk = f"blk.{layer}"
        vector(f"{blk}.attn_norm.weight", d_model, gain=True)
        vector(f"{blk}.ffn_norm.weight", d_model, gain=True)
        if arch == "llama":
            matrix(f"{blk}.attn_q.weight", N_HEAD * head_dim, d_model)
            matrix(f"{blk}.attn_k.weight", N_HEAD_KV * head_dim, d_model)
            matrix(f"{blk}.attn_v.weight", N_HEAD_KV * head_dim, d_model)
            matrix(f"{blk}.attn_output.weight", d_model, N_HEAD * head_dim)
            matrix(f"{blk}.ffn_gate.weight", d_ff, d_model)
            matrix(f"{blk}.ffn_up.weight", d_ff, d_model)
            matrix(f"{blk}.ffn_down.weight", d_model, d_ff)
        else:
            vector(f"{blk}.attn_norm.bias", d_model)
            vector(f"{blk}.ffn_norm.bias", d_model)
            matrix(f"{blk}.attn_qkv.weight", 3 * d_model, d_model)
            vector(f"{blk}.attn_qkv.bias", 3 * d_model)
            matrix(f"{blk}.attn_output.weight", d_model, d_model)
            vector(f"{blk}.attn_output.bias", d_model)
            matrix(f"{blk}.ffn_up.weight", d_ff, d_model)
            vector(f"{blk}.ffn_up.bias", d_ff)
            matrix(f"{blk}.ffn_down.weight", d_model, d_ff)
            vector(f"{blk}.ffn_down.bias", d_model)
    vector("output_norm.weight", d_model, gain=True)
    if arch == "gpt2":
        vector("output_norm.bias", d_model)
    if not tied:
        matrix("output.weight", vocab_size, d_model)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float32 in torch layout (as the file's bytes say)."""
    reader = gguf.GGUFReader(path)
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in reader.tensors}


def read_gguf_types(path: Path) -> dict[str, str]:
    """The ggml type name of every tensor of a GGUF file."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
