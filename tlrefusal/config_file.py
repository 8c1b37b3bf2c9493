"""Config files for `--config` (`tlrefusal run`, `extract`, `eval`, `orthogonalize`): read, mapped to option names.

Three forms are read, and each becomes the same thing, a `ConfigFile`: option values by command, named as the
options are (`n-train` or `n_train` for `--n-train`).

- **tlrefusal's own** (TOML, YAML or JSON): top-level keys are options of any command; a table named after a
  command (`[extract]`, `[eval]`, `[orthogonalize]`, `[run]`) holds options for that command alone. A top-level
  key goes to every command that has that option, except the few whose meaning differs between commands
  (`EXTRACT_ONLY`: `model`, `out`, `harmful`, `harmless`, `batch-size` are the extraction's; the evaluation's and
  the export's own go in their tables).
- **a run's record**, RUN/config.json: the resolved extraction config `tlrefusal extract` writes, plus, from
  `tlrefusal run`, the options each later stage ran with. So `tlrefusal run --config RUN/config.json --out RUN2`
  repeats a run.
- **the NNsight replication's config.yaml** (keys such as `model-path`, `n-test`, `ce-loss-n-batches`), mapped by
  `REPLICATION_KEYS`; the replication's settings that are code rather than config (its datasets, templates, the
  sign of activation addition) are not in the file and are not mapped.

Which option names are valid is the CLI's to say (`Options`); this module only reads and maps, so an unknown key
is an error naming the nearest valid one.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tlrefusal.errors import TlrefusalError

COMMANDS = ("run", "extract", "eval", "orthogonalize")
STAGES = ("extract", "eval", "orthogonalize")  # what `tlrefusal run` runs, in order
# Top-level keys whose meaning differs between commands: the extraction's (and `run`'s) at the top level.
EXTRACT_ONLY = frozenset({"model", "out", "harmful", "harmless", "batch_size"})
SUFFIXES = (".toml", ".yaml", ".yml", ".json")
RUN_RECORD_KEY = "run"  # RUN/config.json's section written by `tlrefusal run`: {"steps", "eval", "orthogonalize"}

# Options, by command: every accepted spelling (the option's long names and its parameter name, dashes as
# underscores) -> the parameter name. Given by the CLI.
Options = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    form: str  # "tlrefusal", "run record" or "replication"
    shared: dict[str, object] = field(default_factory=dict)  # top-level options
    sections: dict[str, dict[str, object]] = field(default_factory=dict)  # command -> its own options

    def for_command(self, command: str, options: Options) -> dict[str, object]:
        """The values `command` takes from this file, by parameter name (its section over the top level)."""
        self.check(options)
        own = options[command]
        values = {own[k]: v for k, v in self.shared.items()
                  if k in own and (k not in EXTRACT_ONLY or command in ("extract", "run"))}
        values.update({own[k]: v for k, v in self.sections.get(command, {}).items()})
        return values

    def check(self, options: Options) -> None:
        """Every key names an option: of its section's command, or at the top level of some command."""
        anywhere = {k for names in options.values() for k in names}
        for key in self.shared:
            if key not in anywhere:
                raise TlrefusalError(_unknown(self.path, key, anywhere | set(COMMANDS)))
        for command, values in self.sections.items():
            for key in values:
                if key not in options[command]:
                    raise TlrefusalError(_unknown(self.path, key, set(options[command]), f"[{command}] "))


