"""RUN/report.md (`tlrefusal run`): the whole run on one page, read back from its artifacts.

The direction chosen and the selection's counts (`tlrefusal extract`), the evaluation's tables (the same text
as RUN/eval/report.md), and the export with its verification. Each part is there when its stage has run.
"""
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.evaluation.report import EvalReport, markdown_report
from tlrefusal.pipeline import ExtractResult, load_extract_result

_CHECKS = ("verification", "weights", "exact_check", "logits")  # an export record's checks, each with `passed`


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    checks: dict[str, bool]  # check -> passed; empty: not verified

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    extract: ExtractResult | None
    eval: EvalReport | None
    export: ExportSummary | None


def run_summary(run_dir: Path) -> RunSummary:
    """What RUN holds, each stage's part None until it has run."""
    extract = load_extract_result(run_dir) if (run_dir / artifacts.SELECTION).is_file() else None
    report_path = run_dir / artifacts.EVAL_DIR / artifacts.REPORT_JSON
    report = EvalReport.from_json(artifacts.read_json(report_path)) if report_path.is_file() else None
    return RunSummary(run_dir, extract, report, _export(run_dir))


def _export(run_dir: Path) -> ExportSummary | None:
    from tlrefusal.export.gguf_export import record_path

    folder, gguf = run_dir / artifacts.ORTHOGONALIZED, run_dir / f"{artifacts.ORTHOGONALIZED}.gguf"
    for path, record in ((folder, folder / artifacts.EXPORT_RECORD), (gguf, record_path(gguf))):
        if record.is_file():
            data = artifacts.read_json(record)
            checks = {k: bool(data[k]["passed"]) for k in _CHECKS if isinstance(data.get(k), dict)}
            return ExportSummary(path, checks)
    return None


def write_run_report(run_dir: Path) -> RunSummary:
    summary = run_summary(run_dir)
    artifacts.write_text(run_dir / artifacts.RUN_REPORT, markdown(summary))
    return summary


def markdown(summary: RunSummary) -> str:
    lines = [f"# tlrefusal run: {summary.run_dir}", ""]
    ex = summary.extract
    if ex is not None:
        lines += ["## Direction", ""]
        lines += [f"- {name}: kept {kept} of {sampled}, baseline refusal {ex.baseline_refusal[name]:.0%}"
                  for name, (kept, sampled) in ex.kept.items()]
        c = ex.selection.chosen
        lines.append("- chosen: none survived the filters" if c is None else
                     f"- chosen: position {c.position}, layer {c.layer} (bypass {c.bypass_score:.3f}, induce "
                     f"{c.induce_score:.3f}, KL {c.kl_score:.4f})")
        lines.append("")
    if summary.eval is not None:
        body = markdown_report(summary.eval).splitlines()
        lines += ["## Evaluation", ""] + [("#" + line if line.startswith("#") else line) for line in body[1:]]
    if summary.export is not None:
        e = summary.export
        status = ("verified (" + ", ".join(e.checks) + ")" if e.verified else
                  "NOT verified" if not e.checks else
                  "failed: " + ", ".join(k for k, ok in e.checks.items() if not ok))
        lines += ["## Export", "", f"- `{e.path}`: {status}", ""]
    return "\n".join(lines)
