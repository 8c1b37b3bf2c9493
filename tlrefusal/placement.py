"""Where and how a model's weights are loaded: one device or a map over several, dtype, quantization.

`Placement` is what `--device`, `--dtype`, `--device-map`, `--max-memory`, `--offload-folder` and
`--quantize` say, checked before anything is loaded or written. A device map goes to transformers'
`from_pretrained(device_map=...)` (accelerate places the modules and moves activations between them) and
the dispatched model is handed to the TransformerBridge as it is: it is never `.to()`-moved. Light to
import: torch and transformers load only when a placement is turned into loading arguments.
"""
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tlrefusal.errors import TlrefusalError
from tlrefusal.precision import DTYPE_CHOICES

DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZE_CHOICES = ("nf4", "int8")
OFFLOAD_TARGETS = ("cpu", "disk")
MIXED_MAP_ERROR = ("the device map puts some modules on a GPU and others on cpu/disk; TransformerLens 4.3 "
                   "refuses such maps: put every module on a GPU (add GPUs or lower the batch size), or every "
                   "one on cpu/disk")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class Placement:
    device: str = "cpu"  # auto, cpu, cuda, cuda:N: the whole model on one device (unused with a device map)
    dtype: str = "float32"  # auto (the checkpoint's own), float32, bfloat16, float16
    device_map: str | None = None  # auto, balanced, balanced_low_0, sequential, or a JSON file {module: device}
    max_memory: str | None = None  # per-device budget for the map, e.g. "0=70GiB,1=70GiB"
    offload_folder: str | None = None  # where a map's "disk" modules are kept
    quantize: str | None = None  # nf4 or int8 through bitsandbytes: extraction and hooked evaluation only
    # Under torchrun: GPUs per model replica; local rank k uses GPUs k*K .. k*K+K-1 (`for_local_rank`).
    gpus_per_replica: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise TlrefusalError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPE_CHOICES)})")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise TlrefusalError(f"unknown --quantize '{self.quantize}' (choose from {', '.join(QUANTIZE_CHOICES)})")
        if self.gpus_per_replica < 1:
            raise TlrefusalError(f"--gpus-per-replica must be at least 1, got {self.gpus_per_replica}")
        if self.max_memory is not None and self.device_map is None:
            raise TlrefusalError("--max-memory budgets a device map: give --device-map too")
        if self.offload_folder is not None and self.device_map is None:
            raise TlrefusalError("--offload-folder holds a device map's disk modules: give --device-map too")
        if self.device_map is not None:
            targets = self.map_targets()
            if "disk" in targets and self.offload_folder is None:
                raise TlrefusalError("the device map puts modules on disk: give --offload-folder DIR for them")
            if _mixes_gpu_and_offload(targets):
                raise TlrefusalError(MIXED_MAP_ERROR)
        self.memory_budget()  # parse errors now, before anything loads

    @property
    def dispatched(self) -> bool:
        """True if accelerate places the model (a device map), False for one device."""
        return self.device_map is not None

    def map_targets(self) -> set[str]:
        """The devices an explicit map file names ("cpu", "disk", "cuda:0", ...); for a named strategy, the
        devices `--max-memory` budgets (empty if it gives none)."""
        if self.device_map in DEVICE_MAP_NAMES:
            return {_target(k) for k in self.memory_budget()}
        return {_target(v) for v in read_device_map(self.device_map).values()}

    def memory_budget(self) -> dict[int | str, str]:
        """--max-memory as accelerate wants it: {0: "70GiB", "cpu": "100GiB"}."""
        if self.max_memory is None:
            return {}
        budget: dict[int | str, str] = {}
        for item in self.max_memory.split(","):
            key, sep, amount = item.strip().partition("=")
            if not sep or not _MEMORY.match(amount.strip()):
                raise TlrefusalError(f"--max-memory expects DEVICE=AMOUNT pairs like 0=70GiB,cpu=100GiB, got {item!r}")
            key = key.strip()
            if not (key.isdigit() or key in OFFLOAD_TARGETS or key == "mps"):
                raise TlrefusalError(f"--max-memory: unknown device {key!r} (a GPU index, cpu or disk)")
            budget[int(key) if key.isdigit() else key] = amount.strip().replace(" ", "")
        return budget

    def for_local_rank(self, local_rank: int) -> "Placement":
        """The placement of one replica under torchrun: rank k takes GPUs k*K .. k*K+K-1 (K = gpus_per_replica).

        On the CPU (device cpu, no map) every rank shares the machine's memory. One GPU per replica (device
        cuda or auto): the replica's device is cuda:k, round-robin when there are more ranks than GPUs (a GPU
        given by index, cuda:N, holds every replica). Several: the named map strategy spreads the replica over
        its own GPUs only
        (accelerate places modules on the devices the budget names; a budget given per GPU index 0..K-1
        applies to each replica's own GPUs in the same order).
        """
        from tlrefusal.model import gpu_count, resolve_device

        k = self.gpus_per_replica
        if not self.dispatched:
            if k > 1:
                raise TlrefusalError("--gpus-per-replica above 1 splits each replica with a device map: give "
                                     "--device-map balanced (or auto, sequential)")
            device = resolve_device(self.device)
            if device != "cuda":  # the CPU (shared by every rank), or one GPU named by index (shared too)
                return replace(self, device=device)
            return replace(self, device=f"cuda:{local_rank % gpu_count()}")  # more ranks than GPUs: they share
        if self.device_map not in DEVICE_MAP_NAMES:
            raise TlrefusalError("under torchrun, give a named --device-map (auto, balanced, sequential), not a "
                                 "file: each replica's map is made for its own GPUs")
        given = self.memory_budget()
        foreign = sorted(str(key) for key in given if not (isinstance(key, int) and key < k))
        if foreign:
            raise TlrefusalError(f"under torchrun, --max-memory budgets each replica's own GPUs by index 0..{k - 1}; "
                                 f"{', '.join(foreign)} is not one of them")
        gpus = range(local_rank * k, local_rank * k + k)
        budget = {gpu: given[i] if i in given else _gpu_memory(gpu) for i, gpu in enumerate(gpus)}
        return replace(self, max_memory=",".join(f"{gpu}={amount}" for gpu, amount in budget.items()))

    def first_gpu(self) -> int | None:
        """The GPU index the model's inputs start on (a process's default CUDA device), None off the GPU."""
        if self.dispatched:
            gpus = sorted(k for k in self.memory_budget() if isinstance(k, int))
            return gpus[0] if gpus else None
        return int(self.device.partition(":")[2] or 0) if self.device.startswith("cuda") else None

    def load_kwargs(self) -> dict:
        """`from_pretrained` arguments for the placement, dtype aside (see `model.load_model`)."""
        kwargs: dict = {}
        if self.dispatched:
            strategy = self.device_map
            kwargs["device_map"] = strategy if strategy in DEVICE_MAP_NAMES else read_device_map(strategy)
            if self.max_memory is not None:
                kwargs["max_memory"] = self.memory_budget()
            if self.offload_folder is not None:
                kwargs["offload_folder"] = self.offload_folder
        if self.quantize is not None:
            kwargs["quantization_config"] = _quantization_config(self.quantize, self.dtype)
        return kwargs

    def to_json(self) -> dict:
        """The fields that differ from a plain one-device load (a manifest's and a config's record)."""
        data = asdict(self)
        if self.dispatched:  # the map places the model; --device is not used
            del data["device"]
        return {k: v for k, v in data.items()
                if k in ("device", "dtype") or v != Placement.__dataclass_fields__[k].default}


