"""`tlrefusal orthogonalize` (edit the weights), `tlrefusal eval` (measure) and `tlrefusal compare`."""
from pathlib import Path
from typing import Annotated

import typer

from tlrefusal.cli.common import (
    DATA_PANEL,
    MODEL_PANEL,
    OUTPUT_PANEL,
    BatchSize,
    CacheDir,
    ChatTemplateKwargs,
    ConfigPath,
    Device,
    DeviceMap,
    Dtype,
    Force,
    Layer,
    MaxMemory,
    OffloadFolder,
    Position,
    Quantize,
    RichProgress,
    SystemPrompt,
    TrustRemoteCode,
    _dtype_choice,
    _split_csv,
    app,
    console,
    guarded,
)
from tlrefusal.cli.render import out, render_comparison, render_eval, render_export


@app.command(epilog="Example: tlrefusal orthogonalize runs/organism --out models/organism-orthogonalized  |  "
                     "GGUF: tlrefusal orthogonalize RUN --model MODEL.Q4_1.gguf --out MODEL-orthogonalized.gguf")
@guarded
def orthogonalize(
    direction: Annotated[Path, typer.Argument(help="A run folder from `tlrefusal extract` or a direction file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the Hugging Face checkpoint (must not exist or "
                                                       "be empty), or FILE.gguf for a GGUF file rewritten from a "
                                                       "GGUF --model (its record: FILE.orthogonalization.json).",
                                          rich_help_panel=OUTPUT_PANEL)],
    config: ConfigPath = None,
    out_format: Annotated[str, typer.Option("--format", metavar="auto|hf|gguf",
                                            help="What --out is: auto follows its suffix (.gguf: gguf).",
                                            rich_help_panel=OUTPUT_PANEL)] = "auto",
    gguf_fallback_type: Annotated[str, typer.Option(
        metavar="TYPE", help="GGUF: the type an edited tensor is written in when the gguf package cannot quantize "
                             "its own (the K-quants): Q8_0, F16, F32, BF16, Q4_0, Q4_1, Q5_0 or Q5_1.",
        rich_help_panel=OUTPUT_PANEL)] = "Q8_0",
    gguf_edited_type: Annotated[str | None, typer.Option(
        metavar="TYPE", help="GGUF: write every edited tensor in TYPE instead of its own (e.g. Q8_0 for a 4-bit "
                             "file, where requantizing rounds about half of the edit back; the file grows).",
        rich_help_panel=OUTPUT_PANEL)] = None,
    layer: Layer = None,
    position: Position = None,
    model: Annotated[str | None, typer.Option(help="The model to edit (default: the one the direction was "
                                                   "extracted from).", rich_help_panel=MODEL_PANEL)] = None,
    approximate: Annotated[bool, typer.Option(help="Export architectures where weights cannot equal hook ablation "
                                                   "(Gemma-2/3) and record the measured gap.")] = False,
    tied_embeddings: Annotated[str, typer.Option(
        metavar="untie|shared",
        help="For a model whose unembedding shares the embedding matrix (Gemma, SmolLM2). untie: lm_head keeps "
             "the original matrix, exactly equal to hook ablation. shared: the paper's code, one edited matrix; "
             "NOT equal to hook ablation: the unembedding loses its component along r, so logits change "
             "(verified against hook ablation plus that edit). shared is refused for untied models.")] = "untie",
    verify: Annotated[str | None, typer.Option(
        metavar="full|layers:K|weights|none",
        help="full: reload the export with plain transformers and compare its logits and greedy text with hook "
             "ablation of the source (one model in memory at a time). layers:K: the same on both models cut to "
             "their first K layers (memory of K layers; checks the embeddings, those layers and the unembedding). "
             "weights: load no model; read every edited tensor back and check it has no component along the "
             "direction and equals W - r r^T W, and that every other tensor is the source's, byte for byte "
             "(memory below one tensor). none: skip. [default: full]")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="The same as --verify none.")] = False,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    force: Force = False,
    trust_remote_code: TrustRemoteCode = False,
    cache_dir: CacheDir = None,
) -> None:
    """Project the refusal direction out of every weight that writes to the residual stream, and save a Hugging
    Face checkpoint that `transformers` loads as it is (paper, Appendix E), or, from a GGUF model, a GGUF file
    for llama.cpp, Ollama or LM Studio (each edited tensor requantized to its own type). --dtype, --device,
    --device-map, --max-memory, --offload-folder: where the verification loads its models; the weights are
    edited as stored, always from the full-precision checkpoint (a run extracted with --quantize included)."""
    from tlrefusal.errors import TlrefusalError
    from tlrefusal.export import orthogonalize_direction
    from tlrefusal.placement import Placement

    if no_verify and verify not in (None, "none"):
        raise TlrefusalError(f"--no-verify and --verify {verify} disagree; give one")
    placement = Placement(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder)
    result = orthogonalize_direction(direction, out_dir, model, cache_dir, layer=layer, position=position,
                                     placement=placement, approximate=approximate,
                                     tied_embeddings=tied_embeddings,
                                     verify="none" if no_verify else verify or "full", force=force,
                                     trust_remote_code=trust_remote_code, out_format=out_format,
                                     gguf_fallback_type=gguf_fallback_type, gguf_edited_type=gguf_edited_type,
                                     progress=RichProgress(console))
    render_export(result.record, result.out)


