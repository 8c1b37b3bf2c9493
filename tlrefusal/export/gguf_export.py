"""Orthogonalize a GGUF file into a GGUF file: `tlrefusal orthogonalize RUN --model SRC.gguf --out OUT.gguf`.

Every metadata pair and every tensor that does not write to the residual stream is copied byte for byte.
Each residual writer (the token and position embeddings, every attention output and FFN down projection,
their biases: named through the `gguf` package's own tensor-name table, `gguf.TENSOR_NAMES`) is
dequantized, edited in float32 (W - r_hat r_hat^T W along its d_model axis, `weights.orthogonalize_tensor`)
and quantized back to its own type where `gguf.quants` can (`gguf_file.REQUANTIZABLE`); a K-quant (which it
can only dequantize) is written in the fallback type (Q8_0 by default). A tied unembedding (no
`output.weight`) is untied as in the safetensors export: `output.weight` holds the source's embedding bytes.

Memory: one tensor in float32 (dequantized into one buffer, edited in place, quantized a run of rows at a
time), plus the metadata; the source is read, never written; the file is built beside OUT and renamed.

Verification (`--verify`, default full):
- weights: every metadata pair and untouched tensor byte-equal; each edited tensor's distance from the
  edit recomputed here in float64 from the source, and its component along r, within the written type's
  own quantization error (`quantization_bound`: each value of a block may move by at most one step of
  the block's scale, which follows from the format's definition);
- full: that, and two comparisons with hook ablation of the dequantized source through `transformers`
  (gguf_file=). First the exactness check: the same edit written with float32 writers, at the float32
  tolerance; it tests the plan (every residual writer found, each on the right axis) with no quantization
  in the way, independently of the plan, since the hooks ablate the stream itself. Then the written file:
  a quantized file cannot match float hooks exactly, and how far quantization noise moves the logits
  depends on the model and on the direction (ablating a direction the stream leans on leaves the later
  norms amplifying what is left), so its tolerance is measured on each run: a control file is written
  with the same edit and each edited value moved by a uniform draw within half a quantization step of its
  type before quantizing (fresh rounding noise, about 1.4x the real file's), its max |logit difference|
  from the same hook ablation is measured, and the tolerance is CONTROL_FACTOR times it (at least the
  float32 tolerance). A random direction is no control: on the demo's Q4_1 file a direction from its
  layer 1 moved the logits 17.4 where a random one moved them 5.6.
"""
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hooks.ops import unit as unit_vector
from tlrefusal import __version__, artifacts
from tlrefusal.chat_templates import ChatTemplate
from tlrefusal.errors import TlrefusalError
from tlrefusal.export.gguf_file import (
    DEFAULT_FALLBACK,
    REQUANTIZABLE,
    ROW_CHUNK_BYTES,
    GGUFFile,
    GGUFTensor,
    TensorOut,
    check_row_length,
    copied,
    dequantize_rows,
    qtype,
    quantize_rows,
    quantized,
    read_gguf,
    row_step,
    write_gguf,
)
from tlrefusal.export.record import ExportDirection, ExportSeconds
from tlrefusal.export.verify import LOGIT_TOLERANCE, VERIFY_PLACEMENT, Verification, VerifyMode, verify_export
from tlrefusal.export.weights import TIED_EMBEDDINGS, PlanRules, TiedEmbeddings, orthogonalize_tensor
from tlrefusal.export.weights_check import WEIGHT_TOLERANCE, edit_measures
from tlrefusal.model import ModelSource
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.publish import staged_files

if TYPE_CHECKING:
    from tlrefusal.chat import ChatOptions

# tolerance = this x the fresh-noise control's max |logit difference|. The control's noise is about 1.4x the
# written file's, yet one draw scatters: the written file's gap over the control's ranged 0.36-1.68 over
# seeds on the tiny test models, so 3 leaves room above the worst seen.
CONTROL_FACTOR = 3.0
CONTROL_SEED = 0
RECORD_SUFFIX = ".orthogonalization.json"  # the record beside OUT.gguf: OUT.orthogonalization.json
OUTPUT = "output.weight"


