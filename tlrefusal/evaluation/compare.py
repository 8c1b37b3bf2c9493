"""Set two runs side by side: ours (`tlrefusal eval` report) or a published NNsight replication run.

Either side can be a tlrefusal run folder (after `tlrefusal eval`) or a folder in the layout of the NNsight
replication's `runs/<model>/` (`direction_metadata.json`, `select_direction/`, `evaluation/`,
`loss_evals/`, `coherence_evals/`, `magnitude_eval/`). Both are read into one flat summary: metric name
-> value, with the same names for the same quantities, then tabulated with differences.

Names: `chosen.position`, `chosen.layer`, `chosen.bypass|induce|kl`, `refusal.<dataset>.<intervention>`,
`safety.<dataset>.<intervention>`, `ce.<pile|alpaca|on-distribution>.<intervention>`,
`magnitude.pooled_r`. Interventions are `baseline`, `ablation` and `actadd`; the replication's actadd
always adds +r, ours subtracts r on harmful prompts unless evaluated with `--actadd-plus`, which the
table notes.
"""
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.report import EvalReport

REPLICATION_CE_NAMES = {"pile": "pile", "alpaca": "alpaca", "alpaca_custom_completions": "on-distribution"}
Metric = int | float | None


@dataclass(frozen=True)
class RunSummary:
    """One side of a comparison: what kind of run, where, and its metrics by name (module doc)."""

    kind: str  # "tlrefusal" or "nnsight replication"
    folder: str
    metrics: dict[str, Metric]

    def to_json(self) -> dict:
        return {"kind": self.kind, "folder": self.folder, "metrics": self.metrics}

    @classmethod
    def from_json(cls, data: dict) -> "RunSummary":
        return cls(kind=data["kind"], folder=data["folder"], metrics=data["metrics"])


@dataclass(frozen=True)
class ComparisonRow:
    metric: str
    a: Metric
    b: Metric
    diff: Metric  # b - a where both are numbers

    def to_json(self) -> dict:
        return {"metric": self.metric, "a": self.a, "b": self.b, "diff": self.diff}


@dataclass(frozen=True)
class Comparison:
    a: RunSummary
    b: RunSummary
    rows: list[ComparisonRow]

    def to_json(self) -> dict:
        return {"a": self.a.to_json(), "b": self.b.to_json(), "rows": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, data: dict) -> "Comparison":
        return cls(a=RunSummary.from_json(data["a"]), b=RunSummary.from_json(data["b"]),
                   rows=[ComparisonRow(**row) for row in data["rows"]])


def compare_runs(a_folder: Path, b_folder: Path) -> Comparison:
    """Set run B beside run A; writes A/eval/compare.json and compare.md and returns the comparison."""
    a, b = load_summary(a_folder), load_summary(b_folder)
    comparison = Comparison(a, b, compare(a, b))
    out_dir = a_folder / artifacts.EVAL_DIR
    artifacts.write_json(out_dir / artifacts.COMPARE_JSON, comparison.to_json())
    artifacts.write_text(out_dir / artifacts.COMPARE_MD, markdown_comparison(comparison))
    return comparison


def load_summary(folder: Path) -> RunSummary:
    """The metrics of a tlrefusal run (after `tlrefusal eval`) or of an NNsight replication run folder."""
    if (folder / "direction_metadata.json").is_file():
        return RunSummary("nnsight replication", str(folder), _repl_metrics(folder))
    report_path = folder / artifacts.EVAL_DIR / artifacts.REPORT_JSON
    if (folder / artifacts.SELECTION).is_file():
        if not report_path.is_file():
            raise TlrefusalError(f"{folder} has no eval report; run `tlrefusal eval {folder}` first")
        return RunSummary("tlrefusal", str(folder), _our_metrics(folder, report_path))
    raise TlrefusalError(f"{folder} is neither a tlrefusal run nor an NNsight replication run folder")