def read_config(path: Path) -> ConfigFile:
    """Read a config file in any of the three forms (see the module's docstring)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise TlrefusalError(f"{path}: a config file is .toml, .yaml, .yml or .json")
    if not path.is_file():
        raise TlrefusalError(f"config file {path} does not exist")
    data = _parse(path)
    if not isinstance(data, dict):
        raise TlrefusalError(f"{path} does not hold a table of settings")
    if "config" in data and isinstance(data["config"], dict) and "model" in data["config"]:
        return _run_record(path, data)
    if "model-path" in data or "model-alias" in data:
        return _replication(path, data)
    shared, sections = {}, {}
    for key, value in data.items():
        name = _norm(key)
        if name in COMMANDS:
            if not isinstance(value, dict):
                raise TlrefusalError(f"{path}: [{key}] must be a table of options")
            sections[name] = {_norm(k): v for k, v in value.items()}
        else:
            shared[name] = value
    return ConfigFile(path, "tlrefusal", shared, sections)


def _parse(path: Path):
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # each parser has its own error type; all mean the same to the user
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TlrefusalError(f"cannot parse {path}: {detail}") from exc


def _norm(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _unknown(path: Path, key: str, valid: set[str], where: str = "") -> str:
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0].replace('_', '-')!r}?" if near else ""
    return f"{path}: unknown setting {where}{key.replace('_', '-')!r}{hint}"


# ---- a run's record (RUN/config.json) ----------------------------------------------------------------------

# ExtractConfig's fields whose option is named otherwise; `filter` is inverted (`--no-filter`).
_EXTRACT_FIELDS = {"prune_layer_fraction": "prune_layers"}


def _run_record(path: Path, data: dict) -> ConfigFile:
    config = dict(data["config"])
    shared: dict[str, object] = {}
    selection = config.pop("selection", {}) or {}
    for name, value in [*config.items(), *selection.items()]:
        if name == "filter":
            shared["no_filter"] = not value
        elif name in ("refusal_phrases", "refusal_token_ids"):
            if value is not None:
                shared[name] = ",".join(map(str, value))
        elif value is not None:
            shared[_EXTRACT_FIELDS.get(name, name)] = value
    sections = {"extract": shared}
    recorded = data.get(RUN_RECORD_KEY) or {}
    for stage in ("eval", "orthogonalize"):
        if recorded.get(stage):
            sections[stage] = dict(recorded[stage])
    if recorded.get("steps"):
        sections["run"] = {"steps": ",".join(recorded["steps"])}
    # The run's own options (its model) sit at the top level for `run`; the rest are the extraction's.
    return ConfigFile(path, "run record", {"model": shared.pop("model")}, sections)


# ---- the NNsight replication's config.yaml ------------------------------------------------------------------

# The replication's evaluation datasets -> tlrefusal's prompt-set names. HarmBench's test split has no name of
# its own here: tlrefusal's `harmbench` is HarmBench's standard behaviours (its test and validation rows).
REPLICATION_DATASETS = {"jailbreakbench": "jailbreakbench", "harmbench_test": "harmbench", "advbench": "advbench"}
REPLICATION_JUDGES = frozenset({"substring_matching", "llamaguard2"})
# Key -> (command, option); the keys handled in `_replication` itself are listed with None.
REPLICATION_KEYS: dict[str, tuple[str, str] | None] = {
    "model-path": ("extract", "model"),
    "n-train": ("extract", "n_train"),
    "n-val": ("extract", "n_val"),
    "batch-size": ("extract", "batch_size"),
    "n-test": ("eval", "n_eval"),
    "max-new-tokens": ("eval", "max_new_tokens"),
    "generation-batch-size": ("eval", "batch_size"),
    "model-alias": None, "save-dir": None,  # RUN = save-dir/model-alias, as the replication writes
    "filter-train": None, "filter-val": None,  # one --no-filter here
    "ce-loss-batch-size": None, "ce-loss-n-batches": None,  # --n-ce = their product
    "evaluation-datasets": None,  # --harmful of eval
    "jailbreak-eval-methodologies": None, "refusal-eval-methodologies": None,  # substring always; the guard
}                                                                               # needs --guard-model


def _replication(path: Path, data: dict) -> ConfigFile:
    unknown = [k for k in data if k not in REPLICATION_KEYS]
    if unknown:
        raise TlrefusalError(_unknown(path, unknown[0], set(REPLICATION_KEYS)).replace("_", "-"))
    sections: dict[str, dict[str, object]] = {"extract": {}, "eval": {}}
    for key, target in REPLICATION_KEYS.items():
        if target is not None and key in data:
            sections[target[0]][target[1]] = data[key]
    shared: dict[str, object] = {}
    if "model-path" in data:
        shared["model"] = sections["extract"].pop("model")
    if "model-alias" in data:
        shared["out"] = str(Path(str(data.get("save-dir", "runs"))) / str(data["model-alias"]))
    filters = {data[k] for k in ("filter-train", "filter-val") if k in data}
    if len(filters) > 1:
        raise TlrefusalError(f"{path}: filter-train and filter-val differ; tlrefusal filters train and validation "
                             "prompts alike (--no-filter turns both off)")
    if filters == {False}:
        sections["extract"]["no_filter"] = True
    if "ce-loss-n-batches" in data:
        sections["eval"]["n_ce"] = int(data["ce-loss-n-batches"]) * int(data.get("ce-loss-batch-size", 1))
    if "evaluation-datasets" in data:
        names = list(data["evaluation-datasets"] or [])
        bad = [n for n in names if n not in REPLICATION_DATASETS]
        if bad:
            raise TlrefusalError(f"{path}: evaluation dataset {bad[0]!r} has no tlrefusal counterpart (known: "
                                 f"{', '.join(REPLICATION_DATASETS)})")
        sections["eval"]["harmful"] = [REPLICATION_DATASETS[n] for n in names]
    for key in ("jailbreak-eval-methodologies", "refusal-eval-methodologies"):
        bad = sorted(set(data.get(key) or []) - REPLICATION_JUDGES)
        if bad:
            raise TlrefusalError(f"{path}: {key} {bad[0]!r} is not a judge tlrefusal has "
                                 f"({', '.join(sorted(REPLICATION_JUDGES))})")
    return ConfigFile(path, "replication", shared, {k: v for k, v in sections.items() if v})