def record_path(out: Path) -> Path:
    return out.with_name(out.stem + RECORD_SUFFIX)


@dataclass(frozen=True)
class GGUFEdit:
    """One residual writer: its d_model axis in torch order, its stored type and the type written."""

    name: str
    axis: int
    source_type: str
    written_type: str


@dataclass(frozen=True)
class GGUFPlan(PlanRules):
    """What orthogonalizing a GGUF file edits (`untie`: an output.weight is added; see `PlanRules`)."""

    architecture: str
    d_model: int
    n_layers: int
    edits: dict[str, GGUFEdit]
    # What the export does with a tied unembedding (the source has no output.weight); None if untied.
    tied_embeddings: TiedEmbeddings | None
    post_norms: tuple[str, ...]


def gguf_plan(file: GGUFFile, tied_embeddings: TiedEmbeddings = "untie", fallback_type: str = DEFAULT_FALLBACK,
              edited_type: str | None = None) -> GGUFPlan:
    """Name every residual writer of the GGUF file through the gguf package's tensor names, with its axis
    and the type it is written in: `edited_type` if given, else its own where the gguf package can quantize
    it, else `fallback_type`. One-line errors for an architecture the gguf package does not know, one with
    experts or without an attention output and FFN down projection in every block, and a type that cannot
    be written or cannot hold a tensor's rows."""
    import gguf

    if tied_embeddings not in TIED_EMBEDDINGS:
        raise TlrefusalError(f"unknown tied-embeddings mode {tied_embeddings!r}; choose from "
                             f"{', '.join(TIED_EMBEDDINGS)}")
    fallback_type = _writable("--gguf-fallback-type", fallback_type)
    edited_type = None if edited_type is None else _writable("--gguf-edited-type", edited_type)
    arch = file.metadata.get("general.architecture")
    known = {name: kind for kind, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in known:
        raise TlrefusalError(f"{file.path.name}: unknown GGUF architecture {arch!r} (the gguf package "
                             f"{_gguf_version()} names no tensors for it)")
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    n_layers, d_model = file.metadata.get(f"{arch}.block_count"), file.metadata.get(f"{arch}.embedding_length")
    if not isinstance(n_layers, int) or not isinstance(d_model, int):
        raise TlrefusalError(f"{file.path.name} has no {arch}.block_count or {arch}.embedding_length")

    def present(kind, bid: int | None = None, suffix: str = "weight") -> str | None:
        name = f"{names[kind].format(bid=bid)}.{suffix}"
        return name if name in file.tensors else None

    def in_any_block(kind) -> bool:
        return any(present(kind, bid) for bid in range(n_layers))

    supported = "supported: dense decoders whose blocks have one attention output and one FFN down projection"
    if in_any_block(T.FFN_DOWN_EXP) or in_any_block(T.FFN_DOWN_SHEXP):
        raise TlrefusalError(f"cannot orthogonalize {arch}: its FFN is a mixture of experts ({supported})")
    if in_any_block(T.SSM_OUT):
        raise TlrefusalError(f"cannot orthogonalize {arch}: its blocks also write to the stream through a "
                             f"state-space layer (ssm_out; {supported})")
    wanted = [(T.TOKEN_EMBD, None, "weight", 1), (T.POS_EMBD, None, "weight", 1)]
    for bid in range(n_layers):
        for kind in (T.ATTN_OUT, T.FFN_DOWN):
            wanted += [(kind, bid, "weight", 0), (kind, bid, "bias", 0)]
    edits = {}
    for kind, bid, suffix, axis in wanted:
        name = present(kind, bid, suffix)
        required = suffix == "weight" and kind != T.POS_EMBD
        if name is None:
            if required:
                raise TlrefusalError(f"cannot orthogonalize {arch}: {file.path.name} has no "
                                     f"{names[kind].format(bid=bid)}.weight ({supported})")
            continue
        tensor = file.tensors[name]
        axis = 0 if len(tensor.shape) == 1 else axis
        if tensor.shape[axis] != d_model:
            raise TlrefusalError(f"{name} has shape {tensor.shape}, not d_model={d_model} along its output axis")
        if len(tensor.shape) == 1:  # biases stay float, as llama.cpp keeps every 1-D tensor
            written = tensor.type_name if tensor.type_name in ("F32", "F16", "BF16") else "F32"
        else:
            written = edited_type or (tensor.type_name if tensor.type_name in REQUANTIZABLE else fallback_type)
        check_row_length(name, written, tensor.shape[-1])
        edits[name] = GGUFEdit(name, axis, tensor.type_name, written)
    # Norms between a writer and the stream: after each output projection (Gemma-2/3), after the
    # embedding (BLOOM), or post-LN blocks (Grok, BERT-style): no weight edit equals ablation there.
    post_norms = tuple(names[kind].format(bid="*") for kind in (T.ATTN_POST_NORM, T.FFN_POST_NORM,
                                                                T.ATTN_OUT_NORM, T.LAYER_OUT_NORM)
                       if in_any_block(kind))
    post_norms += (names[T.TOKEN_EMBD_NORM],) if present(T.TOKEN_EMBD_NORM) else ()
    tied = OUTPUT not in file.tensors
    if tied_embeddings == "shared" and not tied:
        raise TlrefusalError(f"--tied-embeddings shared: {file.path.name} has its own {OUTPUT}, so there is no "
                             "shared matrix to edit; drop the option")
    return GGUFPlan(architecture=arch, d_model=d_model, n_layers=n_layers, edits=edits,
                    tied_embeddings=tied_embeddings if tied else None, post_norms=post_norms)


def _writable(option: str, type_name: str) -> str:
    if type_name.upper() not in REQUANTIZABLE:
        raise TlrefusalError(f"{option} {type_name}: choose one the gguf package can write "
                             f"({', '.join(REQUANTIZABLE)})")
    return type_name.upper()


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _edited(file: GGUFFile, edit: GGUFEdit, unit: torch.Tensor, advance,
            dither: np.random.Generator | None = None) -> Callable[[], np.ndarray]:
    """The edited float32 values of one writer: dequantized into one buffer and edited in place. `dither`
    (the verification's control): each value then moves by a uniform draw within half a quantization step
    of its written type (`quantization_steps`), so its quantization rounds afresh."""
    def values() -> np.ndarray:
        weight = torch.from_numpy(file.read_float(file.tensors[edit.name]))
        if weight.ndim == 1:
            weight = orthogonalize_tensor(weight, unit, 0)
        else:
            orthogonalize_tensor(weight, unit, edit.axis, block_bytes=ROW_CHUNK_BYTES, inplace=True)
        array = weight.numpy()
        if dither is not None:
            rows = array.reshape(-1, array.shape[-1])
            step = row_step(rows.shape[-1])
            for start in range(0, len(rows), step):
                piece = rows[start:start + step]
                piece += (dither.random(piece.shape, dtype=np.float32) - 0.5) * quantization_steps(
                    piece, edit.written_type)
        advance(1)
        return array

    return values


def orthogonalized_tensors(file: GGUFFile, plan: GGUFPlan, unit: torch.Tensor, advance,
                           dither: np.random.Generator | None = None) -> list[TensorOut]:
    """The output file's tensors in the source's order: writers edited, the rest copied, and after the token
    embedding its original bytes as output.weight when a tied unembedding is untied. `dither`: see `_edited`."""
    embed = gguf_name("TOKEN_EMBD")
    tensors = []
    for tensor in file.tensors.values():
        edit = plan.edits.get(tensor.name)
        tensors.append(copied(file, tensor) if edit is None else
                       quantized(tensor.name, edit.written_type, tensor.shape,
                                 _edited(file, edit, unit, advance, dither)))
        if tensor.name == embed and plan.untie:
            tensors.append(copied(file, tensor, OUTPUT))
    return tensors


def gguf_name(kind: str, bid: int | None = None, suffix: str = "weight") -> str:
    """A tensor's GGUF name by its gguf.MODEL_TENSOR kind (TOKEN_EMBD, ATTN_OUT, ...)."""
    import gguf

    return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=bid)}.{suffix}"


