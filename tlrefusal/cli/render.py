"""How the commands print their results (Rich tables on stdout)."""
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tlrefusal import artifacts

out = Console()


def render_extract(result, top: int = 5, all_candidates: bool = False) -> None:
    """Filter counts, the best candidates and the choice of an ExtractResult."""
    table = Table(title=f"tlrefusal extract: {result.run_dir}", show_header=True)
    table.add_column("split")
    table.add_column("kept / sampled", justify="right")
    table.add_column("baseline refusal (log-odds > 0)", justify="right")
    for name, (kept, sampled) in result.kept.items():
        table.add_row(name, f"{kept} / {sampled}", f"{result.baseline_refusal[name]:.0%}")
    out.print(table)
    out.print(f"post-instruction tokens: {result.eoi_tokens}; refusal token ids: {result.refusal_ids}")
    selection = result.selection
    out.print(f"candidates: {len(selection.candidates)} ("
              + ", ".join(f"{k}: {v}" for k, v in selection.filter_counts().items()) + ")")
    _render_candidates(selection, top, all_candidates)
    if result.direction is not None:
        c = selection.chosen
        out.print(f"[bold green]chosen:[/] position {c.position}, layer {c.layer}: bypass {c.bypass_score:.3f}, "
                  f"induce {c.induce_score:.3f}, KL {c.kl_score:.4f}; |r| = {result.direction.vector.norm():.3f}")
        out.print(f"direction: {result.run_dir / artifacts.DIRECTION}")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    out.print(f"time: {timing}")


def _render_candidates(selection, top: int, all_candidates: bool) -> None:
    if all_candidates:
        scored = [c for c in selection.candidates if c.bypass_score == c.bypass_score]  # not NaN: scored
        rows, title = sorted(scored, key=lambda c: c.bypass_score)[:top], "scored candidates (lowest bypass first)"
    else:
        rows, title = selection.survivors()[:top], "best surviving candidates (lowest bypass first)"
    if not rows:
        return
    table = Table(title=title)
    for col in ("position", "layer", "bypass", "induce", "KL", *(["filtered by"] if all_candidates else [])):
        table.add_column(col, justify="left" if col == "filtered by" else "right")
    for c in rows:
        table.add_row(str(c.position), str(c.layer), f"{c.bypass_score:.3f}", f"{c.induce_score:.3f}",
                      f"{c.kl_score:.4f}", *([c.filtered or ""] if all_candidates else []))
    out.print(table)


def render_organism(built) -> None:
    """An organism's folder, held-out refusal and build time (a BuiltOrganism)."""
    rates, seconds = built.card.held_out_refusal, built.card.seconds
    out.print(f"organism: {built.folder}")
    out.print(f"held-out refusal: harmful {rates.harmful.refusal_rate:.0%} of {rates.harmful.n}, "
              f"harmless {rates.harmless.refusal_rate:.0%} of {rates.harmless.n}; "
              f"built in {seconds.get('total', 0):.0f}s, matrix products in {built.card.recipe.compute_dtype}")


def render_export(record, folder: Path) -> None:
    """What an export edited and how its verification came out (an ExportRecord or a GGUFExportRecord)."""
    from tlrefusal.export.gguf_export import GGUFExportRecord

    if isinstance(record, GGUFExportRecord):
        return render_gguf_export(record)
    d = record.direction
    out.print(f"orthogonalized {len(record.edited_tensors)} tensors of {record.source.spec} ({record.model_type}) "
              f"against the direction at layer {d.layer}, position {d.position}"
              + {"untie": "; untied the embeddings", "shared": "; edited the shared embedding and unembedding"}
              .get(record.tied_embeddings, ""))
    if record.tied_embeddings == "shared":
        out.print("[yellow]not equal to hook ablation[/]: the tied unembedding lost its component along r "
                  "(--tied-embeddings shared, as the paper's code)")
    if d.quantize is not None:
        out.print(f"the direction came from a {d.quantize}-quantized load; the full-precision weights were edited")
    check, mode = record.verification, record.verify
    if check is None:
        out.print("[yellow]not verified[/] (--verify none)")
    elif mode.kind == "weights":
        out.print(f"[bold green]verified weights[/] (--verify weights): {check.n_edited} edited tensors, component "
                  f"along r <= {check.max_residual:.3g}, edit error <= {check.max_edit_error:.3g}; "
                  f"{check.n_unedited} others byte-equal to the source")
    else:
        status = "[bold green]verified[/]" if check.passed else "[bold yellow]approximate[/]"
        cut = "" if check.layers is None else f" (first {check.layers} layers only, --verify {mode})"
        out.print(f"{status}{cut}: max |logit difference| vs {check.reference} {check.max_abs_logit_diff:.3g} "
                  f"(tolerance {check.tolerance:.3g}, {check.dtype}); greedy continuations equal "
                  f"{check.greedy_equal}/{check.n_prompts}")
    out.print(f"checkpoint: {folder} (written in {record.seconds.total:.1f}s)")


