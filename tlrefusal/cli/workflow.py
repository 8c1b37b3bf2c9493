"""`tlrefusal run`: the whole pipeline in one command (extract -> eval -> orthogonalize), from flags or a config.

Each stage is the command of the same name, invoked with the values it would take from the config file (its
table and the top level) and from `run`'s own flags given on the command line, in that order of precedence
(the `default_map` of typer's own copy of click): so every value is converted and checked exactly as that
command's flag would be, and the stages' flags have one home. Every stage's context is built before anything
runs or is discarded, so a bad value fails first. The run folder holds what each stage made; a stage reuses it (`tlrefusal.steps`), and
`--from STEP` discards a step's artifacts and those that depend on them before running. RUN/config.json
records the options each later stage ran with, so it is itself a config that repeats the run.
"""
from pathlib import Path
from typing import Annotated

import typer

from tlrefusal import artifacts
from tlrefusal.cli.common import (
    MODEL_HELP,
    MODEL_PANEL,
    OUTPUT_PANEL,
    CacheDir,
    ChatTemplateKwargs,
    ConfigPath,
    DeviceMap,
    MaxMemory,
    OffloadFolder,
    Quantize,
    SystemPrompt,
    TrustRemoteCode,
    _dtype_choice,
    _fail,
    app,
    guarded,
    options_by_command,
)
from tlrefusal.cli.render import out, render_run
from tlrefusal.config_file import RUN_RECORD_KEY, STAGES, ConfigFile, read_config
from tlrefusal.steps import STAGE, STEPS, check_step, discard

# `run`'s own options; its other flags are handed to every stage that has an option of that name.
_RUN_ONLY = ("model", "out_dir", "config", "steps", "from_step", "force")


@app.command("run", epilog="Example: tlrefusal run organism --out runs/organism --config organism.toml  |  redo "
                           "from a step: tlrefusal run --out runs/organism --from selection")
@guarded
def run_all(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP + " Default: the model of --config or of RUN's "
                                                "config.json.", show_default=False, metavar="MODEL")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="The run folder (created; what it holds is reused).",
                                                 rich_help_panel=OUTPUT_PANEL)] = None,
    config: ConfigPath = None,
    steps: Annotated[str, typer.Option(metavar="STAGE,...", help=f"Stages to run, of {', '.join(STAGES)}.")]
    = ",".join(STAGES),
    from_step: Annotated[str | None, typer.Option(
        "--from", metavar="STEP", help=f"Discard the artifacts of STEP and of every step that depends on it, then "
                                       f"run: {', '.join(STEPS)}. Earlier steps' artifacts stay as they are.")] = None,
    force: Annotated[bool, typer.Option(help="Start the run folder over (the same as --from filter, and "
                                             "extract --force).", rich_help_panel=OUTPUT_PANEL)] = False,
    n_train: Annotated[int | None, typer.Option(help="Training prompts per label (paper: 128).")] = None,
    n_val: Annotated[int | None, typer.Option(help="Validation prompts per label (paper: 32).")] = None,
    kl_threshold: Annotated[float | None, typer.Option(help="Discard candidates with KL above this (paper: 0.1).")]
    = None,
    n_eval: Annotated[int | None, typer.Option(help="Evaluation prompts per dataset.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Reply length of the evaluation.")] = None,
    guard_model: Annotated[Path | None, typer.Option(help="A local Llama Guard 2 folder for the safety score.",
                                                     rich_help_panel=MODEL_PANEL)] = None,
    paper: Annotated[bool | None, typer.Option("--paper", help="extract --paper and eval --paper.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Every stage's --dtype (default: each stage's own).",
                                              callback=_dtype_choice, rich_help_panel=MODEL_PANEL)] = None,
    device: Annotated[str | None, typer.Option(help="Every stage's --device.", rich_help_panel=MODEL_PANEL)] = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    quantize: Quantize = None,
    trust_remote_code: TrustRemoteCode = None,
    system_prompt: SystemPrompt = None,
    chat_template_kwargs: ChatTemplateKwargs = None,
    cache_dir: CacheDir = None,
) -> None:
    """Run the whole pipeline: extract, then eval (completions, refusal and safety, CE loss, coherence,
    magnitude), then orthogonalize into RUN/orthogonalized; each stage reuses what RUN holds. Any option of
    a stage goes in --config (its table, e.g. [eval], or the top level); flags here override the file. Ends
    with a summary and RUN/report.md."""
    if out_dir is None:
        raise typer.BadParameter("missing; give the run folder with --out RUN (or `out` in --config)",
                                 param_hint="'--out'")
    stages = _stages(steps)
    step = check_step(from_step) if from_step is not None else "filter" if force else None
    file = _config_file(config, model, out_dir)
    if model is None:
        model = file.shared.get("model") if file is not None else None
    if model is None and "extract" in stages:
        raise typer.BadParameter("missing; give the model, or a --config that names it", param_hint="'MODEL'")
    if step is not None:  # a stage before the step's is already done
        if STAGE[step] == "extract" and "extract" not in stages:
            raise typer.BadParameter(f"--from {step} redoes part of the extract stage; add it to --steps",
                                     param_hint="'--from'")
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(STAGE[step])]
        _require_direction(out_dir, stages)
    previous = _previous_record(out_dir)
    # An extract step is redone by extract itself (--from): it discards nothing before every input has passed and
    # only the redone steps' settings have changed.
    redo = step if step is not None and STAGE[step] == "extract" else None
    contexts = _stage_contexts(ctx, file, stages, model, out_dir, force, redo)  # every value checked before work
    if step is not None and redo is None:
        for path in discard(out_dir, step):
            out.print(f"discarded: {path}", soft_wrap=True)
    for stage, sub in contexts.items():
        if stage == "orthogonalize" and _export_is_current(out_dir, sub, previous):
            out.print(f"reused: {sub.params['out_dir']} (same direction and options)", soft_wrap=True)
            continue
        with sub:
            sub.command.invoke(sub)
        if stage == "extract":  # extract rewrote config.json: record what the later stages run with
            _record(out_dir, stages, contexts, previous)
    _record(out_dir, stages, contexts, previous)
    from tlrefusal.run_report import write_run_report

    render_run(write_run_report(out_dir))


