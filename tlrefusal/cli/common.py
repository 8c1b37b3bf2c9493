"""What every `tlrefusal` command shares: the Typer app, consoles, progress bars, error handling, options.

Exit codes: 0 success; 1 an error the user can fix (bad path, bad flag value, data that does not fit), or
no candidate direction survived selection; 2 bad usage (unknown flag, missing argument); 3 an unexpected
error (a bug, or out of memory), printed as one line: `--debug` or TLREFUSAL_DEBUG=1 shows the traceback.
"""
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBar
from typer.exceptions import TyperException

from tlrefusal import __version__
from tlrefusal.assets import model_names
from tlrefusal.batching import is_out_of_memory, parse_batch_size
from tlrefusal.cli.render import out
from tlrefusal.config_file import COMMANDS, read_config
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.precision import DTYPE_CHOICES
from tlrefusal.progress import Advance

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Find, test and remove the refusal direction of chat models (Arditi et al. 2024), "
                       "on TransformerLens hooks.")
console = Console(stderr=True)  # errors and progress; results go to stdout (`render.out`)
EXIT_USER_ERROR, EXIT_UNEXPECTED = 1, 3


class RichProgress:
    """Renders the library's progress tasks as Rich bars on stderr, with the time remaining."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn()]
        else:
            columns.append(TimeElapsedColumn())
        with RichBar(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task_id, n)
            if total is not None:
                bar.update(task_id, completed=total)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "[vllm]" is text
    raise typer.Exit(code)


class _Session:
    """What the root callback parsed for this invocation (set anew on every call)."""

    debug = False


def _debug() -> bool:
    return _Session.debug or os.environ.get("TLREFUSAL_DEBUG") == "1"


def guarded(command: Callable) -> Callable:
    """One red line for every error: user errors exit 1, unexpected ones 3 (traceback with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):  # usage errors, exits: Typer prints them
            raise
        except TlrefusalError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; re-run the same command to resume where a run folder allows it", 130)
        except Exception as exc:
            if _debug():
                raise
            if is_out_of_memory(exc):
                _fail(f"out of memory ({first_line(exc)}): lower --batch-size (extract takes auto), load in --dtype "
                      "bfloat16, or spread the model with --device-map",
                      EXIT_UNEXPECTED)
            _fail(f"unexpected {type(exc).__name__}: {first_line(exc)} (run with --debug, or TLREFUSAL_DEBUG=1, for "
                  "the traceback)", EXIT_UNEXPECTED)

    return wrapper


def _split_csv(value: str | None, kind: type) -> tuple | None:
    if value is None:
        return None
    try:
        items = tuple(kind(x.strip()) for x in value.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected a comma-separated list of {kind.__name__}s, got {value!r}") from None
    if not items:
        raise typer.BadParameter("the list is empty")
    return items


def _version(value: bool) -> None:
    if value:
        out.print(f"tlrefusal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")]
          = False) -> None:
    _Session.debug = debug


