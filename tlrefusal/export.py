"""Write a weight-orthogonalized Hugging Face checkpoint, shard by shard, and verify it against hooks.

OUT/
  config.json                    the source's, with tie_word_embeddings false when the export unties
  model*.safetensors (+ index)   sharded like the source; every residual writer orthogonalized
  tokenizer files, chat template, generation config and any other small file of the source
  orthogonalization.json         source, direction, edited tensors, verification numbers, seconds
  README.md                      a model card saying the same in prose

Streaming: each output shard is written by `write_safetensors_streaming`, which lays out the header from
the source's shapes and dtypes first and then writes one tensor at a time, so peak memory is about the
largest tensor (in float32, a few copies), not the model or a shard. The source is never modified; the
output is assembled in a temporary folder beside `--out` and renamed into place only after verification.
"""
import json
import math
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tlrefusal import __version__, artifacts
from tlrefusal.cache import publish_dir, staging_dir
from tlrefusal.errors import TlrefusalError
from tlrefusal.model import ModelSource
from tlrefusal.orthogonalize import WeightPlan, orthogonalize_tensor, weight_plan
from tlrefusal.progress import NO_PROGRESS, Progress

RECORD = "orthogonalization.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a source folder that are weights (never copied; pickles are never even opened) or replaced.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_REPLACED = {INDEX_FILE, "README.md", RECORD, "config.json"}

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

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an output shard: its header entry and how to produce its values when written."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=_DTYPES[self.dtype]).element_size()