# --- verification -------------------------------------------------------------------------------------------

class _FloatRows:
    """A GGUF file seen as float32 rows, in the shape `weights_check.edit_measures` reads (`spec`, `read_rows`)."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        return "F32", self.file.tensors[name].shape

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self.file.tensors[name]
        if len(tensor.shape) == 1:
            rows = dequantize_rows(self.file.read_bytes(tensor), tensor.type_name, tensor.shape[-1])
            return torch.from_numpy(rows.reshape(-1)[start:stop].copy())
        rows = dequantize_rows(self.file.read_bytes(tensor, start, stop), tensor.type_name, tensor.shape[-1])
        return torch.from_numpy(rows)


# Quantization step of a block, by format (ggml's definitions): Q8_0 and Q4_0/Q5_0 store d = amax / levels
# (signed), Q4_1/Q5_1 store d = (max - min) / levels and the minimum. Rounding moves a value by at most half a
# step; clipping at the top of Q4_0/Q5_0's range and the float16 rounding of the scale by less than one more
# half step. So each value of the requantized edit lies within one step of the float edit.
_STEPS = {"Q8_0": ("amax", 127), "Q4_0": ("amax", 8), "Q5_0": ("amax", 16), "Q4_1": ("range", 15),
          "Q5_1": ("range", 31)}
# Values of an edited tensor allowed to differ from the quantization of the edit recomputed here in float64:
# the writer edits in float32, so a value whose float edit lies within float32 rounding of a rounding
# boundary may land on the neighbouring code, and a block whose float16 scale rounds the other way differs
# in all its values. Measured on the demo's Q4_1 file against a random direction: at most 2e-4 of a
# tensor's values (one or two blocks); an unedited or wrongly edited tensor: about 0.95.
MAX_MISMATCH = 1e-3


# The rounding step of a float type relative to a value's magnitude (its unit in the last place).
_FLOAT_ULP = {"F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7}


def quantization_steps(rows: np.ndarray, type_name: str) -> np.ndarray:
    """The quantization step of `type_name` at each value of `rows` [n, row length] (float32): its block's
    step for block types (`_STEPS`), its own last-place unit for float types."""
    if type_name not in _STEPS:
        return np.abs(rows) * np.float32(_FLOAT_ULP[type_name])
    import gguf

    measure, levels = _STEPS[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype(type_name)]
    blocks = rows.reshape(len(rows), -1, block)
    scale = np.abs(blocks).max(axis=2) if measure == "amax" else blocks.max(axis=2) - blocks.min(axis=2)
    return np.repeat(scale / np.float32(levels), block, axis=1).astype(np.float32)


def quantization_bound(file: GGUFFile, tensor: GGUFTensor, type_name: str) -> float:
    """The largest relative Frobenius error |Q(W) - W| / |W| that quantizing the values of `tensor` to
    `type_name` can make: one step per value for block types, the rounding tolerance for float types."""
    if type_name not in _STEPS:
        return WEIGHT_TOLERANCE.get(type_name, WEIGHT_TOLERANCE["F16"])
    step_sq = value_sq = 0.0
    for _, rows in file.iter_float_rows(tensor):
        step_sq += float((quantization_steps(rows, type_name).astype(np.float64) ** 2).sum())
        value_sq += float((rows.astype(np.float64) ** 2).sum())
    return float(np.sqrt(step_sq / value_sq)) if value_sq else 0.0


def requantization_mismatch(source: GGUFFile, written: GGUFFile, name: str, axis: int, unit: torch.Tensor,
                            type_name: str) -> float:
    """The fraction of values of the written tensor that differ from Q(W - r_hat r_hat^T W), the edit
    recomputed here in float64 from the dequantized source W and quantized to `type_name` by the gguf
    package: 0 when the file holds exactly the quantized edit. Unlike the Frobenius error, this separates an
    edited tensor from an unedited one even at 4 bits, where the edit is smaller than a quantization step."""
    src, out = source.tensors[name], written.tensors[name]
    r = unit.to(torch.float64).numpy()
    axis = 1 if len(src.shape) == 1 else axis  # a bias is one row along d_model
    if axis == 0:  # r_hat^T W needs every row first
        proj = sum((r[start:start + len(rows)] @ rows.astype(np.float64)
                    for start, rows in source.iter_float_rows(src)), np.zeros(src.shape[-1]))
    differ = total = 0
    for start, rows in source.iter_float_rows(src):
        w = rows.astype(np.float64)
        ref = w - np.outer(w @ r, r) if axis == 1 else w - np.outer(r[start:start + len(w)], proj)
        mine = dequantize_rows(written.read_bytes(out, start, start + len(w)), out.type_name, out.shape[-1])
        expected = dequantize_rows(quantize_rows(ref.astype(np.float32), type_name), type_name, ref.shape[-1])
        differ += int((expected != mine).sum())
        total += expected.size
    return differ / total if total else 0.0


@dataclass(frozen=True)
class GGUFWeightsCheck:
    """The written file against its source: metadata and untouched tensors byte-equal, edited tensors within
    their written type's quantization error of the edit (`quantization_bound`)."""

    n_edited: int
    n_unedited: int
    # As weights_check: |r_hat^T W'| / (|W'| / sqrt(d_model)), ~1 for an unedited tensor. Reported, not
    # bounded: requantizing rounds part of an edit smaller than a step back (about half of it at 4 bits).
    max_residual: float
    max_edit_error: float  # |W' - (W - r_hat r_hat^T W)| / |W|, W the dequantized source
    max_bound_ratio: float  # max over edited tensors of the edit error / its type's bound
    max_mismatch: float  # max over edited tensors of block types of `requantization_mismatch`
    # (float types are held to WEIGHT_TOLERANCE on both the residual and the edit error instead)
    failures: tuple[str, ...]
    n_failed: int
    passed: bool

    def to_json(self) -> dict:
        return {"mode": "weights", "n_edited": self.n_edited, "n_unedited": self.n_unedited,
                "max_residual": self.max_residual, "max_edit_error": self.max_edit_error,
                "max_bound_ratio": self.max_bound_ratio, "max_mismatch": self.max_mismatch,
                "failures": list(self.failures), "n_failed": self.n_failed, "passed": self.passed}