def read_device_map(path: str | None) -> dict[str, int | str]:
    """A JSON device map file: {"model.embed_tokens": 0, "model.layers.0": "cpu", ...}."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise TlrefusalError(f"--device-map is not {', '.join(DEVICE_MAP_NAMES)} and no file is at {path}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TlrefusalError(f"--device-map {path} is not a JSON file: {exc}") from exc
    if not isinstance(data, dict) or not data or not all(isinstance(v, (int, str)) for v in data.values()):
        raise TlrefusalError(f"--device-map {path} must be a JSON object of module name -> device "
                             '(a GPU index, "cpu" or "disk")')
    return data


def _target(device: int | str) -> str:
    """A map's or a budget's device, named as torch does ("cuda:0" for 0, "cpu", "disk")."""
    if isinstance(device, int) or str(device).isdigit():
        return f"cuda:{device}"
    return str(device)


def _mixes_gpu_and_offload(targets: set[str]) -> bool:
    return any(t.startswith("cuda") for t in targets) and any(t in OFFLOAD_TARGETS for t in targets)


def check_realized_map(hf_device_map: dict | None) -> None:
    """Refuse the map accelerate made (a named strategy may spill onto cpu/disk) if it mixes GPUs with
    offload: TransformerLens would refuse it with a longer message."""
    if _mixes_gpu_and_offload({_target(v) for v in (hf_device_map or {}).values()}):
        raise TlrefusalError(MIXED_MAP_ERROR)


def _gpu_memory(index: int) -> str:
    """90% of a GPU's memory, as a --max-memory amount (a replica's share when the user gave none): the rest
    is left for activations, as accelerate's own default leaves some."""
    import torch

    from tlrefusal.model import gpu_count

    if index >= gpu_count():
        raise TlrefusalError(f"--gpus-per-replica needs GPU {index}, and torch sees {gpu_count()} GPU(s)")
    return f"{torch.cuda.get_device_properties(index).total_memory * 9 // 10 // 2**20}MiB"


def _quantization_config(kind: str, dtype: str):
    """A bitsandbytes config for transformers; a one-line error when bitsandbytes is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TlrefusalError("--quantize needs bitsandbytes: pip install 'tlrefusal[quantize]'")
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