def write_safetensors_streaming(path: Path, tensors: list[TensorSpec], metadata: dict[str, str]) -> int:
    """Write a safetensors file one tensor at a time; returns the bytes of tensor data written.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets of
    every tensor, padded with spaces to a multiple of 8), then the tensors' bytes in header order.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in tensors:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in tensors:
            tensor = spec.produce()
            if _DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: produced {tensor.dtype} {tuple(tensor.shape)}, header says "
                                 f"{spec.dtype} {spec.shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


class ShardReader:
    """Reads a safetensors file one tensor at a time with plain file reads.

    safetensors' own `safe_open` maps the file into memory, and every page it touches stays resident until
    the file is closed, so streaming a single-file checkpoint through it would hold the whole file. Here
    each tensor is read into its own buffer, which is freed once the tensor has been written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TlrefusalError(f"{path} is not a readable safetensors file: {exc}") from exc
        self.data_start = 8 + size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {"format": "pt"}
        self.entries: dict[str, dict] = header
        unknown = {e["dtype"] for e in header.values()} - set(_DTYPES)
        if unknown:
            raise TlrefusalError(f"{path} holds tensors of unsupported dtypes {sorted(unknown)}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.entries[name]
        return entry["dtype"], tuple(entry["shape"])

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self.spec(name)
        begin, end = self.entries[name]["data_offsets"]
        buffer = bytearray(end - begin)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise TlrefusalError(f"{self.path} is truncated (tensor {name})")
        if not buffer:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        return torch.frombuffer(buffer, dtype=_DTYPES[dtype]).reshape(shape)


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
    index = None
    if (folder / INDEX_FILE).is_file():
        index = artifacts.read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise TlrefusalError(f"{folder / INDEX_FILE} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        pickles = [p.name for p in folder.glob("*.bin")]
        hint = f" (it has {pickles[0]}: tlrefusal never loads pickled weights)" if pickles else ""
        raise TlrefusalError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    shards = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise TlrefusalError(f"shard {name} listed in {INDEX_FILE} is missing from {folder}")
        shards[name] = ShardReader(path).keys()
    if index is not None:
        listed = {k for k, shard in index["weight_map"].items()}
        missing = listed - {k for names in shards.values() for k in names}
        if missing:
            raise TlrefusalError(f"{len(missing)} tensors listed in {INDEX_FILE} are in no shard, e.g. {min(missing)}")
    return Checkpoint(folder, shards, index)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    record: dict


def orthogonalize_direction(direction_path: Path, out: Path, model: str | None = None, cache_dir: Path | None = None,
                            **options) -> ExportResult:
    """`tlrefusal orthogonalize`: a run folder or direction file, and the model (default: the direction's)."""
    from tlrefusal.model import resolve_source

    direction = artifacts.RefusalDirection.load(direction_path)
    direction_file = direction_path / artifacts.DIRECTION if direction_path.is_dir() else direction_path
    source = resolve_source(model or direction.model, cache_dir, options.get("progress", NO_PROGRESS))
    return export_orthogonalized(source, direction, direction_file, out, **options)


def export_orthogonalized(
    source: ModelSource,
    direction: artifacts.RefusalDirection,
    direction_file: Path,
    out: Path,
    approximate: bool = False,
    verify: bool = True,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ExportResult:
    """Orthogonalize every residual writer of `source` against `direction` and write a checkpoint to `out`.

    Raises TlrefusalError (leaving nothing at `out`) for bad input or a failed verification.
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    if source.gguf_file:
        raise TlrefusalError(f"{source.gguf_file} is a GGUF file; orthogonalize needs a Hugging Face folder with "
                             "safetensors weights (the demo model's dequantized folder is used for 'demo')")
    _check_out(source.path, out, force)
    checkpoint = read_checkpoint(source.path)
    plan = weight_plan(source.path, checkpoint.keys, trust_remote_code)
    if direction.vector.shape != (plan.d_model,):
        raise TlrefusalError(f"the direction has shape {tuple(direction.vector.shape)}, but the model's residual "
                             f"stream has width {plan.d_model}: it was extracted from another model")
    if not plan.exact and not approximate:
        raise TlrefusalError(f"{plan.model_type} puts a norm ({', '.join(plan.post_norms)}) between each output "
                             "projection and the residual stream, so orthogonalized weights cannot equal hook "
                             "ablation; pass --approximate to export anyway and record the measured gap")

    staging = staging_dir(out)
    try:
        t = time.perf_counter()
        tensor_bytes = _write_weights(checkpoint, plan, direction.vector, staging, progress)
        _copy_other_files(source.path, staging, untie=plan.tied)
        seconds["write"] = time.perf_counter() - t
        check = None
        if verify:
            t = time.perf_counter()
            check = verify_export(source, staging, direction, trust_remote_code, progress)
            seconds["verify"] = time.perf_counter() - t
            if not check["passed"] and plan.exact:
                raise TlrefusalError(
                    f"verification failed: max |logit difference| {check['max_abs_logit_diff']:.3g} > tolerance "
                    f"{check['tolerance']:.3g}, greedy continuations equal {check['greedy_equal']}/"
                    f"{check['n_prompts']}; nothing was written to {out}")
        seconds["total"] = time.perf_counter() - started
        record = {
            "tool_version": __version__,
            "source": source.to_json(),
            "direction": {"file": str(direction_file.resolve()), "sha256": artifacts.file_sha256(direction_file),
                          "layer": direction.layer, "position": direction.position, "model": direction.model,
                          "norm": direction.vector.norm().item()},
            "model_type": plan.model_type, "exact": plan.exact, "approximate": approximate,
            "post_norms": list(plan.post_norms), "untied_embeddings": plan.tied,
            "edited_tensors": sorted(plan.edits), "checkpoint_bytes": checkpoint.nbytes,
            "tensor_bytes_written": tensor_bytes, "verification": check,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        artifacts.write_json(staging / RECORD, record)
        (staging / "README.md").write_text(_model_card(record), encoding="utf-8")
        if out.exists():  # --force: replace only now that the new checkpoint is complete
            shutil.rmtree(out)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, record)


def _check_out(source_dir: Path, out: Path, force: bool) -> None:
    src, dst = source_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise TlrefusalError(f"--out {out} overlaps the source model folder {source_dir}; choose another folder")
    if out.exists() and not out.is_dir():
        raise TlrefusalError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TlrefusalError(f"--out {out} is not empty; choose another folder or pass --force")


def _write_weights(checkpoint: Checkpoint, plan: WeightPlan, vector: torch.Tensor, staging: Path,
                   progress: Progress) -> int:
    """Write every shard of the source with the plan's edits; add the untied unembedding beside the embedding."""
    from hooks.ops import unit

    unit_dir = unit(vector.to(torch.float64))
    weight_map: dict[str, str] = {}
    written = 0
    add_unembed = plan.tied and plan.unembed_key not in checkpoint.keys
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
        artifacts.write_json(staging / INDEX_FILE, index)
    return written


def _producer(reader: ShardReader, name: str, axis: int | None, unit_dir: torch.Tensor, advance
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
    config = artifacts.read_json(source_dir / "config.json")
    if untie:
        # The unembedding keeps the original matrix (hook ablation never touches it), so it is stored apart.
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    artifacts.write_json(staging / "config.json", config)


@torch.inference_mode()
def verify_export(source: ModelSource, folder: Path, direction: artifacts.RefusalDirection,
                  trust_remote_code: bool = False, progress: Progress = NO_PROGRESS, n_tokens: int = 16) -> dict:
    """Compare the exported folder, loaded with plain `transformers`, with the source under ablation hooks.

    For each prompt of VERIFY_PROMPTS: greedy continuations of `n_tokens` from both, and the largest
    |logit difference| over every position of the prompt plus the exported model's continuation.
    """
    from transformers import AutoModelForCausalLM

    from hooks import ablation_hooks
    from tlrefusal.chat import ChatFormat
    from tlrefusal.generation import until_stop
    from tlrefusal.model import DTYPES, load_model

    config = artifacts.read_json(folder / "config.json")
    dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype_name = dtype_name if dtype_name in DTYPES else "float32"
    dtype = DTYPES[dtype_name]
    hooked = load_model(source, dtype=dtype_name, trust_remote_code=trust_remote_code, progress=progress)
    with progress.task(f"Loading the export from {folder.name} with plain transformers", total=None):
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    chat = ChatFormat.from_tokenizer(hooked.tokenizer)
    hooks = ablation_hooks(direction.vector, hooked.n_layers)
    stops = list(chat.stop_ids)
    max_diff, greedy_equal, examples = 0.0, 0, []
    with progress.task("Verifying the export against hook ablation", total=len(VERIFY_PROMPTS)) as advance:
        for prompt in VERIFY_PROMPTS:
            ids, mask = chat.encode([prompt])
            mine = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, do_sample=False,
                                  pad_token_id=hooked.tokenizer.pad_token_id, eos_token_id=stops)
            with hooked.bridge.hooks(fwd_hooks=hooks):
                theirs = hooked.bridge.generate(ids, attention_mask=mask, max_new_tokens=n_tokens, do_sample=False,
                                                stop_at_eos=True, eos_token_id=stops, return_type="tokens",
                                                verbose=False)
                full = torch.ones_like(mine)
                hooked_logits = hooked.bridge(mine, attention_mask=full).float()
            plain_logits = plain(input_ids=mine, attention_mask=full).logits.float()
            max_diff = max(max_diff, (hooked_logits - plain_logits).abs().max().item())
            a, b = until_stop(mine[0, ids.shape[1]:].tolist(), stops), until_stop(theirs[0, ids.shape[1]:].tolist(), stops)
            greedy_equal += a == b
            examples.append({"prompt": prompt, "export": hooked.tokenizer.decode(a, skip_special_tokens=True),
                             "hooks": hooked.tokenizer.decode(b, skip_special_tokens=True)})
            advance(1)
    tolerance = LOGIT_TOLERANCE.get(dtype, 1e-3)
    return {"dtype": dtype_name, "n_prompts": len(VERIFY_PROMPTS), "n_tokens": n_tokens,
            "max_abs_logit_diff": max_diff, "tolerance": tolerance, "greedy_equal": greedy_equal,
            "passed": max_diff <= tolerance, "examples": examples}


def _model_card(record: dict) -> str:
    d, check = record["direction"], record["verification"]
    if check is None:
        verified = "Not verified (`--no-verify`)."
    else:
        verified = (f"Reloaded with plain `transformers` and compared with the source under directional-ablation "
                    f"hooks (TransformerLens) on {check['n_prompts']} chat prompts, {check['dtype']}: max |logit "
                    f"difference| {check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:.3g}); greedy "
                    f"continuations of {check['n_tokens']} tokens equal for {check['greedy_equal']} of "
                    f"{check['n_prompts']}.")
    gap = ("" if record["exact"] else
           f"\n**Approximate**: this architecture puts norms ({', '.join(record['post_norms'])}) between the output "
           "projections and the residual stream, so these weights do not equal hook ablation; the gap is above.\n")
    untied = ("The source ties its unembedding to the embedding; this export unties them, and `lm_head` keeps the "
              "original matrix, as hook ablation does.\n" if record["untied_embeddings"] else "")
    return f"""# {Path(record['source']['loaded_from']).name}, refusal direction orthogonalized

Written by tlrefusal {record['tool_version']}: every tensor that writes to the residual stream (embeddings,
attention and MLP output projections, their biases; {len(record['edited_tensors'])} tensors) had the refusal
direction projected out, W' = W - r r^T W (Arditi et al. 2024, Appendix E). It is meant for research
on refusal; it will follow harmful instructions.

- source: `{record['source']['spec']}` ({record['model_type']})
- direction: layer {d['layer']}, position {d['position']}, norm {d['norm']:.4g}, `{d['file']}` (sha256 {d['sha256'][:16]}...)
{untied}{gap}
## Verification
{verified}
"""
