"""GGUF files read and written one tensor at a time, and the quantization types tlrefusal can rewrite.

Reading goes through the `gguf` package's parser (`gguf.GGUFReader`, which maps the file but touches only
its header); tensor data is then read with plain file reads, a bounded run of rows at a time, so a 70B
file is never resident. Writing lays out the file itself (the format is small: magic, version, counts, the
metadata key-value pairs, the tensor infos, padding to the alignment, then each tensor's data padded to the
alignment) so that every metadata pair of the source is copied byte for byte, and every tensor is produced
only when its turn comes.

Quantized formats (ggml's block types) quantize along a row (ggml's ne0, torch's last axis) in blocks of
32 or 256 values, so rows are independent: a tensor can be dequantized, edited and quantized back a run
of rows at a time. `gguf.quants` quantizes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 (REQUANTIZABLE);
the K-quants and the rest it can only dequantize, so an edited tensor of such a type is written in a
fallback type.
"""
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlrefusal.errors import TlrefusalError, first_line

ROW_CHUNK_BYTES = 4 * 2**20  # float32 bytes of rows dequantized, edited or quantized at a time


def _gguf():
    import gguf

    return gguf


def qtype(name: str):
    """A `gguf.GGMLQuantizationType` by name (F32, Q8_0, Q4_K, ...); TlrefusalError for an unknown one."""
    types = _gguf().GGMLQuantizationType
    try:
        return types[name.upper()]
    except KeyError:
        raise TlrefusalError(f"unknown GGUF tensor type {name!r} (e.g. {', '.join(REQUANTIZABLE)})") from None


# Types whose edited tensors are quantized back to the same type (gguf.quants can quantize them).
REQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
DEFAULT_FALLBACK = "Q8_0"  # what an edited K-quant (or other dequantize-only type) is written as


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its type, its shape in torch order (rows first) and where its bytes are."""

    name: str
    type_name: str  # a gguf.GGMLQuantizationType member name
    shape: tuple[int, ...]  # torch order: the reverse of ggml's (ne0 = shape[-1])
    offset: int  # absolute offset of its data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows of its torch-order 2-D view: everything but the last axis."""
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows


@dataclass(frozen=True)
class GGUFFile:
    """The header of a GGUF file: version, alignment, every metadata pair (decoded and as raw bytes), tensors."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, object]  # decoded values (arrays of strings as lists)
    raw_metadata: dict[str, bytes]  # each key-value pair exactly as stored, in file order
    tensors: dict[str, GGUFTensor]  # in file order

    def read_bytes(self, tensor: GGUFTensor, start_row: int = 0, stop_row: int | None = None) -> bytes:
        stop_row = tensor.rows if stop_row is None else stop_row
        with self.path.open("rb") as f:
            f.seek(tensor.offset + start_row * tensor.row_bytes)
            data = f.read((stop_row - start_row) * tensor.row_bytes)
        if len(data) != (stop_row - start_row) * tensor.row_bytes:
            raise TlrefusalError(f"{self.path} is truncated (tensor {tensor.name})")
        return data

    def iter_float_rows(self, tensor: GGUFTensor) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows [n, row length]) over the tensor, a bounded run of rows at a time."""
        step = row_step(tensor.shape[-1])
        for start in range(0, tensor.rows, step):
            stop = min(tensor.rows, start + step)
            yield start, dequantize_rows(self.read_bytes(tensor, start, stop), tensor.type_name, tensor.shape[-1])

    def read_float(self, tensor: GGUFTensor) -> np.ndarray:
        """The whole tensor dequantized to float32, in torch order (one float32 copy, filled a run at a time)."""
        out = np.empty((tensor.rows, tensor.shape[-1]), dtype=np.float32)
        for start, rows in self.iter_float_rows(tensor):
            out[start:start + len(rows)] = rows
        return out.reshape(tensor.shape)


def row_step(row_length: int) -> int:
    return max(1, ROW_CHUNK_BYTES // (4 * row_length))


def dequantize_rows(data: bytes, type_name: str, row_length: int) -> np.ndarray:
    """Raw bytes of whole rows of a tensor of `type_name` as float32 [n, row_length]."""
    gguf = _gguf()
    kind = qtype(type_name)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, row_length // block * size)
    try:
        return np.array(gguf.quants.dequantize(raw, kind), dtype=np.float32).reshape(-1, row_length)  # writable
    except NotImplementedError as exc:
        raise TlrefusalError(f"the gguf package cannot dequantize {type_name} tensors: {first_line(exc)}") from exc


def quantize_rows(rows: np.ndarray, type_name: str) -> bytes:
    """float32 rows [n, row_length] as raw bytes of `type_name` (one of REQUANTIZABLE)."""
    data = _gguf().quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype(type_name))
    return np.ascontiguousarray(data).tobytes()