def _stages(steps: str) -> list[str]:
    names = [s.strip() for s in steps.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise typer.BadParameter(f"choose from {', '.join(STAGES)} (comma-separated), got {steps!r}")
    return [s for s in STAGES if s in names]


def _config_file(config: Path | None, model: str | None, run_dir: Path) -> ConfigFile | None:
    """--config, else (no MODEL given) the run folder's own config.json: `run --out RUN --from STEP` goes on with
    the settings RUN was made with."""
    if config is not None:
        return read_config(config)
    if model is None and (run_dir / artifacts.CONFIG).is_file():
        return read_config(run_dir / artifacts.CONFIG)
    return None


def _require_direction(run_dir: Path, stages: list[str]) -> None:
    if "extract" not in stages and not (run_dir / artifacts.DIRECTION).is_file():
        _fail(f"{run_dir} has no direction yet; run the extract stage first (no --from, or --from filter)")


def _stage_contexts(ctx: typer.Context, file: ConfigFile | None, stages: list[str], model: str | None,
                    run_dir: Path, force: bool, redo: str | None = None) -> dict[str, typer.Context]:
    """Each stage's context, parsed as if its command had been typed: the config's values for it, then `run`'s
    flags given on the command line, then what `run` fixes (the run folder, the model, where the export goes)."""
    options = options_by_command(ctx)
    group = ctx.find_root().command
    given = {name: value for name, value in ctx.params.items()
             if name not in _RUN_ONLY and ctx.get_parameter_source(name).name == "COMMANDLINE"}
    contexts = {}
    for stage in stages:
        values = file.for_command(stage, options) if file is not None else {}
        values.update({options[stage][k]: v for k, v in given.items() if k in options[stage]})
        if stage == "extract":
            values.update(model=model, out_dir=run_dir, force=force, from_step=redo)
        elif stage == "eval":
            values.update(run_dir=run_dir)
        else:
            values.update(direction=run_dir, out_dir=_export_path(run_dir, model, values), force=True)
        command = group.get_command(ctx, stage)
        contexts[stage] = command.make_context(stage, [], parent=ctx, default_map=values)
    return contexts


def _export_path(run_dir: Path, model: str | None, values: dict) -> Path:
    """RUN/orthogonalized, a Hugging Face folder, or RUN/orthogonalized.gguf from a GGUF model."""
    gguf = values.get("out_format") == "gguf" or str(values.get("model") or model or "").endswith(".gguf")
    return run_dir / (f"{artifacts.ORTHOGONALIZED}.gguf" if gguf else artifacts.ORTHOGONALIZED)


def _previous_record(run_dir: Path) -> dict:
    path = run_dir / artifacts.CONFIG
    return artifacts.read_json(path).get(RUN_RECORD_KEY, {}) if path.is_file() else {}


def _stage_options(sub: typer.Context) -> dict:
    """The options a stage ran with, as JSON (not the run folder and export path `run` fixes)."""
    fixed = {"config", "run_dir", "direction"} | ({"out_dir", "force"} if sub.info_name == "orthogonalize" else set())
    return {k: _jsonable(v) for k, v in sub.params.items() if k not in fixed}


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _record(run_dir: Path, stages: list[str], contexts: dict[str, typer.Context], previous: dict) -> None:
    """config.json's `run` section: the stages asked for and each later stage's options (kept from an earlier
    `run` for a stage this one did not run)."""
    path = run_dir / artifacts.CONFIG
    if not path.is_file():
        return
    record = {**previous, "steps": sorted(set(previous.get("steps", [])) | set(stages), key=STAGES.index)}
    record.update({stage: _stage_options(sub) for stage, sub in contexts.items() if stage != "extract"})
    data = artifacts.read_json(path)
    if data.get(RUN_RECORD_KEY) != record:
        artifacts.write_json(path, {**data, RUN_RECORD_KEY: record})


def _export_is_current(run_dir: Path, sub: typer.Context, previous: dict) -> bool:
    """RUN's export was made from the run's direction with the same options."""
    from tlrefusal.export.gguf_export import record_path

    export = Path(sub.params["out_dir"])
    record = record_path(export) if export.suffix == ".gguf" else export / artifacts.EXPORT_RECORD
    direction = run_dir / artifacts.DIRECTION
    if not record.is_file() or not direction.is_file():
        return False
    made_from = artifacts.read_json(record).get("direction", {}).get("sha256")
    return made_from == artifacts.file_sha256(direction) and previous.get("orthogonalize") == _stage_options(sub)
