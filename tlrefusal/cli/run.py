"""`tlrefusal extract` (find the refusal direction) and `tlrefusal show` (reprint a run)."""
from pathlib import Path
from typing import Annotated

import typer

from tlrefusal.assets import model_names
from tlrefusal.chat_templates import PAPER_FORMATS
from tlrefusal.cli.common import (
    DATA_PANEL,
    MODEL_HELP,
    MODEL_PANEL,
    OUTPUT_PANEL,
    SELECTION_PANEL,
    AutoBatchSize,
    CacheDir,
    ChatTemplateKwargs,
    ConfigPath,
    Device,
    DeviceMap,
    Dtype,
    Force,
    GpusPerReplica,
    KlThreshold,
    MaxMemory,
    NTrain,
    NVal,
    OffloadFolder,
    Quantize,
    RichProgress,
    SystemPrompt,
    TrustRemoteCode,
    _fail,
    _split_csv,
    app,
    console,
    guarded,
)
from tlrefusal.cli.render import out, render_extract

Source = Annotated[str, typer.Option(rich_help_panel=DATA_PANEL, help="A .json/.jsonl/.csv/.txt file, a dataset name or "
                                                             "demo-harmful / demo-harmless.")]


@app.command(epilog="Example: tlrefusal extract organism --out runs/organism --kl-threshold 2")
@guarded
def extract(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP, show_default=False, metavar="MODEL")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder to write (created; resumed if it holds "
                                                               "the same run).", rich_help_panel=OUTPUT_PANEL)] = None,
    config: ConfigPath = None,
    harmful: Source = "demo-harmful",
    harmless: Source = "demo-harmless",
    harmful_val: Annotated[str | None, typer.Option(help="Separate harmful validation pool (default: the --harmful "
                                                         "prompts train did not take).", rich_help_panel=DATA_PANEL)] = None,
    harmless_val: Annotated[str | None, typer.Option(help="Separate harmless validation pool.", rich_help_panel=DATA_PANEL)]
    = None,
    n_train: NTrain = 128,
    n_val: NVal = 32,
    seed: Annotated[int, typer.Option(help="Sampling seed (paper: 42).", rich_help_panel=DATA_PANEL)] = 42,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="Keep every sampled prompt, not only harmful ones the "
                                                                "model refuses and harmless ones it answers.",
                                            rich_help_panel=DATA_PANEL)] = False,
    min_kept: Annotated[int, typer.Option(help="Stop if fewer prompts survive filtering in a split.",
                                          rich_help_panel=DATA_PANEL)] = 8,
    refusal_phrases: Annotated[str | None, typer.Option(help="Comma-separated phrases whose first tokens define "
                                                             "refusal (default: the paper's for the family).",
                                                        rich_help_panel=DATA_PANEL)] = None,
    refusal_token_ids: Annotated[str | None, typer.Option(help="Comma-separated refusal token ids (overrides "
                                                               "--refusal-phrases).", rich_help_panel=DATA_PANEL)] = None,
    kl_threshold: KlThreshold = 0.1,
    induce_threshold: Annotated[float, typer.Option(help="Discard candidates whose induce score is below this "
                                                         "(paper: 0).", rich_help_panel=SELECTION_PANEL)] = 0.0,
    prune_layers: Annotated[float, typer.Option(help="Discard the last fraction of layers (paper: 0.2).",
                                                rich_help_panel=SELECTION_PANEL)] = 0.2,
    batch_size: AutoBatchSize = "32",
    candidates_per_pass: Annotated[int, typer.Option(
        min=1, rich_help_panel=SELECTION_PANEL,
        help="Candidate directions scored in the same forward passes, each batch row under its own candidate's "
             "hooks (a speed lever: longer matmuls, less padding; scores move only by float rounding).")] = 6,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    quantize: Quantize = None,
    gpus_per_replica: GpusPerReplica = 1,
    trust_remote_code: TrustRemoteCode = False,
    chat_template: Annotated[str | None, typer.Option(
        "--chat-template", metavar="NAME|FILE", rich_help_panel=MODEL_PANEL,
        help=f"Chat template instead of the tokenizer's: a jinja file, or one of the paper's formats "
             f"{', '.join(PAPER_FORMATS)}.")] = None,
    paper: Annotated[bool, typer.Option("--paper", rich_help_panel=MODEL_PANEL,
                                        help="The paper's chat format for the model's family (Qwen, Yi, Gemma, "
                                             "Llama-2, Llama-3; read from its config.json); every other default "
                                             "is already the paper's.")] = False,
    system_prompt: SystemPrompt = None,
    chat_template_kwargs: ChatTemplateKwargs = None,
    from_step: Annotated[str | None, typer.Option(
        "--from", metavar="STEP", rich_help_panel=OUTPUT_PANEL,
        help="Redo from STEP (filter, candidates or selection): discard its artifacts and those that depend on "
             "them (the evaluation's too), keep the earlier steps' as they are, and run; the redone steps' "
             "settings may change (e.g. --from selection --kl-threshold 0.2).")] = None,
    force: Force = False,
    cache_dir: CacheDir = None,
) -> None:
    """Find the refusal direction: sample and filter prompts, cache mean activations, score candidates."""
    from tlrefusal.pipeline import ExtractConfig, describe_failure, run_extract
    from tlrefusal.selection import SelectionConfig

    if model is None:
        raise typer.BadParameter(f"missing; give a built-in model ({model_names()}; `organism` refuses, so it has a "
                               "refusal direction), a local Hugging Face folder, a .gguf file or a hub id", param_hint="'MODEL'")
    if out_dir is None:
        raise typer.BadParameter("missing; give a run folder with --out RUN", param_hint="'--out'")
    extract_config = ExtractConfig(
        model=model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder, quantize=quantize, gpus_per_replica=gpus_per_replica, harmful=harmful, harmless=harmless, harmful_val=harmful_val,
        harmless_val=harmless_val, n_train=n_train, n_val=n_val, seed=seed, filter=not no_filter,
        min_kept=min_kept, refusal_phrases=_split_csv(refusal_phrases, str),
        refusal_token_ids=_split_csv(refusal_token_ids, int), trust_remote_code=trust_remote_code,
        chat_template=chat_template, paper=paper, system_prompt=system_prompt,
        chat_template_kwargs=chat_template_kwargs,
        selection=SelectionConfig(kl_threshold=kl_threshold, induce_threshold=induce_threshold,
                                  prune_layer_fraction=prune_layers, batch_size=batch_size,
                                  candidates_per_pass=candidates_per_pass),
    )
    # Under torchrun every process runs this command; rank 0 alone prints (the library silences the others'
    # progress), and another rank that stops on an error leaves it to rank 0 to print it once.
    from tlrefusal import distributed

    if from_step is not None:
        _check_extract_step(from_step)

    try:
        result = run_extract(extract_config, out_dir, cache_dir=cache_dir, force=force, progress=RichProgress(console),
                             from_step=from_step)
    except distributed.Reported:
        raise typer.Exit(1) from None
    if not distributed.world().is_main:
        return
    for path in result.discarded:
        out.print(f"discarded: {path}", soft_wrap=True)
    render_extract(result)
    if result.direction is None:
        _fail(describe_failure(result.selection))


def _check_extract_step(step: str) -> None:
    """--from's value, refused as a bad parameter (exit 2) before any work."""
    from tlrefusal.errors import TlrefusalError
    from tlrefusal.steps import check_extract_step

    try:
        check_extract_step(step)
    except TlrefusalError as error:
        raise typer.BadParameter(str(error), param_hint="'--from'") from None


@app.command(epilog="Example: tlrefusal show runs/organism --top 20")
@guarded
def show(
    run_dir: Annotated[Path, typer.Argument(help="A run folder from `tlrefusal extract`.")],
    top: Annotated[int, typer.Option(help="Candidates to list, best (lowest bypass) first.")] = 10,
    all_candidates: Annotated[bool, typer.Option("--all", help="List filtered candidates too, with the filter "
                                                               "that discarded each.")] = False,
) -> None:
    """Reprint a run: filter counts, the best candidates, the choice."""
    from tlrefusal.pipeline import load_extract_result

    result = load_extract_result(run_dir)
    render_extract(result, top=top, all_candidates=all_candidates)
