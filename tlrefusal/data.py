"""Prompt sets: local files, hub datasets by name, the built-in prompt sets (`tlrefusal.assets`); seeded sampling.

A prompt set is a list of `Prompt`s. Sources are strings:
- a path to a `.json` (a list of strings or of objects), `.jsonl`, `.csv` or `.txt` (one prompt a line) file;
- a known hub dataset name (`advbench`, `harmbench`, `jailbreakbench`, `alpaca`, `xstest`), loaded with
  `datasets` (needs the hub or its cache);
- `hf:OWNER/NAME[:SPLIT]` for any other hub dataset with a recognisable instruction column;
- a built-in prompt set's name (`tlrefusal.assets`), which needs no hub.

The file and hub readers underneath (`read_text`, `read_records` for .json/.jsonl objects, `hub_rows`)
are shared with the evaluation's text sources (`tlrefusal.evaluation.ce_data`).
"""
import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tlrefusal.assets import PROMPT_SETS, prompt_asset
from tlrefusal.errors import TlrefusalError, first_line

# Column names we accept for the instruction and the category, in order of preference.
INSTRUCTION_FIELDS = ("instruction", "prompt", "goal", "Goal", "behavior", "Behavior", "forbidden_prompt",
                      "question", "text")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory", "type")


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HubDataset:
    repo: str
    split: str
    config: str | None = None
    field: str | None = None
    category: str | None = None
    only_empty_input: bool = False  # Alpaca: the paper keeps rows whose `input` is empty


HUB_DATASETS = {
    "advbench": HubDataset("walledai/AdvBench", split="train", field="prompt"),
    "harmbench": HubDataset("walledai/HarmBench", split="train", config="standard", field="prompt",
                            category="category"),
    "jailbreakbench": HubDataset("JailbreakBench/JBB-Behaviors", split="harmful", config="behaviors",
                                 field="Goal", category="Category"),
    "alpaca": HubDataset("tatsu-lab/alpaca", split="train", field="instruction", only_empty_input=True),
    "xstest": HubDataset("walledai/XSTest", split="test", field="prompt", category="type"),
}

def load_prompts(source: str, cache_dir: Path | None = None) -> list[Prompt]:
    """Load a prompt set from a file, a hub dataset name, or a built-in set's name (see the module doc)."""
    if (asset := prompt_asset(source)) is not None:
        return [Prompt(p, asset.category) for p in asset.load(cache_dir)]
    if source.lower() in HUB_DATASETS:
        return _hub_prompts(HUB_DATASETS[source.lower()], source)
    if source.startswith("hf:"):
        repo, _, split = source[3:].partition(":")
        return _hub_prompts(HubDataset(repo, split=split or "train"), source)
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join([*PROMPT_SETS, *HUB_DATASETS])
        raise TlrefusalError(f"no prompt file or known dataset named '{source}' (known datasets: {known}; "
                             "or hf:OWNER/NAME[:SPLIT])")
    return _file_prompts(path)


def _file_prompts(path: Path) -> list[Prompt]:
    if path.is_dir():
        raise TlrefusalError(f"{path} is a folder, not a prompt file")
    suffix = path.suffix.lower()
    text = read_text(path)
    try:
        if suffix in (".json", ".jsonl"):
            records = _json_items(path, text)
        elif suffix == ".csv":
            records = list(csv.DictReader(text.splitlines()))
        elif suffix == ".txt":
            records = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            raise TlrefusalError(f"{path}: unsupported prompt file type '{suffix}' (use .json, .jsonl, .csv "
                                 "or .txt)")
    except csv.Error as exc:
        raise TlrefusalError(f"{path} is malformed: {exc}") from exc
    prompts = [_to_prompt(record, f"{path} item {i + 1}") for i, record in enumerate(records)]
    if not prompts:
        raise TlrefusalError(f"{path} holds no prompts")
    return prompts


def _to_prompt(record: object, where: str) -> Prompt:
    if isinstance(record, str):
        instruction, category = record, None
    elif isinstance(record, dict):
        field = next((f for f in INSTRUCTION_FIELDS if f in record), None)
        if field is None:
            raise TlrefusalError(f"{where} has no instruction field (expected one of: "
                                 f"{', '.join(INSTRUCTION_FIELDS)})")
        instruction = record[field]
        category = next((record[f] for f in CATEGORY_FIELDS if record.get(f) is not None), None)
    else:
        raise TlrefusalError(f"{where} is neither a string nor an object")
    if not isinstance(instruction, str) or not instruction.strip():
        raise TlrefusalError(f"{where} has an empty or non-text instruction")
    return Prompt(instruction=instruction, category=None if category is None else str(category))


