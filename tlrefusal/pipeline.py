"""The extract pipeline: data -> filtering -> candidate directions -> selection.

Each step writes one artifact of the run folder (`tlrefusal.artifacts`) and is skipped when that
artifact already exists for the same config, so an interrupted run resumes where it stopped; selection, the
long step, also journals every candidate's scores as they are made (`tlrefusal.journal`) and resumes
mid-way. Under torchrun the candidates are scored by several processes (`tlrefusal.distributed`).
"""
import dataclasses
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tlrefusal import __version__, artifacts, distributed
from tlrefusal.activations import candidate_directions, last_logits, mean_activations
from tlrefusal.batching import run_batched
from tlrefusal.chat import (
    SYSTEM_DEFAULT,
    ChatFormat,
    ChatOptions,
    TemplateKwargs,
    format_template_kwargs,
    parse_template_kwargs,
    refusal_phrases_for,
)
from tlrefusal.chat_templates import ChatTemplate, paper_format_for, resolve_template
from tlrefusal.config_file import RUN_RECORD_KEY
from tlrefusal.data import POOLS, Prompt, Splits, load_pools, prompts_hash, sample_splits
from tlrefusal.errors import TlrefusalError
from tlrefusal.journal import JournalWriter, journal_file, journal_key, read_journal
from tlrefusal.model import LoadedModel, ModelSource, load_model, resolve_source
from tlrefusal.placement import Placement
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.scoring import refusal_log_odds
from tlrefusal.selection import (
    CandidateScore,
    Key,
    SelectionConfig,
    SelectionResult,
    candidate_groups,
    candidate_table,
    choose,
    score_groups,
    scored_keys,
)
from tlrefusal.steps import STEPS, affected, check_extract_step, discard, setting_step


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    model: str  # a built-in name (organism, smollm2), a local folder, a .gguf file or a hub id
    dtype: str = "float32"  # or bfloat16, float16, auto (the checkpoint's own)
    device: str = "cpu"  # or cuda, cuda:N, auto
    # Several devices and quantized loading (`tlrefusal.placement.Placement`); absent from config.json
    # when unset, as in runs made before them.
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    quantize: str | None = None
    gpus_per_replica: int = 1
    harmful: str = "demo-harmful"
    harmless: str = "demo-harmless"
    # Separate validation pools (the paper's splits); without them val is drawn from what train left.
    harmful_val: str | None = None
    harmless_val: str | None = None
    n_train: int = 128  # per label
    n_val: int = 32  # per label
    seed: int = 42
    filter: bool = True  # keep harmful prompts with log-odds > 0 and harmless with < 0
    min_kept: int = 8  # stop with advice if fewer prompts than this survive filtering in any split
    refusal_phrases: tuple[str, ...] | None = None  # None: the paper's phrases for the model family
    refusal_token_ids: tuple[int, ...] | None = None  # overrides the phrases
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    trust_remote_code: bool = False
    # None: the tokenizer's own template; else a paper format by name (qwen-chat, yi-chat, gemma-it,
    # llama-2-chat, llama-3-instruct) or a jinja file, for models without a template (Qwen-1 chat).
    chat_template: str | None = None
    # The paper's chat format for the model's family (`chat_templates.PAPER_FAMILIES`); the other settings'
    # defaults are already the paper's.
    paper: bool = False
    # The prompts' system message (`chat.system_prompt_from_spec`): None, the template's default (no system
    # message, as the paper); "none", an empty one; else its text. Extract under the one the model will be used with.
    system_prompt: str | None = None
    # Template variables (`chat.parse_template_kwargs`), e.g. (("enable_thinking", False),) for Qwen3: a reasoning
    # model must be extracted with thinking off (`ChatFormat.check_refusal_position`).
    chat_template_kwargs: TemplateKwargs = ()

    def __post_init__(self) -> None:
        if self.system_prompt == SYSTEM_DEFAULT:  # one spelling of the default, so config.json matches
            object.__setattr__(self, "system_prompt", None)
        object.__setattr__(self, "chat_template_kwargs", parse_template_kwargs(self.chat_template_kwargs))
        for name in ("n_train", "n_val", "min_kept"):
            if getattr(self, name) < 1:
                raise TlrefusalError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.refusal_phrases is not None and not self.refusal_phrases:
            raise TlrefusalError("refusal_phrases is empty")
        if self.refusal_token_ids is not None and not self.refusal_token_ids:
            raise TlrefusalError("refusal_token_ids is empty")
        if self.paper and self.chat_template is not None:
            raise TlrefusalError("--paper chooses the paper's chat format for the model's family; give it or "
                                 "--chat-template, not both")
        _ = self.placement  # a bad device map, budget or quantization fails here, before the run folder

    @property
    def chat_options(self) -> ChatOptions:
        return ChatOptions().override(self.system_prompt, self.chat_template_kwargs)

    @property
    def placement(self) -> Placement:
        return Placement(device=self.device, dtype=self.dtype, device_map=self.device_map,
                         max_memory=self.max_memory, offload_folder=self.offload_folder, quantize=self.quantize,
                         gpus_per_replica=self.gpus_per_replica)

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("refusal_phrases", "refusal_token_ids"):
            if data[key] is not None:
                data[key] = list(data[key])
        if data["chat_template"] is None:  # absent: the tokenizer's template, as in runs made before the option
            del data["chat_template"]
        if not data["paper"]:  # absent, as in runs made before the option
            del data["paper"]
        if data["system_prompt"] is None:  # absent, as in runs made before the option
            del data["system_prompt"]
        if self.chat_template_kwargs:  # spelled as the flag takes it, so a run's config.json is a --config file
            data["chat_template_kwargs"] = format_template_kwargs(self.chat_template_kwargs)
        else:  # absent, as in runs made before the option
            del data["chat_template_kwargs"]
        for name in ("device_map", "max_memory", "offload_folder", "quantize", "gpus_per_replica"):
            if data[name] == ExtractConfig.__dataclass_fields__[name].default:  # absent, as before the options
                del data[name]
        return data


