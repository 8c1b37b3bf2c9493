"""The export transaction: check the input, write every shard with its residual writers orthogonalized,
copy the source's other files, verify (`--verify full|layers:K|weights|none`), record, and publish `out`
only if all of that succeeded.

The output is assembled in a temporary folder beside `out` (`tlrefusal.publish.staged_folder`); bad input,
a failed verification or an interrupt leaves nothing new at `out`, and the source is never modified.
"""
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tlrefusal import __version__, artifacts
from tlrefusal.chat import ChatOptions, run_options, run_template
from tlrefusal.chat_templates import ChatTemplate
from tlrefusal.errors import TlrefusalError
from tlrefusal.export.card import model_card
from tlrefusal.export.checkpoint import (
    Checkpoint,
    ShardReader,
    TensorSpec,
    read_checkpoint,
    refuse_quantized,
    write_safetensors_streaming,
)
from tlrefusal.export.gguf_file import DEFAULT_FALLBACK
from tlrefusal.export.record import ExportDirection, ExportRecord, ExportSeconds
from tlrefusal.export.verify import VERIFY_PLACEMENT, Verification, VerifyMode, verify_export
from tlrefusal.export.weights import TiedEmbeddings, WeightPlan, orthogonalize_tensor, weight_plan
from tlrefusal.export.weights_check import WeightsCheck, check_weights
from tlrefusal.model import ModelSource
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Advance, Progress
from tlrefusal.publish import staged_folder

if TYPE_CHECKING:
    from tlrefusal.export.gguf_export import GGUFExportResult

# Files of a source folder that are weights (never copied; pickles are never even opened) or replaced.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
OutFormat = Literal["auto", "hf", "gguf"]
OUT_FORMATS: tuple[OutFormat, ...] = ("auto", "hf", "gguf")
_REPLACED = {artifacts.WEIGHTS_INDEX, artifacts.MODEL_CARD, artifacts.EXPORT_RECORD, artifacts.HF_CONFIG}


@dataclass(frozen=True)
class ExportResult:
    out: Path
    record: ExportRecord


def orthogonalize_direction(
    direction_path: Path | str,
    out: Path | str,
    model: str | None = None,
    cache_dir: Path | None = None,
    *,
    layer: int | None = None,
    position: int | None = None,
    placement: Placement = VERIFY_PLACEMENT,
    approximate: bool = False,
    tied_embeddings: TiedEmbeddings = "untie",
    verify: str | bool | VerifyMode = "full",
    force: bool = False,
    trust_remote_code: bool = False,
    out_format: OutFormat = "auto",
    gguf_fallback_type: str = DEFAULT_FALLBACK,
    gguf_edited_type: str | None = None,
    progress: Progress = NO_PROGRESS,
) -> "ExportResult | GGUFExportResult":
    """`tlrefusal orthogonalize`: a run folder or direction file, and the model (default: the direction's).

    `out_format` (OUT_FORMATS): "hf" writes a Hugging Face folder, "gguf" one GGUF file rewritten from a GGUF
    source (`export.gguf_export`; its K-quant tensors written as `gguf_fallback_type`, every edited tensor as
    `gguf_edited_type` if given), "auto" follows the
    suffix of `out` (.gguf: gguf).

    With `layer` and `position`, the run's candidate there (any candidate selection scored) instead of the
    chosen direction; the record then names the run's candidates file. `placement` (device or device map,
    dtype, "auto": the checkpoint's own) is that of the verification's loads, never quantized: the weights
    are read and written as stored, and a run extracted with --quantize exports its full-precision model.
    `verify`: "full", "layers:K", "weights" or "none" (True/False: full/none), see `VerifyMode`.
    """
    from tlrefusal.model import resolve_source

    verify = VerifyMode.parse(verify)  # a bad mode or placement fails before the model is fetched
    _full_precision(placement)
    direction_path, out = Path(direction_path), Path(out)
    out_format = resolve_format(out_format, out)
    if out_format == "hf" and (gguf_edited_type is not None or gguf_fallback_type.upper() != DEFAULT_FALLBACK):
        raise TlrefusalError("--gguf-fallback-type and --gguf-edited-type apply to a GGUF --out (FILE.gguf)")
    direction = artifacts.load_direction(direction_path, layer, position)
    if layer is not None:  # load_direction checked that a candidate comes from a run folder
        direction_file = direction_path / artifacts.CANDIDATES
    else:
        direction_file = direction_path / artifacts.DIRECTION if direction_path.is_dir() else direction_path
    if out_format == "gguf":
        from tlrefusal.export.gguf_export import require_gguf_model

        require_gguf_model(model or direction.model, cache_dir)
    source = resolve_source(model or direction.model, cache_dir, progress)
    # The verification formats its prompts with the run's chat template (a run's --chat-template).
    chat_template = run_template(direction_path) if direction_path.is_dir() else None
    chat_options = run_options(direction_path) if direction_path.is_dir() else None  # and system prompt, variables
    if out_format == "gguf":
        from tlrefusal.export.gguf_export import export_gguf

        return export_gguf(source, direction, direction_file, out, approximate=approximate,
                           tied_embeddings=tied_embeddings, fallback_type=gguf_fallback_type,
                           edited_type=gguf_edited_type, verify=verify,
                           force=force, chat_template=chat_template, chat_options=chat_options,
                           placement=placement, progress=progress)
    return export_orthogonalized(source, direction, direction_file, out, approximate=approximate,
                                 chat_template=chat_template, chat_options=chat_options,
                                 tied_embeddings=tied_embeddings, verify=verify, force=force,
                                 trust_remote_code=trust_remote_code, placement=placement, progress=progress)