def _hub_prompts(spec: HubDataset, name: str) -> list[Prompt]:
    rows = hub_rows(spec.repo, spec.split, spec.config, name=name)
    prompts = []
    for i, row in enumerate(rows):
        if spec.only_empty_input and row.get("input"):
            continue
        if spec.field is not None:
            row = {"instruction": row[spec.field],
                   "category": row.get(spec.category) if spec.category else None}
        prompts.append(_to_prompt(row, f"{name} row {i}"))
    if not prompts:
        raise TlrefusalError(f"dataset '{name}' gave no prompts")
    return prompts


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; an unreadable or non-UTF-8 file is a one-line TlrefusalError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TlrefusalError(f"{path} is not UTF-8 text") from exc
    except OSError as exc:
        raise TlrefusalError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_records(path: Path) -> list[dict]:
    """The objects of a `.json` file holding a list of objects, or of a `.jsonl` file (one object a line)."""
    items = _json_items(path, read_text(path))
    if not all(isinstance(item, dict) for item in items):
        raise TlrefusalError(f"{path} must hold a list of objects")
    return items


def _json_items(path: Path, text: str) -> list:
    """The items of a `.jsonl` file (one JSON value a line, blank lines skipped) or of a `.json` list."""
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TlrefusalError(f"{path} is malformed: {exc}") from exc
    if not isinstance(items, list):
        kind = "object" if isinstance(items, dict) else "value"
        raise TlrefusalError(f"{path} holds a JSON {kind}; expected a list")
    return items


def hub_rows(repo: str, split: str, config: str | None = None, *, name: str | None = None,
             shuffle_seed: int | None = None, first_n: int | None = None) -> list[dict]:
    """The rows of a Hugging Face hub dataset (or its cache): all of them, shuffled with `shuffle_seed` if
    given, or with `first_n` only the first n, streamed in order. `name` is how the user called it."""
    import datasets

    try:
        if first_n is not None:
            stream = datasets.load_dataset(repo, config, split=split, streaming=True)
            return [row for _, row in zip(range(first_n), stream, strict=False)]
        rows = datasets.load_dataset(repo, config, split=split)
        return list(rows.shuffle(seed=shuffle_seed) if shuffle_seed is not None else rows)
    except Exception as exc:  # datasets raises many types for a missing hub or cache; all mean the same here
        what = f"dataset '{name}' ({repo})" if name else repo
        raise TlrefusalError(f"could not load {what} from the Hugging Face hub or its cache: "
                             f"{first_line(exc)}") from exc


POOLS = ("harmful", "harmless", "harmful_val", "harmless_val")


def load_pools(sources: dict[str, str | None], cache_dir: Path | None = None) -> dict[str, list[Prompt]]:
    """A run's prompt pools by name (`POOLS`), from their sources; a pool whose source is None is left out."""
    return {name: load_prompts(sources[name], cache_dir) for name in POOLS if sources.get(name) is not None}


def prompts_hash(prompts: Sequence[Prompt]) -> str:
    """A content hash of a prompt set, recorded so a run knows exactly what it was given."""
    payload = json.dumps([p.to_json() for p in prompts], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Splits:
    harmful_train: list[Prompt]
    harmless_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]

    NAMES = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")

    def items(self) -> list[tuple[str, list[Prompt]]]:
        return [(name, getattr(self, name)) for name in self.NAMES]


def sample_splits(
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    n_train: int,
    n_val: int,
    seed: int = 42,
    harmful_val: Sequence[Prompt] | None = None,
    harmless_val: Sequence[Prompt] | None = None,
    rng: random.Random | None = None,
) -> Splits:
    """Seeded samples in the paper's order: harmful train, harmless train, harmful val, harmless val.

    With separate validation pools this is exactly what the original code and the NNsight replication do:
    `random.seed(seed)` then four `random.sample` calls. Without one, validation prompts are drawn from the
    prompts of the same pool that training did not take, so train and val never overlap. `rng` (default
    `random.Random(seed)`): the stream to draw from; the caller keeps it to continue the stream, as the
    original draws its harmless evaluation sample next (`random.sample(harmless_test, 100)`).
    """
    rng = rng if rng is not None else random.Random(seed)

    def draw(pool: Sequence[Prompt], k: int, label: str) -> list[Prompt]:
        if k > len(pool):
            raise TlrefusalError(f"the {label} pool has {len(pool)} prompts, fewer than the {k} requested")
        return rng.sample(list(pool), k)

    harmful_train = draw(harmful, n_train, "harmful train")
    harmless_train = draw(harmless, n_train, "harmless train")
    if harmful_val is None:
        harmful_val = _remainder(harmful, harmful_train)
    if harmless_val is None:
        harmless_val = _remainder(harmless, harmless_train)
    return Splits(
        harmful_train=harmful_train,
        harmless_train=harmless_train,
        harmful_val=draw(harmful_val, n_val, "harmful val (prompts left after the train sample)"),
        harmless_val=draw(harmless_val, n_val, "harmless val (prompts left after the train sample)"),
    )


def _remainder(pool: Sequence[Prompt], taken: Sequence[Prompt]) -> list[Prompt]:
    taken_ids = {id(p) for p in taken}
    return [p for p in pool if id(p) not in taken_ids]


def sample_prompts(pool: Sequence[Prompt], n: int, seed: int, exclude: set[str] = frozenset()) -> list[Prompt]:
    """Up to `n` prompts of `pool`, drawn with `random.Random(seed)`, leaving out instructions in `exclude`
    (held-out evaluation: the prompts a run already used)."""
    kept = [p for p in pool if p.instruction not in exclude]
    return random.Random(seed).sample(kept, min(n, len(kept)))