def check_gguf_weights(source: GGUFFile, written: GGUFFile, plan: GGUFPlan, unit: torch.Tensor,
                       progress: Progress = NO_PROGRESS) -> GGUFWeightsCheck:
    """Check the written file against the source (see GGUFWeightsCheck); `unit` is used in float64."""
    unit = unit.to(torch.float64)
    failures = [f"metadata {key}: missing or changed" for key, raw in source.raw_metadata.items()
                if written.raw_metadata.get(key) != raw]
    failures += [f"metadata {key}: not in the source" for key in set(written.raw_metadata) - set(source.raw_metadata)]
    added = {OUTPUT: gguf_name("TOKEN_EMBD")} if plan.untie else {}
    expected = list(source.tensors) + list(added)
    failures += [f"{name}: missing from the written file" for name in expected if name not in written.tensors]
    failures += [f"{name}: not in the source" for name in written.tensors if name not in expected]
    src_rows, out_rows = _FloatRows(source), _FloatRows(written)
    residuals, errors, ratios, mismatches, n_unedited = [0.0], [0.0], [0.0], [0.0], 0
    names = [name for name in expected if name in written.tensors]
    with progress.task("Checking the written tensors", total=len(names)) as advance:
        for name in names:
            out, src = written.tensors[name], source.tensors[added.get(name, name)]
            edit = plan.edits.get(name)
            if out.shape != src.shape:
                failures.append(f"{name}: shape {out.shape}, the source's is {src.shape}")
            elif edit is None:
                n_unedited += 1
                if out.type_name != src.type_name or written.read_bytes(out) != source.read_bytes(src):
                    failures.append(f"{name}: not edited, yet differs from the source's {src.name}")
            elif out.type_name != edit.written_type:
                failures.append(f"{name}: written as {out.type_name}, planned {edit.written_type}")
            else:
                residual, error = edit_measures(src_rows, out_rows, name, edit.axis, unit)
                bound = quantization_bound(source, src, edit.written_type)
                residuals.append(residual)
                errors.append(error)
                ratios.append(error / bound if bound else float("inf"))
                if edit.written_type in _STEPS:  # block types: the written values are Q(the edit), value by value
                    mismatch = requantization_mismatch(source, written, name, edit.axis, unit, edit.written_type)
                    mismatches.append(mismatch)
                    if not (error <= bound and mismatch <= MAX_MISMATCH):  # NaN fails too
                        failures.append(f"{name} ({edit.written_type}): edit error {error:.3g} (bound {bound:.3g}), "
                                        f"{mismatch:.2%} of values not the quantized edit")
                elif not (error <= bound and residual <= bound):  # float types: as `weights_check` bounds them
                    failures.append(f"{name} ({edit.written_type}): residual along r {residual:.3g}, edit error "
                                    f"{error:.3g} (tolerance {bound:.3g})")
            advance(1)
    return GGUFWeightsCheck(n_edited=sum(name in plan.edits for name in names), n_unedited=n_unedited,
                            max_residual=max(residuals), max_edit_error=max(errors), max_bound_ratio=max(ratios),
                            max_mismatch=max(mismatches),
                            failures=tuple(failures[:10]), n_failed=len(failures), passed=not failures)