@dataclass(frozen=True)
class ExtractResult:
    run_dir: Path
    kept: dict[str, tuple[int, int]]  # split -> (kept, sampled)
    baseline_refusal: dict[str, float]  # split -> fraction with refusal log-odds > 0
    selection: SelectionResult
    direction: artifacts.RefusalDirection | None
    eoi_tokens: list[str]
    refusal_ids: list[int]
    seconds: dict[str, float]
    discarded: tuple[Path, ...] = ()  # what `from_step` removed before the run went on


def run_extract(config: ExtractConfig, run_dir: Path | str, cache_dir: Path | None = None, force: bool = False,
                progress: Progress = NO_PROGRESS, from_step: str | None = None) -> ExtractResult:
    """Run (or resume) extraction into `run_dir`; `result.direction` is None if no candidate survives.

    Every input is checked (prompt files and pool sizes, the model, refusal tokens) before the run folder
    is claimed, so a mistake leaves no half-made run folder behind.

    Under torchrun (`tlrefusal.distributed`) every process calls this and loads its own replica
    (`Placement.for_local_rank`). Rank 0 alone claims the run folder, filters the prompts, computes the
    candidates and writes every artifact, and hands the other ranks what scoring needs; the candidates are
    dealt out to the ranks (`distributed.share`), their scores pooled, and every rank returns the same
    result. Each process journals its scores as it goes (`tlrefusal.journal`), so a selection that is
    stopped resumes with what it had scored. Only rank 0 reports progress.

    `from_step` (filter, candidates or selection): redo that step and every step that depends on it. Once
    every input has passed, and only if no setting of a step it keeps differs from those `run_dir` was made
    with, rank 0 discards their artifacts (`tlrefusal.steps.discard`: the evaluation's and the export's too;
    `result.discarded`) and config.json records the new settings.
    """
    world = distributed.world()
    if not world.is_main:
        progress = NO_PROGRESS
    with distributed.process_group(world):
        return _extract(config, Path(run_dir), cache_dir, force, progress, world, from_step)


@dataclass(frozen=True)
class _Inputs:
    """What every rank works out from the config before the model loads."""

    pools: dict[str, list[Prompt]]
    sampled: Splits
    source: ModelSource
    template: ChatTemplate | None
    identity: dict  # config.json: the run's config, data hashes and model folder
    # (rank 0) what to do with the run folder once the model has loaded: "keep" it, "clear" its artifacts (a new
    # setup), or "redo" from_step (discard its artifacts and its dependants', and record the settings)
    claim: str
    from_step: str | None = None