def export_orthogonalized(
    source: ModelSource,
    direction: artifacts.RefusalDirection,
    direction_file: Path,
    out: Path,
    *,
    approximate: bool = False,
    tied_embeddings: TiedEmbeddings = "untie",
    chat_template: ChatTemplate | None = None,
    chat_options: ChatOptions | None = None,
    verify: str | bool | VerifyMode = "full",
    force: bool = False,
    trust_remote_code: bool = False,
    placement: Placement = VERIFY_PLACEMENT,
    progress: Progress = NO_PROGRESS,
) -> ExportResult:
    """Orthogonalize every residual writer of `source` against `direction` and write a checkpoint to `out`.

    `tied_embeddings` (`weights.TIED_EMBEDDINGS`): "untie" keeps a tied unembedding as it was (equal to hook
    ablation); "shared" edits the shared matrix as the paper's code did, and verification then compares with
    hook ablation plus that edited unembedding. `verify` (`VerifyMode`): full, layers:K, weights or none;
    `placement`: where the verification's models load. Raises TlrefusalError (leaving nothing new at `out`)
    for bad input, a pre-quantized source, or a failed verification.
    """
    started = time.perf_counter()
    verify = VerifyMode.parse(verify)
    _full_precision(placement)
    checkpoint, plan = _plan(source, direction, out, force, approximate, trust_remote_code, tied_embeddings, verify)
    with staged_folder(out, replace=force or out.exists()) as staging:
        t = time.perf_counter()
        tensor_bytes = _write_weights(checkpoint, plan, direction.vector, staging, progress)
        _copy_other_files(source.path, staging, untie=plan.untie)
        write_seconds, verify_seconds, check = time.perf_counter() - t, None, None
        if verify.kind != "none":
            t = time.perf_counter()
            check = _verify(verify, source, staging, direction, checkpoint, plan, trust_remote_code, placement,
                            chat_template, chat_options, progress)
            verify_seconds = round(time.perf_counter() - t, 2)
            # A logit gap is expected where norms sit between writers and the stream (--approximate); the
            # weights are orthogonalized there too, so a failed weights check always fails.
            if not check.passed and (plan.exact or isinstance(check, WeightsCheck)):
                raise TlrefusalError(_failure(check, out))
        seconds = ExportSeconds(write=round(write_seconds, 2), verify=verify_seconds,
                                total=round(time.perf_counter() - started, 2))
        record = ExportRecord(
            tool_version=__version__, source=ModelSource(source.spec, source.kind, source.path.resolve(),
                                                         source.gguf_file),
            direction=ExportDirection.of(direction, direction_file), model_type=plan.model_type,
            exact=plan.exact, approximate=approximate, post_norms=tuple(plan.post_norms),
            tied_embeddings=plan.tied_embeddings, edited_tensors=tuple(sorted(plan.edits)),
            checkpoint_bytes=checkpoint.nbytes, tensor_bytes_written=tensor_bytes, verification=check,
            seconds=seconds, verify=verify)
        artifacts.write_json(staging / artifacts.EXPORT_RECORD, record.to_json())
        artifacts.write_text(staging / artifacts.MODEL_CARD, model_card(record))
    return ExportResult(out, record)


def resolve_format(out_format: str, out: Path) -> OutFormat:
    """"auto" -> "gguf" for an --out ending in .gguf, else "hf"; an unknown format is a one-line error."""
    if out_format not in OUT_FORMATS:
        raise TlrefusalError(f"unknown --format {out_format!r}; choose from {', '.join(OUT_FORMATS)}")
    if out_format == "auto":
        return "gguf" if out.suffix.lower() == ".gguf" else "hf"
    return out_format


def _full_precision(placement: Placement) -> None:
    """Export never loads a quantized model: the weights are edited as stored, the verification loads them so."""
    if placement.quantize is not None:
        raise TlrefusalError(f"orthogonalize edits and verifies full-precision weights; drop --quantize "
                             f"{placement.quantize} (a direction from a quantized run exports as it is)")


