"""Every file name tlrefusal writes, atomic writes of artifacts, and direction files.

RUN/
  config.json                  the resolved ExtractConfig (a re-run with another config is refused)
  manifest.json                versions, model source and the folder it was loaded from, data hashes
  prompts.json                 sampled splits with each prompt's baseline refusal log-odds and kept flag
  mean_activations.safetensors harmful / harmless means [n_pos, n_layer, d_model], float64
  candidates.safetensors       candidate directions r_i^(l) [n_pos, n_layer, d_model], float64
  selection.json               every candidate's bypass / induce / KL and filter reason; the choice
  selection_journal/rank*.jsonl  each candidate's scores as it was scored, per process (`tlrefusal.journal`)
  direction.safetensors        the chosen raw r (float64) with layer, position and model as metadata
  plots/selection.png          heatmaps of bypass / induce / KL over (position, layer)
  demo_summary.json            (`tlrefusal demo`) held-out refusal under each intervention, the export's check
  orthogonalized/              (`tlrefusal demo`) the orthogonalized model, a Hugging Face folder
  eval/                        (`tlrefusal eval`) completions/, scores.json, loss.json, coherence.json,
                               magnitude.json (one per step, reused while its inputs match), report.json,
                               report.md, plots/, compare.*
  report.md                    (`tlrefusal run`) the whole run in one page: selection, evaluation, export

An exported checkpoint holds the Hugging Face files (config.json, model*.safetensors, the index) plus
orthogonalization.json and README.md; an organism folder holds organism.json, README.md and
self_instruct_prompts.json beside its weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlrefusal.errors import TlrefusalError
from tlrefusal.publish import atomic_file

if TYPE_CHECKING:  # torch and safetensors load on first use, so the file names here import light (`--help`)
    import torch

CONFIG = "config.json"
MANIFEST = "manifest.json"
PROMPTS = "prompts.json"
MEANS = "mean_activations.safetensors"
CANDIDATES = "candidates.safetensors"
SELECTION = "selection.json"
DIRECTION = "direction.safetensors"
PLOT = "plots/selection.png"
SELECTION_JOURNAL = "selection_journal"  # a folder; `--force` clears it with the files below
ALL_FILES = (CONFIG, MANIFEST, PROMPTS, MEANS, CANDIDATES, SELECTION, DIRECTION, PLOT)
DEMO_SUMMARY = "demo_summary.json"
ORTHOGONALIZED = "orthogonalized"

# RUN/eval/ (`tlrefusal eval`)
EVAL_DIR = "eval"
COMPLETIONS_DIR = "completions"
# One file per evaluation step after generation, each with the key of what decided it (`tlrefusal.steps`).
EVAL_SCORES = "scores.json"  # refusal and safety scores of every completion set (the judge)
EVAL_LOSS = "loss.json"  # CE loss
EVAL_COHERENCE = "coherence.json"  # lm-eval coherence
EVAL_MAGNITUDE = "magnitude.json"  # the magnitude study
RUN_REPORT = "report.md"  # (`tlrefusal run`) at the run folder's top
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
EVAL_PLOTS_DIR = "plots"
REFUSAL_PLOT = "refusal.png"
PROJECTION_PLOT = "projection_vs_refusal.png"

# A Hugging Face checkpoint (what `tlrefusal orthogonalize` reads and writes)
HF_CONFIG = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
EXPORT_RECORD = "orthogonalization.json"
MODEL_CARD = "README.md"

# An organism folder (`tlrefusal organism`)
ORGANISM_CARD = "organism.json"
SELF_INSTRUCT_PROMPTS = "self_instruct_prompts.json"

DIRECTION_FORMAT = "tlrefusal.direction/1"


def write_json(path: Path, data) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8"))


def write_text(path: Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TlrefusalError(f"cannot read {path}: {exc}") from exc


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file whose bytes depend only on the tensors and metadata (`canonical_safetensors`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = canonical_safetensors(save(tensors, metadata=metadata))
    return atomic_file(path, lambda tmp: tmp.write_bytes(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header written in one fixed order.

    safetensors writes the header's metadata from a hash map with a per-process random seed, so the same
    direction saved by two processes (or twice) gave different bytes. Here the metadata is sorted by key and
    the tensors follow in data order; the data and its offsets are unchanged.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    return atomic_file(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


@dataclass(frozen=True)
class RefusalDirection:
    """The chosen direction: raw r (not normalised) at `layer`, from post-instruction `position`."""

    vector: torch.Tensor
    layer: int
    position: int
    model: str

    def save(self, path: Path) -> Path:
        import torch

        meta = {"format": DIRECTION_FORMAT, "layer": str(self.layer), "position": str(self.position),
                "model": self.model, "d_model": str(self.vector.shape[-1]),
                "norm": f"{self.vector.norm().item():.6g}"}
        return write_tensors(path, {"direction": self.vector.to(torch.float64)}, meta)

    @classmethod
    def load(cls, path: Path) -> "RefusalDirection":
        """Load a direction file written by `save`; anything else gets a one-line error."""
        from safetensors import SafetensorError, safe_open

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


def load_direction(path: Path | str, layer: int | None = None, position: int | None = None) -> RefusalDirection:
    """A run's chosen direction, or with `layer` and `position` any candidate the run scored.

    `path` is a run folder or a direction file. Users pick layers by hand too: a candidate is usable when
    selection scored it (layers the layer filter drops are never scored), whether or not a filter then
    discarded it. A direction file holds one direction, so `layer`/`position` need a run folder.
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    if layer is None and position is None:
        return RefusalDirection.load(path)
    if layer is None or position is None:
        raise TlrefusalError("--layer and --position go together")
    if not (path.is_dir() and (path / SELECTION).is_file() and (path / CANDIDATES).is_file()):
        raise TlrefusalError(f"--layer/--position pick a candidate of a run folder; {path} is not a run "
                             f"folder with {SELECTION} and {CANDIDATES}")
    scored = {(c["position"], c["layer"]): c for c in read_json(path / SELECTION)["candidates"]}
    entry = scored.get((position, layer))
    if entry is None or entry["bypass_score"] is None:
        usable = sorted({c["layer"] for c in scored.values() if c["bypass_score"] is not None})
        positions = sorted({c["position"] for c in scored.values()})
        raise TlrefusalError(f"the run scored no candidate at position {position}, layer {layer} (positions "
                             f"{positions}; scored layers {usable[0]}-{usable[-1]})" if usable else
                             f"the run scored no candidate at position {position}, layer {layer}")
    with safe_open(str(path / CANDIDATES), framework="pt") as f:
        positions = [int(p) for p in (f.metadata() or {})["positions"].split(",")]
        vector = f.get_tensor("candidates")[positions.index(position), layer].clone()
    model = read_json(path / CONFIG)["config"]["model"]
    return RefusalDirection(vector=vector.to(torch.float64), layer=layer, position=position, model=model)