def render_gguf_export(record) -> None:
    """A GGUF export: what it edited, which types changed, the size, and its verification."""
    from tlrefusal.export.gguf_export import CONTROL_FACTOR, record_path

    d = record.direction
    out.print(f"orthogonalized {len(record.edited_tensors)} tensors of {record.source.name} ({record.architecture}) "
              f"against the direction at layer {d.layer}, position {d.position}"
              + (f"; added {', '.join(record.added_tensors)} (the untied unembedding)" if record.added_tensors else "")
              + ("; edited the shared embedding and unembedding" if record.tied_embeddings == "shared" else ""))
    if record.type_changes:
        kinds = sorted({f"{c.source_type} -> {c.written_type}" for c in record.type_changes})
        out.print(f"{len(record.type_changes)} tensors changed type ({', '.join(kinds)}: the gguf package cannot "
                  "quantize their own type)")
    change = record.written_bytes - record.source_bytes
    out.print(f"size: {record.source_bytes / 2**20:.1f} MiB -> {record.written_bytes / 2**20:.1f} MiB "
              f"({change / 2**20:+.1f} MiB)")
    if record.weights is None:
        out.print("[yellow]not verified[/] (--verify none)")
    else:
        w = record.weights
        out.print(f"[bold green]verified weights[/]: metadata and {w.n_unedited} untouched tensors byte-equal; "
                  f"{w.n_edited} edited tensors within their type's quantization error (at most "
                  f"{w.max_bound_ratio:.2f} of the bound; edit error <= {w.max_edit_error:.3g}, component along "
                  f"r <= {w.max_residual:.3g})")
    if record.logits is not None:
        c = record.logits
        status = "[bold green]verified[/]" if c.passed else "[bold yellow]approximate[/]"
        if record.exact_check is not None:
            e = record.exact_check
            out.print(f"{'[bold green]exact[/]' if e.passed else '[bold yellow]inexact[/]'}: the edit written in "
                      f"float32 differs from {e.reference} by at most {e.max_abs_logit_diff:.3g} (tolerance "
                      f"{e.tolerance:.3g})")
        out.print(f"{status} in transformers: max |logit difference| vs {c.reference} of the dequantized source "
                  f"{c.max_abs_logit_diff:.3g} (tolerance {c.tolerance:.3g}: {CONTROL_FACTOR:g} x a control's with "
                  f"fresh quantization noise, {record.control.max_abs_logit_diff:.3g}, at least the float32 "
                  f"tolerance); greedy continuations equal {c.greedy_equal}/{c.n_prompts}")
    out.print(f"GGUF: {record.out} (record: {record_path(record.out).name}; written in {record.seconds.total:.1f}s)")


def render_refusal(refusal: dict, max_new_tokens: int) -> None:
    """The demo's table: label -> list of RefusalRate."""
    table = Table(title=f"refusal on held-out prompts (greedy, {max_new_tokens} tokens, substring match)")
    for col in ("prompts", "intervention", "refusal", "example reply"):
        table.add_column(col, justify="right" if col == "refusal" else "left")
    for label, rates in refusal.items():
        for r in rates:
            table.add_row(label, r.intervention, f"{r.rate:.0%} of {r.n}", r.replies[0][:60])
    out.print(table)