# --- the record and the transaction -------------------------------------------------------------------------

@dataclass(frozen=True)
class TypeChange:
    name: str
    source_type: str
    written_type: str


@dataclass(frozen=True)
class GGUFExportRecord:
    """OUT.orthogonalization.json: what a GGUF export edited, the types it changed and how it was checked."""

    tool_version: str
    source: Path
    out: Path
    direction: ExportDirection
    architecture: str
    exact: bool
    tied_embeddings: TiedEmbeddings | None
    edited_tensors: tuple[str, ...]
    type_changes: tuple[TypeChange, ...]
    added_tensors: tuple[str, ...]
    fallback_type: str
    source_bytes: int
    written_bytes: int
    verify: VerifyMode
    weights: GGUFWeightsCheck | None
    # The edit written in float32, against hook ablation at the float32 tolerance: checks the plan (every
    # writer, its axis) with no quantization in the way. None: not run (--verify weights|none, or the
    # written file's edited tensors are float32 already, so `logits` is that check).
    exact_check: Verification | None
    logits: Verification | None  # the written file (transformers) against hook ablation of the source
    control: Verification | None  # the fresh-noise control that set `logits.tolerance`
    seconds: ExportSeconds

    def to_json(self) -> dict:
        return {"tool_version": self.tool_version, "format": "gguf", "source": str(self.source),
                "out": str(self.out), "direction": self.direction.to_json(), "architecture": self.architecture,
                "exact": self.exact, "tied_embeddings": self.tied_embeddings,
                "edited_tensors": list(self.edited_tensors),
                "type_changes": [vars(c) for c in self.type_changes], "added_tensors": list(self.added_tensors),
                "fallback_type": self.fallback_type, "source_bytes": self.source_bytes,
                "written_bytes": self.written_bytes, "verify": str(self.verify),
                "weights": None if self.weights is None else self.weights.to_json(),
                "exact_check": None if self.exact_check is None else self.exact_check.to_json(),
                "logits": None if self.logits is None else self.logits.to_json(),
                "control": None if self.control is None else self.control.to_json(),
                "control_factor": CONTROL_FACTOR, "seconds": self.seconds.to_json()}


