"""The run folder: every file name in one place, atomic writes, and direction files.

RUN/
  config.json                  the resolved ExtractConfig (a re-run with another config is refused)
  manifest.json                versions, model source and the folder it was loaded from, data hashes
  prompts.json                 sampled splits with each prompt's baseline refusal log-odds and kept flag
  mean_activations.safetensors harmful / harmless means [n_pos, n_layer, d_model], float64
  candidates.safetensors       candidate directions r_i^(l) [n_pos, n_layer, d_model], float64
  selection.json               every candidate's bypass / induce / KL and filter reason; the choice
  direction.safetensors        the chosen raw r (float64) with layer, position and model as metadata
  plots/selection.png          heatmaps of bypass / induce / KL over (position, layer)
"""
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tlrefusal.errors import TlrefusalError

CONFIG = "config.json"
MANIFEST = "manifest.json"
PROMPTS = "prompts.json"
MEANS = "mean_activations.safetensors"
CANDIDATES = "candidates.safetensors"
SELECTION = "selection.json"
DIRECTION = "direction.safetensors"
PLOT = "plots/selection.png"
ALL_FILES = (CONFIG, MANIFEST, PROMPTS, MEANS, CANDIDATES, SELECTION, DIRECTION, PLOT)

DIRECTION_FORMAT = "tlrefusal.direction/1"


def _atomic(path: Path, write) -> Path:
    """Write through a temporary file in the same folder, then rename: never a half-written artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8"))


def write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TlrefusalError(f"cannot read {path}: {exc}") from exc


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise TlrefusalError(f"cannot read {path}: {exc}") from exc


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (direction files, for provenance and reuse checks)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_instructions(run_dir: Path) -> set[str]:
    """Every instruction the run sampled (train and val, kept or filtered): evaluation holds them out."""
    return {p["instruction"] for rows in read_json(run_dir / PROMPTS).values() for p in rows}


def write_plot(path: Path, figure) -> Path:
    return _atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


@dataclass(frozen=True)
class RefusalDirection:
    """The chosen direction: raw r (not normalised) at `layer`, from post-instruction `position`."""

    vector: torch.Tensor
    layer: int
    position: int
    model: str

    def save(self, path: Path) -> Path:
        meta = {"format": DIRECTION_FORMAT, "layer": str(self.layer), "position": str(self.position),
                "model": self.model, "d_model": str(self.vector.shape[-1]),
                "norm": f"{self.vector.norm().item():.6g}"}
        return write_tensors(path, {"direction": self.vector.to(torch.float64)}, meta)

    @classmethod
    def load(cls, path: Path) -> "RefusalDirection":
        """Load a direction file written by `save`; anything else gets a one-line error."""
        if path.is_dir():
            path = path / DIRECTION
        if not path.is_file():
            raise TlrefusalError(f"no direction file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != DIRECTION_FORMAT or "direction" not in f.keys():
                    raise TlrefusalError(f"{path} is not a tlrefusal direction file")
                vector = f.get_tensor("direction")
        except (OSError, SafetensorError) as exc:
            raise TlrefusalError(f"{path} is not a readable safetensors file: {exc}") from exc
        return cls(vector=vector, layer=int(meta["layer"]), position=int(meta["position"]), model=meta["model"])
