"""`--verify weights`: check the written tensors themselves, one bounded piece at a time, loading no model.

For every tensor the plan edits, read back from the export's safetensors:
- its component along the direction, |r_hat^T W'| taken along the tensor's d_model axis (the axis its
  writer uses: rows of an embedding, the output axis of a projection, the whole of a bias), relative to
  |W'| / sqrt(d_model), the size of the component along a typical direction; about 1 for a tensor left
  unedited, and about the dtype's rounding for an orthogonalized one;
- its distance from the edit recomputed here from the source, |W' - (W - r_hat r_hat^T W)| / |W|
  (Frobenius norms, float64), so a tensor orthogonal to r but otherwise wrong (zeroed, say) fails too.
Every other tensor must be byte-for-byte the source's (the added untied unembedding: the source's
embedding), and the export must hold exactly the source's tensors (plus that unembedding).

Tensors are read in pieces of at most CHUNK_BYTES of their first axis, so memory stays below one tensor.
What it does not check: that the plan names every residual writer (`weights.weight_plan`, tested against
hook ablation) or that transformers loads the folder; `--verify full` and `layers:K` check those.
"""
import math
from dataclasses import dataclass

import torch

from tlrefusal.export.checkpoint import SAFETENSORS_DTYPES, Checkpoint, ShardReader, read_checkpoint
from tlrefusal.export.weights import WeightPlan
from tlrefusal.progress import NO_PROGRESS, Progress

CHUNK_BYTES = 16 << 20  # bytes of one piece read from a shard
# Largest residual and edit error accepted, by stored dtype. The edit is computed in float32 (float64 for
# float64 weights) and rounded once to the stored dtype, so both measures are about that rounding: on the
# demo model (d_model 576) in bfloat16, residual 0.0031 and edit error 0.0016, about 0.4 and 0.2 eps; the
# tolerance is 2 eps, as a short bias's residual scatters more. In float32 the float32 dot products add
# error that grows like sqrt(d_model): residual 4.8e-7 and edit error 3.2e-8 on the demo model, so 3e-5
# leaves room up to d_model ~ 10^5. A tensor left unedited has a residual of about 1.
WEIGHT_TOLERANCE = {"BF16": 2 ** -6, "F16": 2 ** -9, "F32": 3e-5, "F64": 1e-12}
_MAX_LISTED = 10  # failures named in the record


@dataclass(frozen=True)
class WeightsCheck:
    """What `check_weights` measured; `passed` means every tensor was within tolerance or byte-equal."""

    n_edited: int
    n_unedited: int
    max_residual: float  # max over edited tensors of |r_hat^T W'| / (|W'| / sqrt(d_model))
    max_edit_error: float  # max over edited tensors of |W' - (W - r_hat r_hat^T W)| / |W|
    tolerances: dict[str, float]  # safetensors dtype of the edited tensors -> tolerance
    failures: tuple[str, ...]  # the first few tensors that failed, and why
    n_failed: int
    passed: bool

    def to_json(self) -> dict:
        return {"mode": "weights", "n_edited": self.n_edited, "n_unedited": self.n_unedited,
                "max_residual": self.max_residual, "max_edit_error": self.max_edit_error,
                "tolerances": self.tolerances, "failures": list(self.failures), "n_failed": self.n_failed,
                "passed": self.passed}

    @classmethod
    def from_json(cls, data: dict) -> "WeightsCheck":
        return cls(n_edited=data["n_edited"], n_unedited=data["n_unedited"], max_residual=data["max_residual"],
                   max_edit_error=data["max_edit_error"], tolerances=dict(data["tolerances"]),
                   failures=tuple(data["failures"]), n_failed=data["n_failed"], passed=data["passed"])