@dataclass(frozen=True)
class GGUFExportResult:
    out: Path
    record: GGUFExportRecord


HF_TO_GGUF = ("no converter from safetensors to GGUF installs from PyPI (the gguf package ships none); export a "
              "folder (--out DIR) and convert it with llama.cpp's convert_hf_to_gguf.py DIR --outtype q8_0, or pass "
              "the model as a .gguf file with --model")


def require_gguf_model(spec: str, cache_dir: Path | None = None) -> None:
    """A GGUF --out needs a .gguf model: checked on what the user typed, before anything is downloaded."""
    if spec.lower().endswith(".gguf"):
        return
    if spec == "smollm2":
        from tlrefusal.demo import demo_gguf_path

        demo = demo_gguf_path(cache_dir)
        raise TlrefusalError(f"smollm2 is the demo's dequantized Hugging Face folder; for a GGUF pass its own Q4_1 "
                             f"file: --model {demo}")
    raise TlrefusalError(f"{spec} is not a .gguf file: {HF_TO_GGUF}")


def check_gguf_out(source_file: Path, out: Path, force: bool) -> None:
    if out.resolve() == source_file.resolve():
        raise TlrefusalError(f"--out {out} is the source model file; choose another file")
    if out.is_dir():
        raise TlrefusalError(f"--out {out} is a folder; a GGUF export is one file (OUT.gguf)")
    for path in (out, record_path(out)):
        if path.exists() and not force:
            raise TlrefusalError(f"{path} exists; choose another --out or pass --force")