def _repl_metrics(folder: Path) -> dict[str, Metric]:
    m: dict[str, Metric] = {}
    meta = artifacts.read_json(folder / "direction_metadata.json")
    m["chosen.position"], m["chosen.layer"] = meta["pos"], meta["layer"]
    evaluations = folder / "select_direction" / "direction_evaluations.json"
    if evaluations.is_file():
        for c in artifacts.read_json(evaluations):
            if c["position"] == meta["pos"] and c["layer"] == meta["layer"]:
                m["chosen.bypass"], m["chosen.induce"], m["chosen.kl"] = \
                    c["bypass_score"], c["induce_score"], c["kl_div_score"]
    for path in sorted((folder / "evaluation").glob("*_eval_results.json")):
        dataset, intervention = path.name.removesuffix("_eval_results.json").rsplit("_", 1)
        data = artifacts.read_json(path)
        m[f"refusal.{dataset}.{intervention}"] = 1 - data["substring_matching_success_rate"]
        if data.get("llamaguard2_success_rate") is not None:
            m[f"safety.{dataset}.{intervention}"] = 1 - data["llamaguard2_success_rate"]
    for path in sorted((folder / "loss_evals").glob("*_loss_eval.json")):
        intervention = path.name.removesuffix("_loss_eval.json")
        for name, values in artifacts.read_json(path).items():
            m[f"ce.{REPLICATION_CE_NAMES.get(name, name)}.{intervention}"] = values["ce_loss"]
    for path in sorted((folder / "coherence_evals").glob("*.json")):
        for task, acc in artifacts.read_json(path).items():
            m[f"coherence.{task}.{path.stem}"] = acc
    corr = folder / "magnitude_eval" / "magnitude_corr.json"
    if corr.is_file():
        m["magnitude.pooled_r"] = artifacts.read_json(corr)["corr"]
    return m


# lm-eval's tasks closest to the replication's own multiple-choice implementation: its name -> (ours, metric).
COHERENCE_COUNTERPARTS = {"arc": ("arc_challenge", "acc,none"), "mmlu": ("mmlu", "acc,none"),
                          "truthful_qa": ("truthfulqa_mc1", "acc,none")}


def _our_metrics(folder: Path, report_path: Path) -> dict[str, Metric]:
    m: dict[str, Metric] = {}
    report = EvalReport.from_json(artifacts.read_json(report_path))
    used = (report.direction.position, report.direction.layer)  # the chosen one, or --layer/--position's
    candidates = artifacts.read_json(folder / artifacts.SELECTION)["candidates"]
    chosen = next((c for c in candidates if (c["position"], c["layer"]) == used), None)
    if chosen:
        m["chosen.position"], m["chosen.layer"] = chosen["position"], chosen["layer"]
        m["chosen.bypass"], m["chosen.induce"], m["chosen.kl"] = \
            chosen["bypass_score"], chosen["induce_score"], chosen["kl_score"]
    for dataset, entry in report.refusal_and_safety.items():
        for intervention, s in entry.interventions.items():
            m[f"refusal.{dataset}.{_intervention(intervention)}"] = s.refusal_score
            if s.safety_score is not None:
                m[f"safety.{dataset}.{_intervention(intervention)}"] = s.safety_score
    for dataset, ce in report.ce_loss.items():
        for intervention, loss in ce.runs.items():
            m[f"ce.{dataset}.{_intervention(intervention)}"] = loss.loss
    for task, (ours, key) in COHERENCE_COUNTERPARTS.items():
        entry = report.coherence.get(ours)
        for intervention, result in (entry.runs if entry else {}).items():
            if key in result.metrics.get(ours, {}):
                m[f"coherence.{task}.{_intervention(intervention)}"] = result.metrics[ours][key]
    if report.magnitude is not None:
        m["magnitude.pooled_r"] = report.magnitude.pooled.pearson_r
    return m


def _intervention(name: str) -> str:
    return "actadd" if name.startswith("actadd") else name.replace(" ", "_")


def compare(a: RunSummary, b: RunSummary) -> list[ComparisonRow]:
    """Rows of (metric, a, b, b - a) over the metrics either side has, in a stable order."""
    rows = []
    for key in sorted(set(a.metrics) | set(b.metrics), key=_order):
        x, y = a.metrics.get(key), b.metrics.get(key)
        diff = y - x if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None
        rows.append(ComparisonRow(key, x, y, diff))
    return rows


def _order(key: str) -> tuple:
    groups = ("chosen", "refusal", "safety", "ce", "coherence", "magnitude")
    return (groups.index(key.split(".")[0]) if key.split(".")[0] in groups else len(groups), key)


def fmt(value: Metric) -> str:
    """A table cell: 4 significant digits for floats, blank for a metric one side lacks."""
    return "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def markdown_comparison(comparison: Comparison) -> str:
    a, b = comparison.a, comparison.b
    lines = ["# Comparison", "", f"- A: {a.kind}, `{a.folder}`", f"- B: {b.kind}, `{b.folder}`", "",
             "Refusal and safety scores are fractions (1 - the replication's success rates). The replication's "
             "actadd adds +r on every prompt set; ours subtracts r on harmful prompts unless evaluated with "
             "--actadd-plus.", "", "| metric | A | B | B - A |", "|---|---|---|---|"]
    lines += [f"| {r.metric} | {fmt(r.a)} | {fmt(r.b)} | {fmt(r.diff)} |" for r in comparison.rows]
    return "\n".join(lines) + "\n"
