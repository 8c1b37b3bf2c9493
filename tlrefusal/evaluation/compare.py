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
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError

REPL_CE_NAMES = {"pile": "pile", "alpaca": "alpaca", "alpaca_custom_completions": "on-distribution"}


def load_summary(folder: Path) -> dict:
    """A flat {metric: value} summary of a tlrefusal run or an NNsight replication run folder."""
    if (folder / "direction_metadata.json").is_file():
        return {"kind": "nnsight replication", "folder": str(folder), "metrics": _repl_metrics(folder)}
    report_path = folder / "eval" / "report.json"
    if (folder / artifacts.SELECTION).is_file():
        if not report_path.is_file():
            raise TlrefusalError(f"{folder} has no eval report; run `tlrefusal eval {folder}` first")
        return {"kind": "tlrefusal", "folder": str(folder), "metrics": _our_metrics(folder, report_path)}
    raise TlrefusalError(f"{folder} is neither a tlrefusal run nor an NNsight replication run folder")


def _repl_metrics(folder: Path) -> dict:
    m: dict = {}
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
            m[f"ce.{REPL_CE_NAMES.get(name, name)}.{intervention}"] = values["ce_loss"]
    for path in sorted((folder / "coherence_evals").glob("*.json")):
        for task, acc in artifacts.read_json(path).items():
            m[f"coherence.{task}.{path.stem}"] = acc
    corr = folder / "magnitude_eval" / "magnitude_corr.json"
    if corr.is_file():
        m["magnitude.pooled_r"] = artifacts.read_json(corr)["corr"]
    return m


def _our_metrics(folder: Path, report_path: Path) -> dict:
    m: dict = {}
    report = artifacts.read_json(report_path)
    selection = artifacts.read_json(folder / artifacts.SELECTION)
    chosen = selection.get("chosen")
    if chosen:
        m["chosen.position"], m["chosen.layer"] = chosen["position"], chosen["layer"]
        m["chosen.bypass"], m["chosen.induce"], m["chosen.kl"] = \
            chosen["bypass_score"], chosen["induce_score"], chosen["kl_score"]
    for dataset, entry in report["refusal_and_safety"].items():
        for intervention, s in entry["interventions"].items():
            name = _intervention(intervention)
            m[f"refusal.{dataset}.{name}"] = s["refusal_score"]
            if s.get("safety_score") is not None:
                m[f"safety.{dataset}.{name}"] = s["safety_score"]
    for dataset, runs in report["ce_loss"].items():
        for intervention, values in runs.items():
            if isinstance(values, dict):
                m[f"ce.{dataset}.{_intervention(intervention)}"] = values["loss"]
    # lm-eval's tasks closest to the replication's own multiple-choice implementation (SPEC 1.11).
    for task, (ours, key) in {"arc": ("arc_challenge", "acc,none"), "mmlu": ("mmlu", "acc,none"),
                              "truthful_qa": ("truthfulqa_mc1", "acc,none")}.items():
        for intervention, result in report.get("coherence", {}).get(ours, {}).items():
            if isinstance(result, dict) and key in result.get("metrics", {}).get(ours, {}):
                m[f"coherence.{task}.{_intervention(intervention)}"] = result["metrics"][ours][key]
    if report.get("magnitude"):
        m["magnitude.pooled_r"] = report["magnitude"]["pooled"]["pearson_r"]
    return m


def _intervention(name: str) -> str:
    return "actadd" if name.startswith("actadd") else name.replace(" ", "_")


def compare(a: dict, b: dict) -> list[dict]:
    """Rows of (metric, a, b, b - a) over the metrics either side has, in a stable order."""
    keys = sorted(set(a["metrics"]) | set(b["metrics"]), key=_order)
    rows = []
    for key in keys:
        x, y = a["metrics"].get(key), b["metrics"].get(key)
        diff = y - x if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None
        rows.append({"metric": key, "a": x, "b": y, "diff": diff})
    return rows


def _order(key: str) -> tuple:
    groups = ("chosen", "refusal", "safety", "ce", "coherence", "magnitude")
    return (groups.index(key.split(".")[0]) if key.split(".")[0] in groups else len(groups), key)


def fmt(value) -> str:
    """A table cell: 4 significant digits for floats, blank for a metric one side lacks."""
    return "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def markdown_comparison(a: dict, b: dict, rows: list[dict]) -> str:
    lines = ["# Comparison", "", f"- A: {a['kind']}, `{a['folder']}`", f"- B: {b['kind']}, `{b['folder']}`", "",
             "Refusal and safety scores are fractions (1 - the replication's success rates). The replication's "
             "actadd adds +r on every prompt set; ours subtracts r on harmful prompts unless evaluated with "
             "--actadd-plus.", "", "| metric | A | B | B - A |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {fmt(r['a'])} | {fmt(r['b'])} | {fmt(r['diff'])} |" for r in rows]
    return "\n".join(lines) + "\n"