def export_gguf(source: ModelSource, direction: artifacts.RefusalDirection, direction_file: Path, out: Path, *,
                approximate: bool = False, tied_embeddings: TiedEmbeddings = "untie",
                fallback_type: str = DEFAULT_FALLBACK, edited_type: str | None = None,
                verify: str | bool | VerifyMode = "full",
                force: bool = False, chat_template: ChatTemplate | None = None,
                chat_options: "ChatOptions | None" = None,
                placement: Placement = VERIFY_PLACEMENT, progress: Progress = NO_PROGRESS) -> GGUFExportResult:
    """Orthogonalize the GGUF `source` against `direction` into the GGUF file `out` (and its record beside
    it). Raises TlrefusalError, leaving nothing new at `out`, for bad input or a failed verification."""
    started = time.perf_counter()
    verify = VerifyMode.parse(verify)
    if verify.kind == "layers":
        raise TlrefusalError("--verify layers:K cuts Hugging Face folders; verify a GGUF file with full, "
                             "weights or none")
    if source.gguf_file is None:
        raise TlrefusalError(f"{source.spec} is a Hugging Face folder: {HF_TO_GGUF}")
    source_file = source.path / source.gguf_file
    check_gguf_out(source_file, out, force)
    file = read_gguf(source_file)
    plan = gguf_plan(file, tied_embeddings, fallback_type, edited_type)
    plan.check(direction.vector.shape, plan.d_model, plan.architecture, approximate)
    unit = unit_vector(direction.vector.to(torch.float64)).to(torch.float32)
    with staged_files([out, record_path(out)]) as staging:
        t = time.perf_counter()
        written_path = staging / out.name
        _write(file, plan, unit, written_path, "Orthogonalizing GGUF tensors", progress)
        write_seconds, verify_seconds = time.perf_counter() - t, None
        weights = exact = logits = control = None
        if verify.kind != "none":
            t = time.perf_counter()
            weights = check_gguf_weights(file, read_gguf(written_path), plan, unit, progress)
            if not weights.passed:
                raise TlrefusalError(f"verification failed (weights): {weights.n_failed} problems, e.g. "
                                     f"{weights.failures[0]}; nothing was written to {out}")
            if verify.kind == "full":
                exact, control, logits = _verify_logits(source, file, plan, direction, staging, written_path,
                                                        chat_template, chat_options, placement, progress)
                if exact is not None and not exact.passed and plan.exact:
                    raise TlrefusalError(f"verification failed: the edit written in float32 differs from hook "
                                         f"ablation by {exact.max_abs_logit_diff:.3g} > {exact.tolerance:.3g} (a "
                                         f"residual writer of {plan.architecture} is not edited, or edited wrongly); "
                                         f"nothing was written to {out}")
                if not logits.passed and plan.exact:
                    raise TlrefusalError(f"verification failed: max |logit difference| from hook ablation "
                                         f"{logits.max_abs_logit_diff:.3g} > tolerance {logits.tolerance:.3g} "
                                         f"({CONTROL_FACTOR:g} x the fresh-noise control's "
                                         f"{control.max_abs_logit_diff:.3g}); nothing was written to {out}")
            verify_seconds = round(time.perf_counter() - t, 2)
        changes = tuple(TypeChange(e.name, e.source_type, e.written_type) for e in plan.edits.values()
                        if e.source_type != e.written_type)
        record = GGUFExportRecord(
            tool_version=__version__, source=source_file.resolve(), out=out.resolve(),
            direction=ExportDirection.of(direction, direction_file), architecture=plan.architecture,
            exact=plan.exact, tied_embeddings=plan.tied_embeddings, edited_tensors=tuple(plan.edits),
            type_changes=changes, added_tensors=(OUTPUT,) if plan.untie else (),
            fallback_type=fallback_type.upper(), source_bytes=source_file.stat().st_size,
            written_bytes=written_path.stat().st_size, verify=verify, weights=weights, exact_check=exact,
            logits=logits, control=control, seconds=ExportSeconds(write=round(write_seconds, 2), verify=verify_seconds,
                                                   total=round(time.perf_counter() - started, 2)))
        artifacts.write_json(staging / record_path(out).name, record.to_json())
    return GGUFExportResult(out, record)