def _verify(mode: VerifyMode, source: ModelSource, staging: Path, direction: artifacts.RefusalDirection,
            checkpoint: Checkpoint, plan: WeightPlan, trust_remote_code: bool, placement: Placement,
            chat_template: ChatTemplate | None, chat_options: ChatOptions | None,
            progress: Progress) -> Verification | WeightsCheck:
    if mode.kind == "weights":
        from hooks.ops import unit

        return check_weights(checkpoint, staging, plan, unit(direction.vector.to(torch.float64)), progress)
    return verify_export(source, staging, direction, trust_remote_code, progress, placement=placement,
                         layers=mode.layers, edited_unembedding=plan.edits_unembedding, chat_template=chat_template,
                         chat_options=chat_options)


def _plan(source: ModelSource, direction: artifacts.RefusalDirection, out: Path, force: bool, approximate: bool,
          trust_remote_code: bool, tied_embeddings: TiedEmbeddings, verify: VerifyMode
          ) -> tuple[Checkpoint, WeightPlan]:
    """Every check that needs no writing: the source's format (full precision), `out`, the direction's width,
    the architecture, and --verify layers:K's K."""
    if source.gguf_file:
        raise TlrefusalError(f"{source.gguf_file} is a GGUF file: write a GGUF with --out FILE.gguf, or pass a "
                             "Hugging Face folder with --model for a safetensors export")
    _check_out(source.path, out, force)
    refuse_quantized(source.path)
    checkpoint = read_checkpoint(source.path)
    plan = weight_plan(source.path, checkpoint.keys, trust_remote_code, tied_embeddings)
    plan.check(direction.vector.shape, plan.d_model, plan.model_type, approximate)
    if verify.layers is not None and verify.layers > plan.n_layers:
        raise TlrefusalError(f"--verify layers:{verify.layers}: the model has {plan.n_layers} layers (choose K from "
                             f"1 to {plan.n_layers})")
    return checkpoint, plan


def _check_out(source_dir: Path, out: Path, force: bool) -> None:
    src, dst = source_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise TlrefusalError(f"--out {out} overlaps the source model folder {source_dir}; choose another folder")
    if out.exists() and not out.is_dir():
        raise TlrefusalError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TlrefusalError(f"--out {out} is not empty; choose another folder or pass --force")


def _failure(check: Verification | WeightsCheck, out: Path) -> str:
    if isinstance(check, WeightsCheck):
        return (f"verification failed (--verify weights): {check.n_failed} tensors, e.g. {check.failures[0]}; "
                f"nothing was written to {out}")
    cut = "" if check.layers is None else f" (first {check.layers} layers)"
    return (f"verification failed{cut}: max |logit difference| {check.max_abs_logit_diff:.3g} > tolerance "
            f"{check.tolerance:.3g}, greedy continuations equal {check.greedy_equal}/{check.n_prompts}; "
            f"nothing was written to {out}")


def _write_weights(checkpoint: Checkpoint, plan: WeightPlan, vector: torch.Tensor, staging: Path,
                   progress: Progress) -> int:
    """Write every shard of the source with the plan's edits; add the untied unembedding beside the embedding.

    In "shared" mode nothing is added: the edited embedding is the unembedding too (the config stays tied)."""
    from hooks.ops import unit

    unit_dir = unit(vector.to(torch.float64))
    weight_map: dict[str, str] = {}
    written = 0
    add_unembed = plan.untie and plan.unembed_key not in checkpoint.keys
    total = sum(len(names) for names in checkpoint.shards.values())
    with progress.task("Orthogonalizing weights", total=total) as advance:
        for shard, names in checkpoint.shards.items():
            reader = ShardReader(checkpoint.folder / shard)
            specs = []
            for name in sorted(names):
                dtype, shape = reader.spec(name)
                specs.append(TensorSpec(name, dtype, shape, _producer(reader, name, plan.edits.get(name), unit_dir,
                                                                      advance)))
                if add_unembed and name == plan.embed_key:  # the original matrix, for the unembedding
                    specs.append(TensorSpec(plan.unembed_key, dtype, shape, lambda r=reader, n=name: r.read(n)))
            written += write_safetensors_streaming(staging / shard, specs, reader.metadata)
            weight_map.update({spec.name: shard for spec in specs})
    if checkpoint.index is not None:
        index = dict(checkpoint.index)
        index["metadata"] = {**index.get("metadata", {}), "total_size": written}
        index["weight_map"] = dict(sorted(weight_map.items()))
        artifacts.write_json(staging / artifacts.WEIGHTS_INDEX, index)
    return written


def _producer(reader: ShardReader, name: str, axis: int | None, unit_dir: torch.Tensor, advance: Advance
              ) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        tensor = reader.read(name)
        advance(1)
        return tensor if axis is None else orthogonalize_tensor(tensor, unit_dir, axis)

    return produce


def _copy_other_files(source_dir: Path, staging: Path, untie: bool) -> None:
    """Tokenizer, chat template, generation config, ...: every small top-level file that is not weights."""
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in _REPLACED \
                and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, staging / path.name)
    config = artifacts.read_json(source_dir / artifacts.HF_CONFIG)
    if untie:
        # The unembedding keeps the original matrix (hook ablation never touches it), so it is stored apart.
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    artifacts.write_json(staging / artifacts.HF_CONFIG, config)