@app.command("eval", epilog="Example: tlrefusal eval runs/organism --n-eval 32 --max-new-tokens 64  |  the paper's "
                             "settings: tlrefusal eval RUN --paper --harmless HARMLESS_TEST.json")
@guarded
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder from `tlrefusal extract` (or `demo`).")],
    config: ConfigPath = None,
    judge_only: Annotated[bool, typer.Option("--judge-only", help="Score the completions already in RUN/eval "
                                                                  "(refusal, and safety with --guard-model) "
                                                                  "without loading the evaluated model: e.g. "
                                                                  "with the guard on another machine.")] = False,
    paper: Annotated[bool, typer.Option("--paper", help="The original code's settings: JailbreakBench whole and n "
                                                        "harmless prompts from the run's seed stream (--harmless: "
                                                        "the test pool), --stop eos, 512 new tokens, --n-ce 4096, "
                                                        "the paper's benchmarks on every document. Options given "
                                                        "explicitly override it.")] = False,
    harmful: Annotated[list[str] | None, typer.Option(help="Harmful prompt set (repeatable): a file or a name "
                                                           "(jailbreakbench, harmbench, demo-harmful). Default: the "
                                                           "run's pool minus the prompts it used (--paper: "
                                                           "jailbreakbench).",
                                                      rich_help_panel=DATA_PANEL)] = None,
    harmless: Annotated[list[str] | None, typer.Option(help="Harmless prompt set (repeatable): a file, alpaca or "
                                                            "demo-harmless. Default: as for --harmful (--paper: "
                                                            "required, the harmless test pool).",
                                                       rich_help_panel=DATA_PANEL)] = None,
    eval_sets: Annotated[str | None, typer.Option(help="held-out: n seeded prompts per set minus the run's own "
                                                       "(default); paper: harmful sets whole, harmless drawn by "
                                                       "continuing the run's seeded sampling stream.",
                                                  rich_help_panel=DATA_PANEL)] = None,
    n_eval: Annotated[int | None, typer.Option(help="Prompts per dataset [default: 100, the paper's].",
                                               rich_help_panel=DATA_PANEL)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Reply length [default: 512, the paper's].")] = None,
    stop: Annotated[str | None, typer.Option(help="Where replies stop: turn (EOS or the template's end-of-turn "
                                                  "token; default) or eos (EOS only, the paper's).")] = None,
    batch_size: BatchSize = 16,
    layer: Layer = None,
    position: Position = None,
    actadd_plus: Annotated[bool, typer.Option("--actadd-plus", help="Add +r on harmful prompts too (the NNsight "
                                                                    "replication), not the paper's -r.")] = False,
    model: Annotated[str | None, typer.Option(help="Evaluate this model as it is, without hooks (e.g. an "
                                                   "orthogonalized checkpoint).", rich_help_panel=MODEL_PANEL)] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16 (default: the run's).",
                                              callback=_dtype_choice, rich_help_panel=MODEL_PANEL)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the run's).",
                                               rich_help_panel=MODEL_PANEL)] = None,
    guard_model: Annotated[Path | None, typer.Option(help="A local Llama Guard 2 folder for the safety score "
                                                          "(without it: reported unavailable).", rich_help_panel=MODEL_PANEL)]
    = None,
    ce: Annotated[str | None, typer.Option(help="CE-loss datasets: pile, alpaca, on-distribution (empty: none) "
                                                "[default: all three].", rich_help_panel=DATA_PANEL)] = None,
    n_ce: Annotated[int | None, typer.Option(help="Sequences per CE dataset [default: 64; the paper, --paper: "
                                                  "4096].", rich_help_panel=DATA_PANEL)] = None,
    pile: Annotated[str, typer.Option(help="'pile' (the hub) or a local text / .jsonl file.", rich_help_panel=DATA_PANEL)]
    = "pile",
    alpaca: Annotated[str, typer.Option(help="'alpaca' (the hub) or a local .json/.jsonl with instruction and "
                                             "output.", rich_help_panel=DATA_PANEL)] = "alpaca",
    magnitude: Annotated[list[str] | None, typer.Option(help="Extra prompt set for the magnitude study "
                                                             "(repeatable), e.g. xstest.", rich_help_panel=DATA_PANEL)] = None,
    tasks: Annotated[str | None, typer.Option(help="lm-eval tasks: names (NAME:SHOTS for a few-shot count) or local "
                                                   "task YAML files (empty: none) [default: mmlu,arc_challenge,"
                                                   "truthfulqa_mc2; --paper: the paper's five].",
                                              rich_help_panel=DATA_PANEL)] = None,
    coherence_limit: Annotated[int | None, typer.Option(help="Documents per lm-eval (sub)task; 0 for all (the "
                                                             "paper's, --paper) [default: 100].",
                                                        rich_help_panel=DATA_PANEL)] = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    quantize: Quantize = None,
    guard_device: Annotated[str | None, typer.Option(help="Where the Llama Guard model runs: auto, cpu, cuda or "
                                                          "cuda:N (default: the evaluated model's device; it loads "
                                                          "after that model is freed).",
                                                     rich_help_panel=MODEL_PANEL)] = None,
    guard_dtype: Annotated[str | None, typer.Option(help="The Llama Guard model's dtype: auto, float32, bfloat16 "
                                                         "or float16 (default: the evaluated model's).",
                                                    callback=_dtype_choice, rich_help_panel=MODEL_PANEL)] = None,
    backend: Annotated[str, typer.Option(metavar="bridge|vllm", rich_help_panel=MODEL_PANEL, help=(
        "What generates completions and runs lm-eval: bridge (TransformerLens, with or without hooks) or vllm "
        "(large batches, tensor parallel; only with --model: vLLM cannot project out a direction; CE loss still "
        "runs on the bridge). pip install 'tlrefusal[vllm]' on a CUDA machine."))] = "bridge",
    tensor_parallel: Annotated[int, typer.Option(help="GPUs per vLLM engine (--backend vllm).",
                                                 rich_help_panel=MODEL_PANEL)] = 1,
    system_prompt: SystemPrompt = None,
    chat_template_kwargs: ChatTemplateKwargs = None,
    cache_dir: CacheDir = None,
) -> None:
    """Refusal and safety scores, CE loss, coherence and the magnitude study, under baseline, ablation and
    activation addition; writes RUN/eval/report.json and report.md. With --model: that checkpoint as it is,
    on the bridge or (--backend vllm) on vLLM."""
    from tlrefusal.evaluation.config import EvalConfig
    from tlrefusal.evaluation.runner import run_eval

    given = {"n": n_eval, "max_new_tokens": max_new_tokens, "eval_sets": eval_sets, "stop": stop, "ce_n": n_ce,
             "harmful": tuple(harmful) if harmful else None, "harmless": tuple(harmless) if harmless else None,
             "ce": None if ce is None else _split_csv(ce, str) if ce.strip() else (),
             "tasks": None if tasks is None else _split_csv(tasks, str) if tasks.strip() else (),
             "actadd_sign": "plus" if actadd_plus else None}
    given = {k: v for k, v in given.items() if v is not None}  # left out: the preset's or the default
    if coherence_limit is not None:
        given["coherence_limit"] = coherence_limit or None  # 0: every document
    eval_config = EvalConfig.resolve(paper, **given, batch_size=batch_size, model=model, guard_model=guard_model,
                                pile=pile, alpaca=alpaca, magnitude=tuple(magnitude or ()), layer=layer,
                                position=position, device=device, dtype=dtype, device_map=device_map,
                                max_memory=max_memory, offload_folder=offload_folder, quantize=quantize,
                                guard_device=guard_device, guard_dtype=guard_dtype, backend=backend,
                                tensor_parallel=tensor_parallel, system_prompt=system_prompt,
                                chat_template_kwargs=chat_template_kwargs)
    report = run_eval(run_dir, eval_config, cache_dir, RichProgress(console), judge_only=judge_only)
    render_eval(report, run_dir)


@app.command(epilog="Example: tlrefusal compare runs/organism runs/organism-seed7")
@guarded
def compare(
    run_a: Annotated[Path, typer.Argument(help="A tlrefusal run with an eval report.")],
    run_b: Annotated[Path, typer.Argument(help="Another tlrefusal run, or a run folder of the NNsight "
                                               "replication.")],
) -> None:
    """Set two evaluated runs side by side (writes A/eval/compare.md); evaluates nothing."""
    from tlrefusal import artifacts
    from tlrefusal.evaluation.compare import compare_runs, fmt

    comparison = compare_runs(run_a, run_b)
    render_comparison(comparison, fmt)
    out.print(f"written: {run_a / artifacts.EVAL_DIR / artifacts.COMPARE_MD}")