def _write(file: GGUFFile, plan: GGUFPlan, unit: torch.Tensor, path: Path, what: str, progress: Progress,
           dither: np.random.Generator | None = None) -> None:
    with progress.task(what, total=len(plan.edits)) as advance:
        write_gguf(path, file.version, file.alignment, list(file.raw_metadata.values()),
                   orthogonalized_tensors(file, plan, unit, advance, dither))


def _verify_logits(source: ModelSource, file: GGUFFile, plan: GGUFPlan, direction: artifacts.RefusalDirection,
                   staging: Path, written: Path, chat_template: ChatTemplate | None,
                   chat_options: "ChatOptions | None", placement: Placement,
                   progress: Progress) -> tuple[Verification | None, Verification, Verification]:
    """(exact, control, logits): the edit written in float32 against the float32 tolerance (None when the
    written file is already float32 throughout its edits), the fresh-noise control, then the written file
    with the tolerance the control sets. Each extra file is written, measured and deleted."""
    unit = unit_vector(direction.vector.to(torch.float64)).to(torch.float32)
    common = dict(placement=placement, edited_unembedding=plan.edits_unembedding, chat_template=chat_template,
                  chat_options=chat_options, progress=progress)

    def measure(path: Path, tolerance: float) -> Verification:
        return verify_export(source, ModelSource(path.name, "gguf", staging, gguf_file=path.name), direction,
                             tolerance=tolerance, **common)

    exact = None
    if any(e.written_type != "F32" for e in plan.edits.values()):
        exact_plan = replace(plan, edits={n: replace(e, written_type="F32") for n, e in plan.edits.items()})
        exact_path = staging / f"exact-{written.name}"
        _write(file, exact_plan, unit, exact_path, "Writing the edit in float32 (the exactness check)", progress)
        exact = measure(exact_path, LOGIT_TOLERANCE[torch.float32])
        exact_path.unlink()
    control_path = staging / f"control-{written.name}"
    _write(file, plan, unit, control_path, "Writing the control (fresh quantization noise)", progress,
           dither=np.random.default_rng(CONTROL_SEED))
    control = measure(control_path, float("inf"))
    control_path.unlink()
    tolerance = max(LOGIT_TOLERANCE[torch.float32], CONTROL_FACTOR * control.max_abs_logit_diff)
    return exact, control, measure(written, tolerance)