@dataclass(frozen=True)
class _Prepared:
    """What rank 0 computes (or reads back) and hands to every rank before scoring."""

    saved: dict[str, list[dict]]  # prompts.json's rows
    splits: Splits  # the prompts kept by the filter
    directions: torch.Tensor  # candidates [n_pos, n_layer, d_model]
    selection: SelectionResult | None  # selection.json of a run that got that far
    journal_key: str  # what the journal's records must carry (`journal.journal_key`)
    discarded: tuple[Path, ...] = ()  # what --from removed


def _extract(config: ExtractConfig, run_dir: Path, cache_dir: Path | None, force: bool, progress: Progress,
             world: distributed.World, from_step: str | None = None) -> ExtractResult:
    seconds, started = {}, time.perf_counter()
    batch_sizes: dict[str, int | list[int]] = {}  # the size each step ran at (--batch-size auto halves on out-of-memory)
    if from_step is not None:
        check_extract_step(from_step)
    inputs = distributed.everywhere(world, lambda: _inputs(config, run_dir, cache_dir, force, world, progress,
                                                           from_step))
    if from_step is not None and not world.is_main:  # (rank 0 discards the folder's, with its own)
        journal_file(run_dir / artifacts.SELECTION_JOURNAL, world.rank).unlink(missing_ok=True)
    seconds["setup"] = time.perf_counter() - started
    t = time.perf_counter()
    model, chat, refusal_ids = distributed.everywhere(world, lambda: _load(config, inputs, world, progress))
    seconds["load_model"] = time.perf_counter() - t
    prepared = distributed.on_main(world, lambda: _prepare(run_dir, config, inputs, model, chat, refusal_ids,
                                                           seconds, batch_sizes, world, progress))
    t = time.perf_counter()
    selection = prepared.selection
    if selection is None:
        selection = _select(run_dir, model, chat, prepared, refusal_ids, config, batch_sizes, world, progress)
    seconds["selection"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    direction = None
    if selection.chosen is not None:
        pos_index = chat.positions.index(selection.chosen.position)
        direction = artifacts.RefusalDirection(prepared.directions[pos_index, selection.chosen.layer],
                                               selection.chosen.layer, selection.chosen.position,
                                               inputs.source.spec)
    if world.is_main:
        _write_manifest(run_dir, config, inputs.source, model, chat, refusal_ids, inputs.pools, seconds, world,
                        batch_sizes)
        # A resumed run whose selection was read back keeps its direction file as it is (byte for byte).
        if direction is not None and (prepared.selection is None or not (run_dir / artifacts.DIRECTION).is_file()):
            direction.save(run_dir / artifacts.DIRECTION)
    return ExtractResult(run_dir=run_dir, **_prompt_stats(prepared.saved), selection=selection, direction=direction,
                         eoi_tokens=chat.eoi_tokens, refusal_ids=refusal_ids, seconds=seconds,
                         discarded=prepared.discarded)


def _inputs(config: ExtractConfig, run_dir: Path, cache_dir: Path | None, force: bool, world: distributed.World,
            progress: Progress, from_step: str | None = None) -> _Inputs:
    pools = _load_pools(config, cache_dir)
    sampled = sample_splits(pools["harmful"], pools["harmless"], config.n_train, config.n_val, config.seed,
                            pools.get("harmful_val"), pools.get("harmless_val"))
    source = resolve_source(config.model, cache_dir, progress)
    template = resolve_template(_paper_format(source) if config.paper else config.chat_template)
    identity = {"config": config.to_json(), "data_sha256": {k: prompts_hash(v) for k, v in pools.items()},
                "model_loaded_from": source.to_json()["loaded_from"]}
    if template is not None:  # a template file edited in place makes another run
        identity["chat_template_sha256"] = template.sha256
    # Rank 0 alone owns the run folder (other ranks may not even see it). Checked before the model loads: a
    # refusal costs nothing.
    claim = _check_run_dir(run_dir, identity, force, from_step) if world.is_main else "keep"
    return _Inputs(pools=pools, sampled=sampled, source=source, template=template, identity=identity, claim=claim,
                   from_step=from_step)


def _load(config: ExtractConfig, inputs: _Inputs, world: distributed.World, progress: Progress
          ) -> tuple[LoadedModel, ChatFormat, list[int]]:
    placement = config.placement if world.size == 1 else config.placement.for_local_rank(world.local_rank)
    if world.size > 1 and (gpu := placement.first_gpu()) is not None:
        # The replica's first GPU becomes this process's default, so no rank opens a CUDA context on GPU 0.
        torch.cuda.set_device(gpu)
    model = load_model(inputs.source, placement, config.trust_remote_code, progress)
    chat = ChatFormat.from_tokenizer(model.tokenizer, inputs.template, config.chat_options)
    chat.check_refusal_position()  # a reasoning model's first reply token is its block's opener, not a refusal
    return model, chat, _refusal_ids(config, chat, model.model_type)


def _prepare(run_dir: Path, config: ExtractConfig, inputs: _Inputs, model: LoadedModel, chat: ChatFormat,
             refusal_ids: list[int], seconds: dict[str, float], batch_sizes: dict[str, int],
             world: distributed.World, progress: Progress) -> _Prepared:
    """(Rank 0) claim the run folder, then filter and compute the candidates, or read them back."""
    config_path = run_dir / artifacts.CONFIG
    discarded: list[Path] = []
    if inputs.claim == "clear":
        _clear(run_dir)
        artifacts.write_json(config_path, inputs.identity)
    elif inputs.claim == "redo":  # the new settings, and `tlrefusal run`'s record of its later stages
        record = {k: v for k, v in artifacts.read_json(config_path).items() if k == RUN_RECORD_KEY}
        discarded = discard(run_dir, inputs.from_step)
        artifacts.write_json(config_path, {**inputs.identity, **record})
    elif not config_path.is_file():  # else it holds this setup (and may hold `tlrefusal run`'s record)
        artifacts.write_json(config_path, inputs.identity)
    _write_manifest(run_dir, config, inputs.source, model, chat, refusal_ids, inputs.pools, seconds, world)
    t = time.perf_counter()
    splits, saved = _sample_and_filter(run_dir, config, inputs.sampled, model, chat, refusal_ids, batch_sizes,
                                       progress)
    seconds["filter"] = time.perf_counter() - t
    t = time.perf_counter()
    directions = _candidates(run_dir, model, chat, splits, config, batch_sizes, progress)
    seconds["candidates"] = time.perf_counter() - t
    path = run_dir / artifacts.SELECTION
    selection = SelectionResult.from_json(artifacts.read_json(path)) if path.is_file() else None
    val = {name: [p.instruction for p in getattr(splits, name)] for name in ("harmful_val", "harmless_val")}
    return _Prepared(saved=saved, splits=splits, directions=directions, selection=selection,
                     journal_key=journal_key(inputs.identity, directions, val, refusal_ids), discarded=tuple(discarded))


def _paper_format(source: ModelSource) -> str:
    """The paper's format name for the model's family, read from its config.json before it loads."""
    config_path = source.path / artifacts.HF_CONFIG
    if source.gguf_file is not None or not config_path.is_file():
        raise TlrefusalError("--paper needs a Hugging Face model folder or hub id (its config.json names the family)")
    return paper_format_for(artifacts.read_json(config_path))


def _prompt_stats(saved: dict[str, list[dict]]) -> dict[str, dict]:
    """From prompts.json's rows: `kept` (split -> (kept, sampled)) and `baseline_refusal` (split -> fraction
    with refusal log-odds > 0)."""
    return {"kept": {name: (sum(r["kept"] for r in rows), len(rows)) for name, rows in saved.items()},
            "baseline_refusal": {name: sum(r["refusal_log_odds"] > 0 for r in rows) / len(rows)
                                 for name, rows in saved.items()}}


def load_extract_result(run_dir: Path) -> ExtractResult:
    """Read a finished (or stopped) run back from its artifacts, for `tlrefusal show`."""
    for name in (artifacts.CONFIG, artifacts.MANIFEST, artifacts.PROMPTS, artifacts.SELECTION):
        if not (run_dir / name).is_file():
            raise TlrefusalError(f"{run_dir} is not a finished tlrefusal run (it has no {name})")
    manifest = artifacts.read_json(run_dir / artifacts.MANIFEST)
    has_direction = (run_dir / artifacts.DIRECTION).is_file()
    return ExtractResult(
        run_dir=run_dir, **_prompt_stats(artifacts.read_json(run_dir / artifacts.PROMPTS)),
        selection=SelectionResult.from_json(artifacts.read_json(run_dir / artifacts.SELECTION)),
        direction=artifacts.RefusalDirection.load(run_dir) if has_direction else None,
        eoi_tokens=manifest["chat"]["eoi_tokens"], refusal_ids=manifest["refusal"]["token_ids"],
        seconds=manifest["seconds"])


def _load_pools(config: ExtractConfig, cache_dir: Path | None) -> dict[str, list[Prompt]]:
    return load_pools({name: getattr(config, name) for name in POOLS}, cache_dir)


def _check_run_dir(run_dir: Path, identity: dict, force: bool, from_step: str | None = None) -> str:
    """Refuse a run folder made with another config, model or data (nothing is written), unless --force, or
    `from_step` redoes every step whose settings changed; returns the claim (`_Inputs.claim`) to make once
    every input has passed."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TlrefusalError(f"{run_dir} exists and is not a folder")
    config_path = run_dir / artifacts.CONFIG
    if config_path.is_file():
        # `tlrefusal run`'s record of its later stages is not the extraction's setup.
        previous = {k: v for k, v in artifacts.read_json(config_path).items() if k != RUN_RECORD_KEY}
        if force:
            return "clear"
        if from_step is not None:
            _refuse_kept_changes(_differences(previous, identity), from_step)
            return "redo"
        if previous == identity:
            return "keep"
        raise TlrefusalError(f"{run_dir} holds a run made with a different setup (differs in: "
                             f"{', '.join(_differences(previous, identity))}); use another --out, --from STEP to "
                             "redo the steps those settings act on, or --force")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise TlrefusalError(f"{run_dir} is not empty and is not a tlrefusal run; use another --out")
        return "clear"
    return "keep"


def _refuse_kept_changes(changed: list[str], step: str) -> None:
    """--from `step` keeps the artifacts of the steps before it: refuse if a setting they were made with changed."""
    redone = affected(step)
    if kept := [name for name in changed if setting_step(name) not in redone]:
        first = min((setting_step(name) for name in kept), key=STEPS.index)
        raise TlrefusalError(f"--from {step} keeps the artifacts of the steps before it, but {', '.join(kept)} "
                             f"changed since the run was made; use --from {first} (or another --out)")


def _differences(old: dict, new: dict) -> list[str]:
    """Names of the settings that differ, down to the innermost ones ("config.selection.kl_threshold" is named
    "selection.kl_threshold": the run's config is the level users set)."""
    def walk(a: dict, b: dict, prefix: str) -> list[str]:
        out = []
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                out += walk(x, y, f"{prefix}{k}.")
            elif x != y:
                out.append(f"{prefix}{k}")
        return out

    return [name.removeprefix("config.") for name in walk(old, new, "")]


def _clear(run_dir: Path) -> None:
    for name in artifacts.ALL_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / Path(artifacts.PLOT).parent, ignore_errors=True)
    shutil.rmtree(run_dir / artifacts.SELECTION_JOURNAL, ignore_errors=True)


def _refusal_ids(config: ExtractConfig, chat: ChatFormat, model_type: str) -> list[int]:
    vocab = len(chat.tokenizer)
    if config.refusal_token_ids is not None:
        bad = [i for i in config.refusal_token_ids if not 0 <= i < vocab]
        if bad:
            raise TlrefusalError(f"refusal token ids {bad} are outside the vocabulary (size {vocab})")
        return list(config.refusal_token_ids)
    return chat.refusal_token_ids(config.refusal_phrases or refusal_phrases_for(model_type))


def _write_manifest(run_dir, config, source: ModelSource, model: LoadedModel, chat: ChatFormat,
                    refusal_ids, pools, seconds, world: distributed.World,
                    batch_sizes: dict[str, int] | None = None) -> None:
    from importlib.metadata import version

    artifacts.write_json(run_dir / artifacts.MANIFEST, {
        "tool": "tlrefusal", "tool_version": __version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": version("transformers"), "transformer_lens": version("transformer-lens")},
        "threads": torch.get_num_threads(), "processes": world.size,  # rank 0's threads; one replica a process
        "model": {**source.to_json(), "model_type": model.model_type, "n_layers": model.n_layers,
                  "d_model": model.d_model, "dtype": config.dtype,
                  "placement": model.placement.to_json(),
                  "loaded_dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)},
        "chat": chat.to_json(),
        "refusal": {"token_ids": refusal_ids, "tokens": chat.tokenizer.convert_ids_to_tokens(refusal_ids)},
        "data": {name: {"source": getattr(config, name, None) or name, "n": len(p), "sha256": prompts_hash(p)}
                 for name, p in pools.items()},
        "seconds": seconds,
        # The batch size each step ran at (--batch-size, or what auto found), kept from earlier invocations of
        # a resumed run for the steps this one did not run.
        "batch_sizes": {**_previous_batch_sizes(run_dir), **(batch_sizes or {})},
    })


def _previous_batch_sizes(run_dir: Path) -> dict:
    path = run_dir / artifacts.MANIFEST
    return artifacts.read_json(path).get("batch_sizes", {}) if path.is_file() else {}


def _sample_and_filter(run_dir, config: ExtractConfig, sampled: Splits, model, chat, refusal_ids,
                       batch_sizes: dict[str, int], progress) -> tuple[Splits, dict[str, list[dict]]]:
    """Score each sampled prompt's baseline refusal log-odds, keep per the paper's filter; returns the kept
    splits and prompts.json's rows."""
    path = run_dir / artifacts.PROMPTS
    if path.is_file():
        saved = artifacts.read_json(path)
    else:
        total = sum(len(v) for _, v in sampled.items())
        saved = {}
        with progress.task("Scoring baseline refusal of sampled prompts", total=total) as advance:
            def score(size: int) -> dict[str, list[float]]:
                return {name: refusal_log_odds(last_logits(model, chat, [p.instruction for p in prompts],
                                                           batch_size=size, advance=advance), refusal_ids).tolist()
                        for name, prompts in sampled.items()}

            by_split, batch_sizes["filter"] = run_batched(score, config.selection.batch_size,
                                                          max(len(v) for _, v in sampled.items()))
        for name, prompts in sampled.items():
            harmful = name.startswith("harmful")
            saved[name] = [{**p.to_json(), "refusal_log_odds": s,
                            "kept": (not config.filter) or (s > 0 if harmful else s < 0)}
                           for p, s in zip(prompts, by_split[name], strict=True)]
        artifacts.write_json(path, saved)
    splits = Splits(**{name: [Prompt(r["instruction"], r["category"]) for r in rows if r["kept"]]
                       for name, rows in saved.items()})
    # A split smaller than min_kept only has to keep all of its prompts.
    short = [f"{name} {len(getattr(splits, name))}/{len(saved[name])}" for name in Splits.NAMES
             if len(getattr(splits, name)) < min(config.min_kept, len(saved[name]))]
    if short:
        raise TlrefusalError(
            f"too few prompts survive the refusal filter ({', '.join(short)}; need {config.min_kept} each): the model "
            "barely refuses these harmful prompts, or refuses the harmless ones. Use a model that refuses "
            "(the refusing organism), other prompts, or --no-filter; see prompts.json")
    return splits, saved


def _candidates(run_dir, model, chat, splits: Splits, config: ExtractConfig, batch_sizes: dict[str, int], progress
                ) -> torch.Tensor:
    path = run_dir / artifacts.CANDIDATES
    if path.is_file():
        return artifacts.read_tensors(path)["candidates"]
    total = len(splits.harmful_train) + len(splits.harmless_train)
    with progress.task("Caching mean activations (harmful and harmless train)", total=total) as advance:
        def cache(size: int) -> dict[str, torch.Tensor]:
            return {label: mean_activations(model, chat, [p.instruction for p in getattr(splits, f"{label}_train")],
                                            size, advance) for label in ("harmful", "harmless")}

        means, batch_sizes["candidates"] = run_batched(cache, config.selection.batch_size,
                                                       max(len(splits.harmful_train), len(splits.harmless_train)))
    artifacts.write_tensors(run_dir / artifacts.MEANS, {"harmful_mean": means["harmful"],
                                                         "harmless_mean": means["harmless"]},
                            {"positions": ",".join(map(str, chat.positions))})
    directions = candidate_directions(means["harmful"], means["harmless"])
    artifacts.write_tensors(path, {"candidates": directions}, {"positions": ",".join(map(str, chat.positions))})
    return directions


def _select(run_dir: Path, model: LoadedModel, chat: ChatFormat, prepared: _Prepared, refusal_ids: list[int],
            config: ExtractConfig, batch_sizes: dict[str, int], world: distributed.World, progress: Progress
            ) -> SelectionResult:
    """Score the candidates the journal lacks, dealt out to the ranks; every rank chooses, rank 0 writes.

    Same scores, whichever rank scores a candidate: each is scored with the same batches as in one
    process, so selection.json is byte-identical to a one-process run (at the same threads and devices).
    """
    folder = run_dir / artifacts.SELECTION_JOURNAL
    keys = scored_keys(chat.positions, model.n_layers, config.selection)
    # Each rank reads the journal files it can see (all of them on one node or a shared filesystem) and the
    # ranks pool what they found, so records on another node's disk count too. All read before any appends.
    found = distributed.all_gather(world, distributed.everywhere(
        world, lambda: read_journal(folder, prepared.journal_key)))
    done: dict[Key, CandidateScore] = {}
    for part in found:
        for key, score in part.items():
            done.setdefault(key, score)
    # Whole groups of candidates are dealt out (`candidate_groups`): a group with any candidate missing from
    # the journal is scored again whole, so every candidate is batched as in one uninterrupted process.
    groups = candidate_groups(keys, config.selection.candidates_per_pass)
    todo = [group for group in groups if any(key not in done for key in group)]
    mine = distributed.share(todo, world)
    n_todo, n_mine = sum(map(len, todo)), sum(map(len, mine))
    notes = ([f"{len(keys) - n_todo} of {len(keys)} from the journal"] if n_todo < len(keys) else []) + (
        [f"{n_mine} of {n_todo} in this process"] if world.size > 1 else [])
    description = "Scoring candidate directions" + (f" ({'; '.join(notes)})" if notes else "")

    harmful_val = [p.instruction for p in prepared.splits.harmful_val]
    harmless_val = [p.instruction for p in prepared.splits.harmless_val]

    def score() -> tuple[list[CandidateScore], int | None]:
        # "auto": a group that runs out of memory starts the rest of this rank's share again at half the
        # size; the groups already scored keep the scores they were journaled with.
        scored: dict[Key, CandidateScore] = {}

        def at(size: int) -> None:
            with JournalWriter(journal_file(folder, world.rank), prepared.journal_key) as journal:
                def record(group: list[CandidateScore]) -> None:
                    journal.extend(group)
                    scored.update({(score.position, score.layer): score for score in group})

                score_groups(model, chat, prepared.directions, harmful_val, harmless_val, refusal_ids,
                             dataclasses.replace(config.selection, batch_size=size),
                             [group for group in mine if any(key not in scored for key in group)], progress,
                             on_scored=record, description=description)

        if not mine:
            return [], None
        _, size = run_batched(at, config.selection.batch_size,
                              (len(harmful_val) + len(harmless_val)) * config.selection.candidates_per_pass)
        return [scored[key] for group in mine for key in group], size

    sizes = []
    for part, size in distributed.all_gather(world, distributed.everywhere(world, score)):
        done.update({(s.position, s.layer): s for s in part})
        sizes.append(size)
    ran = sorted({size for size in sizes if size is not None})
    if ran:  # one size, or each rank's when --batch-size auto landed on different ones
        batch_sizes["selection"] = ran[0] if len(ran) == 1 else [size for size in sizes if size is not None]

    table = candidate_table(chat.positions, model.n_layers, [done[key] for key in keys])
    result = choose(table, model.n_layers, config.selection)
    if world.is_main:
        artifacts.write_json(run_dir / artifacts.SELECTION, result.to_json())
        from tlrefusal.plots import selection_heatmaps

        artifacts.write_plot(run_dir / artifacts.PLOT, selection_heatmaps(result, chat.eoi_tokens))
    return result


def describe_failure(selection: SelectionResult, redo: bool = True) -> str:
    """Why no candidate survived, and the --kl-threshold that would keep the best one the KL filter dropped."""
    counts = ", ".join(f"{reason}: {n}" for reason, n in selection.filter_counts().items())
    message = (f"all candidate directions were filtered out ({counts}); see {artifacts.SELECTION} and "
               f"{artifacts.PLOT}")
    kl_only = [c for c in selection.candidates if c.filtered is not None and c.filtered.startswith("kl >")
               and c.induce_score >= selection.config.induce_threshold]
    if kl_only:
        best = min(kl_only, key=lambda c: c.bypass_score)
        message += (f". Only the KL filter dropped the best of them (position {best.position}, layer {best.layer}, "
                    f"KL {best.kl_score:.3g}): `tlrefusal show RUN --all` lists them, and re-running with "
                    + (f"--from selection --kl-threshold {_round_up(best.kl_score):.2g} keeps it (the filter and "
                       "the candidates are reused)" if redo else
                       f"--force --kl-threshold {_round_up(best.kl_score):.2g} keeps it"))
    return message


def _round_up(x: float) -> float:
    """x rounded up to two significant digits, so that a threshold printed from it still keeps x."""
    if x <= 0:
        return 0.0
    step = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / step) * step