def check_row_length(name: str, type_name: str, row_length: int) -> None:
    """A type's blocks must tile a row: a one-line error before anything is written."""
    block, _ = _gguf().GGML_QUANT_SIZES[qtype(type_name)]
    if row_length % block:
        raise TlrefusalError(f"{name} has rows of {row_length} values, which {type_name} (blocks of {block}) cannot "
                             "hold; choose another --gguf-fallback-type (F16 or F32 hold any row)")


def tensor_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[qtype(type_name)]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def read_gguf(path: Path) -> GGUFFile:
    """Parse the header of the GGUF file at `path`; TlrefusalError if it is not one we can rewrite."""
    try:
        return _parse(path)
    except (ValueError, IndexError, KeyError, OSError, struct.error) as exc:  # a truncated or corrupt header
        raise TlrefusalError(f"{path} is not a readable GGUF file: {first_line(exc) or type(exc).__name__}") from exc


def _parse(path: Path) -> GGUFFile:
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    if reader.byte_order != "I":
        raise TlrefusalError(f"{path} is a big-endian GGUF file; tlrefusal rewrites little-endian files only")
    raw, decoded = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        size = sum(int(part.nbytes) for part in field.parts)
        raw[key] = bytes(reader.data[field.offset:field.offset + size])
        decoded[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, int(t.data_offset), int(t.n_bytes))
        if t.data_offset + t.n_bytes > len(reader.data):
            raise TlrefusalError(f"{path} is truncated (tensor {t.name})")
    version = int(reader.fields["GGUF.version"].parts[0][0])
    return GGUFFile(path, version, int(reader.alignment), decoded, raw, tensors)


@dataclass(frozen=True)
class TensorOut:
    """One tensor of a GGUF file being written: its header entry and how to produce its bytes in order.

    `produce` yields the tensor's raw bytes in pieces (a run of rows each), whose total must be `nbytes`."""

    name: str
    type_name: str
    shape: tuple[int, ...]  # torch order
    produce: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type_name, self.shape)


def encode_uint32(key: str, value: int) -> bytes:
    """A metadata pair of type UINT32, as GGUF stores it (for the few keys a rewrite changes)."""
    name = key.encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<II", int(_gguf().GGUFValueType.UINT32), value)


def write_gguf(path: Path, version: int, alignment: int, metadata: list[bytes], tensors: list[TensorOut]) -> int:
    """Write a GGUF file: `metadata` (raw key-value pairs) and `tensors` produced one at a time, each aligned.

    Returns the bytes of tensor data written (padding excluded)."""
    def pad(n: int) -> int:
        return -n % alignment

    infos, offset = [], 0
    for t in tensors:
        name = t.name.encode()
        dims = tuple(reversed(t.shape))
        infos.append(struct.pack("<Q", len(name)) + name + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                                        int(qtype(t.type_name)), offset))
        offset += t.nbytes + pad(t.nbytes)
    written = 0
    with path.open("wb") as f:
        f.write(struct.pack("<IIQQ", _gguf().GGUF_MAGIC, version, len(tensors), len(metadata)))
        for pair in metadata:
            f.write(pair)
        for info in infos:
            f.write(info)
        f.write(b"\0" * pad(f.tell()))
        for t in tensors:
            n = 0
            for piece in t.produce():
                f.write(piece)
                n += len(piece)
            if n != t.nbytes:
                raise ValueError(f"{t.name}: produced {n} bytes, its header says {t.nbytes}")
            written += n
            f.write(b"\0" * pad(n))
        f.flush()
        os.fsync(f.fileno())
    return written


def copied(file: GGUFFile, tensor: GGUFTensor, name: str | None = None) -> TensorOut:
    """A tensor of `file` written as it is stored (under `name`, default its own)."""
    def produce() -> Iterator[bytes]:
        step = row_step(tensor.shape[-1])
        for start in range(0, tensor.rows, step):
            yield file.read_bytes(tensor, start, min(tensor.rows, start + step))

    return TensorOut(name or tensor.name, tensor.type_name, tensor.shape, produce)


def quantized(name: str, type_name: str, shape: tuple[int, ...], values: Callable[[], np.ndarray]) -> TensorOut:
    """A tensor written from float32 values (`values()`: an array of `shape` in torch order, made when its
    turn comes), quantized to `type_name` a run of rows at a time."""
    def produce() -> Iterator[bytes]:
        array = values()
        rows = array.reshape(-1, array.shape[-1])
        step = row_step(rows.shape[-1])
        for start in range(0, len(rows), step):
            yield quantize_rows(rows[start:start + step], type_name)

    return TensorOut(name, type_name, shape, produce)
