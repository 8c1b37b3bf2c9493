"""Write a weight-orthogonalized Hugging Face checkpoint, shard by shard, and verify it against hooks.

OUT/
  config.json                    the source's, with tie_word_embeddings false when the export unties
                                 (--tied-embeddings untie, the default; "shared" keeps it tied)
  model*.safetensors (+ index)   sharded like the source; every residual writer orthogonalized
  tokenizer files, chat template, generation config and any other small file of the source
  orthogonalization.json         source, direction, edited tensors, verification numbers, seconds
  README.md                      a model card saying the same in prose

Modules: `checkpoint` (the safetensors weights, streamed one tensor at a time: peak memory is about the
largest tensor in float32, a few copies, not the model or a shard), `transaction` (check, write, verify,
publish), `verify` (the exported model against hook ablation of the source, whole or cut to its first
K layers, one model in memory at a time; `VerifyMode`), `weights_check` (`--verify weights`: the written
tensors themselves, no model loaded), `weights` (which tensors are edited, and what becomes of a tied
unembedding: `TIED_EMBEDDINGS`), `record` (orthogonalization.json as typed values) and `card` (README.md).

From Python: `orthogonalize_direction(run_or_file, out, verify="full" | "layers:K" | "weights" | "none",
placement=Placement(device=..., dtype=..., device_map=...))`.
"""
from tlrefusal.artifacts import EXPORT_RECORD as RECORD
from tlrefusal.export.card import model_card
from tlrefusal.export.checkpoint import (
    SAFETENSORS_DTYPES,
    SAFETENSORS_NAMES,
    Checkpoint,
    ShardReader,
    TensorSpec,
    read_checkpoint,
    refuse_quantized,
    write_safetensors_streaming,
)
from tlrefusal.export.record import ExportDirection, ExportRecord, ExportSeconds
from tlrefusal.export.transaction import ExportResult, export_orthogonalized, orthogonalize_direction
from tlrefusal.export.verify import (
    AUTO_DTYPE,
    LOGIT_TOLERANCE,
    VERIFY_PLACEMENT,
    VERIFY_PROMPTS,
    Reference,
    Verification,
    VerifyExample,
    VerifyMode,
    verify_export,
)
from tlrefusal.export.weights import TIED_EMBEDDINGS, TiedEmbeddings
from tlrefusal.export.weights_check import WEIGHT_TOLERANCE, WeightsCheck, check_weights

__all__ = [
    "AUTO_DTYPE", "LOGIT_TOLERANCE", "RECORD", "SAFETENSORS_DTYPES", "SAFETENSORS_NAMES", "TIED_EMBEDDINGS",
    "VERIFY_PLACEMENT", "VERIFY_PROMPTS", "WEIGHT_TOLERANCE", "Checkpoint", "ExportDirection", "ExportRecord",
    "ExportResult", "ExportSeconds", "Reference", "ShardReader", "TensorSpec", "TiedEmbeddings", "Verification",
    "VerifyExample", "VerifyMode", "WeightsCheck", "check_weights", "export_orthogonalized", "model_card",
    "orthogonalize_direction", "read_checkpoint", "refuse_quantized", "verify_export", "write_safetensors_streaming",
]