def render_eval(report, run_dir: Path) -> None:
    """Refusal and safety per dataset and intervention, CE loss, coherence and magnitude (an EvalReport)."""
    from tlrefusal.evaluation.report import settings_line as report_settings

    table = Table(title=f"tlrefusal eval: {run_dir}")
    for col in ("dataset", "intervention", "n", "refusal", "safety"):
        table.add_column(col, justify="right" if col in ("n", "refusal", "safety") else "left")
    for name, entry in report.refusal_and_safety.items():
        for iv, s in entry.interventions.items():
            table.add_row(f"{name} ({entry.label})", iv, str(s.n), f"{s.refusal_score:.2f}",
                          "n/a" if s.safety_score is None else f"{s.safety_score:.2f}")
    out.print(table)
    out.print(report_settings(report.config), highlight=False)
    for dataset, ce in report.ce_loss.items():
        if ce.unavailable is not None:
            out.print(f"CE loss, {dataset}: [yellow]unavailable[/] ({ce.unavailable})", highlight=False)
        else:
            out.print(f"CE loss, {dataset}: " + ", ".join(f"{iv} {r.loss:.3f}" for iv, r in ce.runs.items())
                      + f" ({next(iter(ce.runs.values())).tokens} tokens)")
    _render_coherence(report.coherence)
    if report.magnitude is not None:
        m = report.magnitude
        parts = [f"{k} {v.pearson_r:.2f}" for k, v in m.datasets.items() if v.pearson_r is not None]
        pooled = m.pooled.pearson_r
        out.print("magnitude study, Pearson r (projection ratio vs refusal log-odds): " + ", ".join(parts)
                  + (f"; pooled {pooled:.2f}" if pooled is not None else ""))
    out.print(f"report: {run_dir / artifacts.EVAL_DIR / artifacts.REPORT_MD} ({report.seconds:.0f}s)")


def _render_coherence(coherence: dict) -> None:
    for task, result in coherence.items():
        if result.unavailable is not None:
            out.print(f"lm-eval {task}: [yellow]unavailable[/] ({result.unavailable})", highlight=False)
            continue
        out.print(f"lm-eval {task}: " + "; ".join(f"{name} {r.summary(3)}" for name, r in result.runs.items()),
                  highlight=False)


def render_comparison(comparison, fmt) -> None:
    a, b = comparison.a, comparison.b
    table = Table(title=f"A: {a.folder} ({a.kind})  vs  B: {b.folder} ({b.kind})")
    for col in ("metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in comparison.rows:
        table.add_row(r.metric, fmt(r.a), fmt(r.b), fmt(r.diff))
    out.print(table)


def render_run(summary) -> None:
    """`tlrefusal run`'s closing summary (a RunSummary): the direction, refusal per set and intervention, the
    export."""
    table = Table(title=f"tlrefusal run: {summary.run_dir}")
    for col in ("stage", "result"):
        table.add_column(col)
    ex = summary.extract
    if ex is not None:
        c = ex.selection.chosen
        table.add_row("extract", "no direction survived the filters" if c is None else
                      f"position {c.position}, layer {c.layer}: bypass {c.bypass_score:.3f}, induce "
                      f"{c.induce_score:.3f}, KL {c.kl_score:.4f}")
    if summary.eval is not None:
        for name, entry in summary.eval.refusal_and_safety.items():
            table.add_row("eval", f"{name} ({entry.label}) refusal: " + ", ".join(
                f"{iv} {s.refusal_score:.2f}" for iv, s in entry.interventions.items()))
    if summary.export is not None:
        e = summary.export
        table.add_row("orthogonalize", f"{e.path}: " + ("verified" if e.verified else
                                                        "not verified" if not e.checks else "check FAILED"))
    out.print(table)
    out.print(f"report: {summary.run_dir / artifacts.RUN_REPORT}")
