"""The eval report: every number with its sample size (RUN/eval/report.json) and the paper's tables (report.md)."""
from dataclasses import dataclass
from pathlib import Path

from tlrefusal.chat import format_template_kwargs
from tlrefusal.evaluation.ce import CeDataset
from tlrefusal.evaluation.coherence import LmEvalResult, TaskCoherence
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.loss import CeLoss
from tlrefusal.evaluation.magnitude import MagnitudeStudy
from tlrefusal.evaluation.scores import DatasetScores
from tlrefusal.model import ModelSource


@dataclass(frozen=True)
class DirectionSummary:
    """The direction evaluated: the run's chosen one or a candidate picked by layer and position."""

    layer: int
    position: int
    norm: float

    def to_json(self) -> dict:
        return {"layer": self.layer, "position": self.position, "norm": self.norm}


@dataclass(frozen=True)
class EvalReport:
    tool_version: str
    run: str
    config: EvalConfig
    model: ModelSource
    hooked: bool  # False: `config.model` evaluated as loaded, without hooks
    direction: DirectionSummary
    refusal_and_safety: dict[str, DatasetScores]  # by prompt set name
    ce_loss: dict[str, CeDataset]  # by CE dataset
    coherence: dict[str, TaskCoherence]  # by lm-eval task
    magnitude: MagnitudeStudy | None  # hooked runs only
    seconds: float
    # The system prompt and template variables the prompts were rendered with (`ChatOptions.to_json`: the run's,
    # or the evaluation's where it gave them); None in reports made before they were recorded.
    chat: dict | None = None

    def to_json(self) -> dict:
        data = {"tool_version": self.tool_version, "run": self.run, "config": self.config.to_json(),
                "paper": self.config.paper, "model": self.model.to_json(), "hooked": self.hooked, "direction": self.direction.to_json(),
                "refusal_and_safety": {k: v.to_json() for k, v in self.refusal_and_safety.items()},
                "ce_loss": {k: v.to_json() for k, v in self.ce_loss.items()},
                "coherence": {k: v.to_json() for k, v in self.coherence.items()},
                "magnitude": None if self.magnitude is None else self.magnitude.to_json(),
                "seconds": self.seconds}
        if self.chat is not None:
            data["chat"] = self.chat
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EvalReport":
        m = data["model"]
        return cls(tool_version=data["tool_version"], run=data["run"], config=EvalConfig.from_json(data["config"]),
                   model=ModelSource(m["spec"], m["kind"], Path(m["loaded_from"]), m.get("gguf_file")),
                   hooked=data["hooked"], direction=DirectionSummary(**data["direction"]),
                   refusal_and_safety={k: DatasetScores.from_json(v) for k, v in data["refusal_and_safety"].items()},
                   ce_loss={k: CeDataset.from_json(v, CeLoss.from_json) for k, v in data["ce_loss"].items()},
                   coherence={k: TaskCoherence.from_json(v, LmEvalResult.from_json) for k, v in data.get("coherence", {}).items()},
                   magnitude=MagnitudeStudy.from_json(data["magnitude"]) if data.get("magnitude") else None,
                   seconds=data["seconds"], chat=data.get("chat"))


def markdown_report(report: EvalReport) -> str:
    """The paper's layout: refusal and safety per dataset and intervention; CE loss; coherence; magnitude."""
    d = report.direction
    lines = [f"# tlrefusal eval: {report.run}", "",
             f"Model `{report.model.spec}`{' with hooks' if report.hooked else ' as loaded (no hooks)'}; "
             f"direction at layer {d.layer}, position {d.position}, norm {d.norm:.4g}; "
             f"greedy, {report.config.max_new_tokens} new tokens.", "", settings_line(report.config), ""]
    lines += _refusal_lines(report.refusal_and_safety) + _ce_lines(report.ce_loss)
    if report.coherence:
        lines += _coherence_lines(report.coherence)
    if report.magnitude is not None:
        lines += _magnitude_lines(report.magnitude, d.layer)
    lines += ["", f"Time: {report.seconds} s.", ""]
    return "\n".join(lines)


def settings_line(config: EvalConfig) -> str:
    """The settings that decide the numbers, and whether they are the paper's (`--paper`)."""
    return (f"Settings: {'the paper preset (--paper)' if config.paper else 'tlrefusal defaults'}; "
            f"evaluation sets {config.eval_sets}, stop at {config.stop}, actadd sign {config.actadd_sign}, "
            f"CE {config.ce_n} sequences per dataset, coherence "
            f"{', '.join(config.tasks) or 'none'} ({config.coherence_limit or 'all'} documents per task)"
            + _placement_note(config) + _chat_note(config) + ".")


