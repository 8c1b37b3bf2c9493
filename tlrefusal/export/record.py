"""The export record: what an orthogonalized checkpoint was made from and how it was checked.

Written beside the weights as orthogonalization.json (`artifacts.EXPORT_RECORD`); `ExportRecord.to_json`
gives exactly that file's content and `from_json` reads it back (the demo reuses an export whose direction
file has the same sha256).
"""
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.export.verify import Verification, VerifyMode
from tlrefusal.export.weights import TiedEmbeddings
from tlrefusal.export.weights_check import WeightsCheck
from tlrefusal.model import ModelSource


@dataclass(frozen=True)
class ExportDirection:
    """The direction projected out, and the file its vector was read from.

    `file` is a run's direction.safetensors, a direction file, or, for a candidate picked by layer and
    position, the run's candidates.safetensors (`layer` and `position` then say which candidate).
    """

    file: Path  # resolved
    sha256: str
    layer: int
    position: int
    model: str
    norm: float  # |r| of the raw direction (it is normalised before the edit)
    # The run's --quantize (nf4, int8): the direction came from a bitsandbytes load of the model, while the
    # export edits its full-precision checkpoint. None: a full-precision run, or a direction file of no run.
    quantize: str | None = None

    @classmethod
    def of(cls, direction: artifacts.RefusalDirection, file: Path) -> "ExportDirection":
        return cls(file=file.resolve(), sha256=artifacts.file_sha256(file), layer=direction.layer,
                   position=direction.position, model=direction.model, norm=direction.vector.norm().item(),
                   quantize=run_quantize(file))

    def to_json(self) -> dict:
        quantize = {} if self.quantize is None else {"quantize": self.quantize}
        return {"file": str(self.file), "sha256": self.sha256, "layer": self.layer, "position": self.position,
                "model": self.model, "norm": self.norm, **quantize}

    @classmethod
    def from_json(cls, data: dict) -> "ExportDirection":
        return cls(file=Path(data["file"]), sha256=data["sha256"], layer=data["layer"],
                   position=data["position"], model=data["model"], norm=data["norm"], quantize=data.get("quantize"))


def run_quantize(direction_file: Path) -> str | None:
    """The --quantize of the run a direction (or candidates) file belongs to, from the run's config.json."""
    config = direction_file.parent / artifacts.CONFIG
    if not config.is_file():
        return None
    data = artifacts.read_json(config)
    run_config = data.get("config") if isinstance(data, dict) else None
    return run_config.get("quantize") if isinstance(run_config, dict) and "model" in run_config else None


@dataclass(frozen=True)
class ExportSeconds:
    """Wall-clock seconds, rounded to 0.01: writing the weights, verifying (None if skipped), in all."""

    write: float
    total: float
    verify: float | None = None

    def to_json(self) -> dict:
        verify = {} if self.verify is None else {"verify": self.verify}
        return {"write": self.write, **verify, "total": self.total}

    @classmethod
    def from_json(cls, data: dict) -> "ExportSeconds":
        return cls(write=data["write"], total=data["total"], verify=data.get("verify"))


@dataclass(frozen=True)
class ExportRecord:
    """orthogonalization.json: source, direction, edited tensors, verification numbers, seconds."""

    tool_version: str
    source: ModelSource  # its path resolved: the folder the weights were read from
    direction: ExportDirection
    model_type: str
    exact: bool  # no norm between a writer and the stream: the weights equal the verification's reference
    approximate: bool  # --approximate was passed
    post_norms: tuple[str, ...]
    # --tied-embeddings as applied: "untie" or "shared" (the unembedding edited too), None when the source's
    # embeddings are not tied (the option had nothing to do).
    tied_embeddings: TiedEmbeddings | None
    edited_tensors: tuple[str, ...]  # sorted checkpoint names
    checkpoint_bytes: int
    tensor_bytes_written: int
    # --verify and what it measured: a logit comparison (full, layers:K), a WeightsCheck (weights), None (none).
    verification: Verification | WeightsCheck | None
    seconds: ExportSeconds
    verify: VerifyMode = VerifyMode("full")

    def to_json(self) -> dict:
        return {
            "tool_version": self.tool_version, "source": self.source.to_json(),
            "direction": self.direction.to_json(), "model_type": self.model_type, "exact": self.exact,
            "approximate": self.approximate, "post_norms": list(self.post_norms),
            "tied_embeddings": self.tied_embeddings, "edited_tensors": list(self.edited_tensors),
            "checkpoint_bytes": self.checkpoint_bytes, "tensor_bytes_written": self.tensor_bytes_written,
            "verify": str(self.verify),
            "verification": None if self.verification is None else self.verification.to_json(),
            "seconds": self.seconds.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "ExportRecord":
        s, check = data["source"], data["verification"]
        # Records before --verify took a mode: a verification was a full one, its absence --no-verify.
        verify = VerifyMode.parse(data.get("verify", "full" if check is not None else "none"))
        return cls(
            tool_version=data["tool_version"],
            source=ModelSource.from_json(s),
            direction=ExportDirection.from_json(data["direction"]), model_type=data["model_type"],
            exact=data["exact"], approximate=data["approximate"], post_norms=tuple(data["post_norms"]),
            tied_embeddings=_tied_embeddings(data), edited_tensors=tuple(data["edited_tensors"]),
            checkpoint_bytes=data["checkpoint_bytes"], tensor_bytes_written=data["tensor_bytes_written"],
            verification=None if check is None else
            WeightsCheck.from_json(check) if verify.kind == "weights" else Verification.from_json(check),
            seconds=ExportSeconds.from_json(data["seconds"]), verify=verify,
        )

    @property
    def untied_embeddings(self) -> bool:
        """The export stores the original matrix as its own unembedding (equal to hook ablation)."""
        return self.tied_embeddings == "untie"

    @property
    def hook_equivalent(self) -> bool:
        """The exported weights compute what hook ablation of the source computes (its verification's claim)."""
        return self.exact and self.tied_embeddings != "shared"


def _tied_embeddings(data: dict) -> TiedEmbeddings | None:
    """The mode of a record; records written before the option existed said only "untied_embeddings"."""
    if "tied_embeddings" in data:
        return data["tied_embeddings"]
    return "untie" if data["untied_embeddings"] else None
