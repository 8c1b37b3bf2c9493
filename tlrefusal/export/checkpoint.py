"""The safetensors weights of a Hugging Face folder, read and written one tensor at a time.

Owns the byte format: an 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets
of every tensor, padded with spaces to a multiple of 8), then the tensors' bytes in header order. Writing
lays out the header from the shapes and dtypes first and produces each tensor only when its turn comes,
so peak memory is about the largest tensor, not a shard; reading uses plain file reads, not a memory map.
"""
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError

# safetensors dtype names <-> torch dtypes (the names the format's header spells).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an output shard: its header entry and how to produce its values when written."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[self.dtype]).element_size()


def write_safetensors_streaming(path: Path, tensors: list[TensorSpec], metadata: dict[str, str]) -> int:
    """Write a safetensors file one tensor at a time; returns the bytes of tensor data written."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in tensors:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in tensors:
            tensor = spec.produce()
            if SAFETENSORS_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: produced {tensor.dtype} {tuple(tensor.shape)}, header says "
                                 f"{spec.dtype} {spec.shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def read_header(path: Path) -> tuple[int, dict]:
    """The JSON header of a safetensors file and its size in bytes; TlrefusalError if it is not one."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            return size, json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TlrefusalError(f"{path} is not a readable safetensors file: {exc}") from exc


class ShardReader:
    """Reads a safetensors file one tensor at a time with plain file reads.

    safetensors' own `safe_open` maps the file into memory, and every page it touches stays resident until
    the file is closed, so streaming a single-file checkpoint through it would hold the whole file. Here
    each tensor is read into its own buffer, which is freed once the tensor has been written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size, header = read_header(path)
        self.data_start = 8 + size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {"format": "pt"}
        self.entries: dict[str, dict] = header
        unknown = {e["dtype"] for e in header.values()} - set(SAFETENSORS_DTYPES)
        if unknown:
            raise TlrefusalError(f"{path} holds tensors of unsupported dtypes {sorted(unknown)}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.entries[name]
        return entry["dtype"], tuple(entry["shape"])

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self.spec(name)
        return self.read_rows(name, 0, shape[0]) if shape else self._read(name, 0, None).reshape(())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of the tensor's first axis (contiguous bytes): a bounded piece of a large tensor."""
        dtype, shape = self.spec(name)
        row = math.prod(shape[1:]) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        return self._read(name, start * row, (stop - start) * row).reshape(stop - start, *shape[1:])

    def iter_bytes(self, name: str, chunk: int) -> Iterator[bytes]:
        """The tensor's raw bytes in pieces of at most `chunk` bytes (a byte-for-byte comparison's input)."""
        begin, end = self.entries[name]["data_offsets"]
        for offset in range(0, end - begin, chunk):
            yield bytes(self._buffer(name, offset, min(chunk, end - begin - offset)))

    def _read(self, name: str, offset: int, length: int | None) -> torch.Tensor:
        dtype = SAFETENSORS_DTYPES[self.spec(name)[0]]
        begin, end = self.entries[name]["data_offsets"]
        buffer = self._buffer(name, offset, end - begin - offset if length is None else length)
        if not buffer:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype)

    def _buffer(self, name: str, offset: int, length: int) -> bytearray:
        begin, end = self.entries[name]["data_offsets"]
        if offset < 0 or offset + length > end - begin:
            raise ValueError(f"{name}: bytes {offset}..{offset + length} are outside the tensor")
        buffer = bytearray(length)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin + offset)
            if f.readinto(buffer) != len(buffer):
                raise TlrefusalError(f"{self.path} is truncated (tensor {name})")
        return buffer


@dataclass(frozen=True)
class Checkpoint:
    """The safetensors weights of a Hugging Face folder: shard file -> tensor names, and the index if any."""

    folder: Path
    shards: dict[str, list[str]]
    index: dict | None

    @property
    def keys(self) -> set[str]:
        return {k for names in self.shards.values() for k in names}

    @property
    def nbytes(self) -> int:
        return sum((self.folder / shard).stat().st_size for shard in self.shards)


def read_checkpoint(folder: Path) -> Checkpoint:
    """Find the safetensors weights of `folder` (one file or an index of shards) and list their tensors."""
    index_name, single = artifacts.WEIGHTS_INDEX, artifacts.SINGLE_WEIGHTS
    index = None
    if (folder / index_name).is_file():
        index = artifacts.read_json(folder / index_name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise TlrefusalError(f"{folder / index_name} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (folder / single).is_file():
        files = [single]
    else:
        pickles = [p.name for p in folder.glob("*.bin")]
        hint = f" (it has {pickles[0]}: tlrefusal never loads pickled weights)" if pickles else ""
        raise TlrefusalError(f"{folder} has no {single} or {index_name}{hint}")
    shards = {}
    for name in files:
        if not (folder / name).is_file():
            raise TlrefusalError(f"shard {name} listed in {index_name} is missing from {folder}")
        shards[name] = ShardReader(folder / name).keys()
    checkpoint = Checkpoint(folder, shards, index)
    if index is not None:
        missing = set(index["weight_map"]) - checkpoint.keys
        if missing:
            raise TlrefusalError(f"{len(missing)} tensors listed in {index_name} are in no shard, "
                                 f"e.g. {min(missing)}")
    return checkpoint


# Tensors that mark a pre-quantized checkpoint: block-wise FP8 scales (DeepSeek-V3, Qwen3-FP8, compressed-tensors).
QUANTIZED_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")


def refuse_quantized(folder: Path) -> None:
    """Refuse a pre-quantized checkpoint before anything is written: a `quantization_config` in config.json,
    FP8 scale tensors (`*.weight_scale_inv`, `*.weight_scale`) or FP8 tensors in a safetensors header.

    Orthogonalization edits full-precision matrices; W - r r^T W applied to FP8 codes or their scales is not
    the edit, so such a source is sent back with the advice to export its unquantized checkpoint.
    """
    config_path = folder / artifacts.HF_CONFIG
    config = artifacts.read_json(config_path) if config_path.is_file() else {}
    for part in (config, config.get("text_config") or {}):
        if isinstance(part, dict) and part.get("quantization_config"):
            method = (part["quantization_config"] or {}).get("quant_method", "unknown method")
            _quantized(folder, f"config.json has a quantization_config ({method})")
    for path in sorted(folder.glob("*.safetensors")):
        _, header = read_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name.endswith(QUANTIZED_SCALE_SUFFIXES):
                _quantized(folder, f"{path.name} holds the quantization scale {name}")
            if str(entry.get("dtype", "")).startswith("F8"):
                _quantized(folder, f"{path.name} holds {name} as {entry['dtype']}")


def _quantized(folder: Path, why: str) -> None:
    raise TlrefusalError(f"{folder} is a pre-quantized checkpoint ({why}); orthogonalize edits full-precision "
                         "weights only: pass the unquantized model with --model (a run extracted with --quantize "
                         "exports from the full-precision checkpoint as it is)")