def _chat_note(config: EvalConfig) -> str:
    """The prompts' system prompt and template variables where the evaluation replaced the run's."""
    notes = []
    if config.system_prompt is not None:
        notes.append(f"system prompt {config.system_prompt!r}")
    if config.chat_template_kwargs is not None:
        notes.append(f"template variables {format_template_kwargs(config.chat_template_kwargs) or 'none'}")
    return "; " + " and ".join(notes) + " instead of the run's" if notes else ""


def _placement_note(config: EvalConfig) -> str:
    """What ran where, when it is not one bridge-loaded model in full precision (it can change the numbers)."""
    notes = []
    if config.backend != "bridge":
        notes.append(f"completions and coherence on {config.backend} (tensor parallel {config.tensor_parallel}), "
                     "CE loss on the bridge")
    if config.quantize is not None:
        notes.append(f"quantized {config.quantize}")
    if config.device_map is not None:
        notes.append(f"device map {config.device_map}")
    if config.guard_model is not None and (config.guard_dtype or config.guard_device):
        notes.append(f"guard in {config.guard_dtype or 'the model dtype'} on {config.guard_device or 'its device'}")
    return "; " + "; ".join(notes) if notes else ""


def _refusal_lines(scores: dict[str, DatasetScores]) -> list[str]:
    lines = ["## Refusal score (substring) and safety score (Llama Guard 2)", "",
             "| dataset | intervention | n | refusal score | safety score |", "|---|---|---|---|---|"]
    for name, entry in scores.items():
        for iv, s in entry.interventions.items():
            safety = "n/a" if s.safety_score is None else f"{s.safety_score:.2f}"
            lines.append(f"| {name} ({entry.label}) | {iv} | {s.n} | {s.refusal_score:.2f} | {safety} |")
    reasoning = [(name, iv, s) for name, entry in scores.items() for iv, s in entry.interventions.items()
                 if s.n_reasoning]
    if reasoning:
        lines += ["", "Reasoning replies: the scores above judge the final answer; a reply whose reasoning never "
                      "closed within --max-new-tokens has none and is left out of them.", ""]
        lines += [f"- {name}, {iv}: reasoning in {s.n_reasoning} of {s.n} replies, refusal inside it "
                  f"{s.reasoning_refusal_score:.2f}; {s.n_unclosed} never closed" for name, iv, s in reasoning]
    return lines


def _ce_lines(ce: dict[str, CeDataset]) -> list[str]:
    lines = ["", "## CE loss (token-weighted)", ""]
    lines += [f"- {dataset}: unavailable ({entry.unavailable})" for dataset, entry in ce.items()
              if entry.unavailable is not None]
    available = {k: v.runs for k, v in ce.items() if v.unavailable is None}
    if available:
        ivs = list(next(iter(available.values())))
        lines += ["", "| dataset | " + " | ".join(ivs) + " | tokens |", "|---|" + "---|" * (len(ivs) + 1)]
        for dataset, runs in available.items():
            lines.append(f"| {dataset} | " + " | ".join(f"{runs[iv].loss:.3f}" for iv in ivs)
                         + f" | {runs[ivs[0]].tokens} |")
    return lines


def _coherence_lines(coherence: dict[str, TaskCoherence]) -> list[str]:
    lines = ["", "## Coherence (lm-eval, no chat template)", ""]
    for task, entry in coherence.items():
        if entry.unavailable is not None:
            lines.append(f"- {task}: unavailable ({entry.unavailable})")
            continue
        for name, result in entry.runs.items():
            lines.append(f"- {task}, {name} (n = {sum(v or 0 for v in result.n_samples.values())}): "
                         f"{result.summary()}")
    return lines


def _magnitude_lines(m: MagnitudeStudy, layer: int) -> list[str]:
    lines = ["", f"## Magnitude study (projection ratio at layer {layer}, position -1, vs refusal log-odds)",
             "", "| dataset | n | mean projection ratio | Pearson r |", "|---|---|---|---|"]
    for name, s in m.datasets.items():
        r = "n/a" if s.pearson_r is None else f"{s.pearson_r:.3f}"
        lines.append(f"| {name} | {s.n} | {s.mean_projection_ratio:.3f} | {r} |")
    pooled = "n/a" if m.pooled.pearson_r is None else f"{m.pooled.pearson_r:.3f}"
    lines.append(f"| pooled | {m.pooled.n} | | {pooled} |")
    return lines