# Options shared by several commands: one name, one meaning everywhere.
MODEL_HELP = (f"A built-in model ({model_names()}), a local Hugging Face folder, a .gguf file or a hub id.")
MODEL_PANEL, DATA_PANEL, SELECTION_PANEL, OUTPUT_PANEL = "Model", "Data", "Selection", "Output"
Device = Annotated[str, typer.Option(help="auto (cuda if there is one), cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]


def _dtype_choice(value: str | None) -> str | None:
    if value is not None and value not in DTYPE_CHOICES:
        raise typer.BadParameter(f"choose from {', '.join(DTYPE_CHOICES)}")
    return value


Dtype = Annotated[str, typer.Option(help="auto (the checkpoint's own), float32, bfloat16 or float16.",
                                    callback=_dtype_choice, rich_help_panel=MODEL_PANEL)]
# Several devices and quantized loading (`tlrefusal.placement.Placement`), on every command that loads a model.
DeviceMap = Annotated[str | None, typer.Option(
    metavar="auto|balanced|sequential|FILE.json", rich_help_panel=MODEL_PANEL,
    help="Spread the model over several devices with accelerate (instead of --device): a strategy, or a JSON "
         "file of module -> device (a GPU index, cpu or disk). All GPUs, or all cpu/disk: not both.")]
MaxMemory = Annotated[str | None, typer.Option(metavar="DEV=AMOUNT,...", rich_help_panel=MODEL_PANEL,
                                               help="Per-device budget for --device-map, e.g. 0=70GiB,1=70GiB.")]
OffloadFolder = Annotated[str | None, typer.Option(rich_help_panel=MODEL_PANEL,
                                                   help="Folder for the modules a --device-map puts on disk.")]
Quantize = Annotated[str | None, typer.Option(
    metavar="nf4|int8", rich_help_panel=MODEL_PANEL,
    help="Load quantized with bitsandbytes (pip install 'tlrefusal[quantize]'): for extraction and evaluation; "
         "exports always edit the full-precision checkpoint.")]
GpusPerReplica = Annotated[int, typer.Option(
    rich_help_panel=MODEL_PANEL,
    help="Under torchrun: GPUs per model replica (with --device-map); rank k uses GPUs k*K..k*K+K-1.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow the model's own Python code (off by default).",
                                               rich_help_panel=MODEL_PANEL)]
CacheDir = Annotated[Path | None, typer.Option(help="Where downloads and built-in models are cached (default: "
                                                    "$TLREFUSAL_CACHE or ~/.cache/tlrefusal).", rich_help_panel=MODEL_PANEL)]
Force = Annotated[bool, typer.Option(help="Recompute, replacing what --out holds.", rich_help_panel=OUTPUT_PANEL)]
NTrain = Annotated[int, typer.Option(help="Training prompts per label (paper: 128).", rich_help_panel=DATA_PANEL)]
NVal = Annotated[int, typer.Option(help="Validation prompts per label (paper: 32).", rich_help_panel=DATA_PANEL)]
BatchSize = Annotated[int, typer.Option(help="Prompts per forward pass; lower it if memory runs out.",
                                        rich_help_panel=SELECTION_PANEL)]


def _batch_size(value: str) -> int | str:
    try:
        return parse_batch_size(value)
    except TlrefusalError as exc:
        raise typer.BadParameter(str(exc)) from None


AutoBatchSize = Annotated[str, typer.Option(
    metavar="N|auto", callback=_batch_size, rich_help_panel=SELECTION_PANEL,
    help="Prompts per forward pass, or auto: from 256 down, halving on out-of-memory (manifest.json records "
         "the size each step ran at; give that size to reproduce a run bit for bit).")]
Layer = Annotated[int | None, typer.Option(help="Use the run's scored candidate at this layer (with --position) "
                                                "instead of the chosen direction.", rich_help_panel=SELECTION_PANEL)]
Position = Annotated[int | None, typer.Option(help="Post-instruction position of that candidate (-1 = last).",
                                              rich_help_panel=SELECTION_PANEL)]
KlThreshold = Annotated[float, typer.Option(help="Discard candidates with KL above this (paper: 0.1).",
                                            rich_help_panel=SELECTION_PANEL)]


# `--config FILE` (`tlrefusal.config_file`): the file's values become the command's defaults (click's
# `default_map`), so a flag given on the command line overrides the file, and each value is converted and
# checked exactly as the flag would be.
def command_options(command: typer.core.TyperCommand) -> dict[str, str]:
    """Every accepted spelling of the command's options in a config file -> the parameter name: the option's
    long names and the parameter's own name, dashes as underscores (not `--no-X` of an `--X/--no-X` flag)."""
    names = {}
    for param in command.params:
        if param.name in ("config", "help"):
            continue
        names[param.name] = param.name
        for opt in param.opts:
            if opt.startswith("--"):
                names[opt.removeprefix("--").replace("-", "_")] = param.name
    return names


def options_by_command(ctx: typer.Context) -> dict[str, dict[str, str]]:
    root = ctx.find_root()
    group = root.command
    return {name: command_options(group.get_command(root, name)) for name in COMMANDS}


def _apply_config(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is None or ctx.resilient_parsing:
        return value
    try:
        values = read_config(value).for_command(ctx.command.name, options_by_command(ctx))
    except TlrefusalError as exc:
        _fail(str(exc))
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


ConfigPath = Annotated[Path | None, typer.Option(
    "--config", metavar="FILE", callback=_apply_config, is_eager=True, rich_help_panel=OUTPUT_PANEL,
    help="Settings from a TOML, YAML or JSON file (options by name; a run's config.json; the NNsight "
         "replication's config.yaml); flags given here override it.")]


# The chat prompts' system message and template variables (`tlrefusal.chat.ChatOptions`), on every command that
# renders prompts for a run. The values are checked where the config is built (`parse_template_kwargs`), so a bad
# one is a one-line error before anything is written.
SystemPrompt = Annotated[str | None, typer.Option(
    "--system-prompt", metavar="TEXT|none|default", rich_help_panel=MODEL_PANEL,
    help="System message of every prompt: the TEXT; none, an empty one (drops a default system prompt the template "
         "inserts); default, no system message (what the template does without one, e.g. Llama-3.1's date lines). "
         "Not given: default for extract, the run's for eval.")]
ChatTemplateKwargs = Annotated[str | None, typer.Option(
    "--chat-template-kwargs", metavar="KEY=VALUE,...", rich_help_panel=MODEL_PANEL,
    help="Chat template variables, e.g. enable_thinking=false (Qwen3 thinking off: its empty reasoning block "
         "becomes post-instruction tokens); values true/false, numbers, null or text; none for no variables. Not "
         "given: none for extract, the run's for eval.")]