def check_weights(source: Checkpoint, out_folder, plan: WeightPlan, unit_dir: torch.Tensor,
                  progress: Progress = NO_PROGRESS) -> WeightsCheck:
    """Check every tensor of the export in `out_folder` against the source checkpoint (see the module doc).

    `unit_dir` is the normalised direction; it is used in float64.
    """
    unit_dir = unit_dir.to(torch.float64)
    exported = read_checkpoint(out_folder)
    src_at, out_at = _readers(source), _readers(exported)
    added = {plan.unembed_key: plan.embed_key} if plan.untie and plan.unembed_key not in src_at else {}
    expected = set(src_at) | set(added)
    failures = [f"{name}: missing from the export" for name in sorted(expected - set(out_at))]
    failures += [f"{name}: not in the source" for name in sorted(set(out_at) - expected)]
    residuals, errors, tolerances, n_unedited = [0.0], [0.0], {}, 0
    names = sorted(expected & set(out_at))
    with progress.task("Checking the written tensors", total=len(names)) as advance:
        for name in names:
            original = added.get(name, name)
            src, out = src_at[original], out_at[name]
            if src.spec(original) != out.spec(name):
                failures.append(f"{name}: {out.spec(name)} but the source has {src.spec(original)}")
            elif name in plan.edits:
                dtype = out.spec(name)[0]
                tolerance = tolerances.setdefault(dtype, WEIGHT_TOLERANCE.get(dtype, 1e-3))
                residual, error = edit_measures(src, out, name, plan.edits[name], unit_dir)
                residuals.append(residual)
                errors.append(error)
                if not (residual <= tolerance and error <= tolerance):  # NaN fails too
                    failures.append(f"{name}: residual along r {residual:.3g}, edit error {error:.3g} "
                                    f"(tolerance {tolerance:.3g})")
            else:
                n_unedited += 1
                if not _same_bytes(src, original, out, name):
                    failures.append(f"{name}: not edited, yet differs from the source's {original}")
            advance(1)
    n_edited = sum(name in plan.edits for name in names)
    return WeightsCheck(n_edited=n_edited, n_unedited=n_unedited, max_residual=max(residuals),
                        max_edit_error=max(errors), tolerances=tolerances, failures=tuple(failures[:_MAX_LISTED]),
                        n_failed=len(failures), passed=not failures)


def edit_measures(src: ShardReader, out: ShardReader, name: str, axis: int, unit_dir: torch.Tensor
                  ) -> tuple[float, float]:
    """(|r_hat^T W'| / (|W'| / sqrt(d_model)), |W' - (W - r_hat r_hat^T W)| / |W|) of one tensor, in float64.

    `axis` is the tensor's d_model axis: 0 for a bias and for a projection stored [d_model, d_in], 1 for an
    embedding [n, d_model] and a Conv1D projection [d_in, d_model]. Pieces are rows of the first axis.
    """
    _, shape = out.spec(name)
    r = unit_dir
    proj_sq = out_sq = src_sq = err_sq = 0.0
    if axis == 0 and len(shape) == 2:  # r_hat^T W needs every row first: one pass over the source for it
        src_proj = sum((r[a:b] @ src.read_rows(name, a, b).double() for a, b in _pieces(src, name)),
                       torch.zeros(shape[1], dtype=torch.float64))
        out_proj = torch.zeros(shape[1], dtype=torch.float64)
    for a, b in _pieces(src, name):
        w, w_out = src.read_rows(name, a, b).double(), out.read_rows(name, a, b).double()
        if len(shape) == 1:  # a bias: one vector along d_model
            out_proj = w_out @ r
            expected = w - (w @ r) * r
        elif axis == 1:  # rows along d_model: W' = W - (W r_hat) r_hat^T
            proj_sq += ((w_out @ r) ** 2).sum().item()
            expected = w - torch.outer(w @ r, r)
        else:  # columns along d_model: W' = W - r_hat (r_hat^T W), rows a..b of it
            out_proj += r[a:b] @ w_out
            expected = w - torch.outer(r[a:b], src_proj)
        out_sq += (w_out ** 2).sum().item()
        src_sq += (w ** 2).sum().item()
        err_sq += ((w_out - expected) ** 2).sum().item()
    if len(shape) == 1 or axis == 0:
        proj_sq = (out_proj ** 2).sum().item()
    d_model = r.shape[0]
    residual = math.sqrt(proj_sq) / (math.sqrt(out_sq) / math.sqrt(d_model)) if out_sq else 0.0
    error = math.sqrt(err_sq) / math.sqrt(src_sq) if src_sq else math.sqrt(err_sq)
    return residual, error


def _pieces(reader: ShardReader, name: str) -> list[tuple[int, int]]:
    """Row ranges of the first axis of at most CHUNK_BYTES each (a whole 0-D or 1-D tensor is one piece)."""
    dtype, shape = reader.spec(name)
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    row = math.prod(shape[1:]) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    step = max(1, CHUNK_BYTES // max(row, 1))
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _same_bytes(src: ShardReader, src_name: str, out: ShardReader, out_name: str) -> bool:
    return all(a == b for a, b in zip(src.iter_bytes(src_name, CHUNK_BYTES), out.iter_bytes(out_name, CHUNK_BYTES),
                                      strict=True))


def _readers(checkpoint: Checkpoint) -> dict[str, ShardReader]:
    """Tensor name -> the reader of its shard (one reader per shard: a header each, no tensor data)."""
    readers = {shard: ShardReader(checkpoint.folder / shard) for shard in checkpoint.shards}
    return {name: readers[shard] for shard, names in checkpoint.shards.items() for name in names}
