"""`tlrefusal eval RUN`: the paper's evaluations of a run's model and direction (SPEC 1.8-1.12).

RUN/eval/
  completions/<dataset>.<intervention>.jsonl  one {"prompt", "category", "completion"} per line
  completions/<dataset>.<intervention>.json   what produced them (model, direction, prompts, settings);
                                               a re-run with the same setup reuses the completions
  report.json                                  every number with its sample size
  report.md                                    the tables in the paper's layout
  plots/refusal.png                            refusal score per dataset and intervention
  plots/projection_vs_refusal.png              the magnitude study's scatter (hooked runs only)

Interventions: the run's model at baseline, under directional ablation (every layer and position), and
under activation addition at the chosen layer, -r on harmful prompts and +r on harmless ones (the
paper's convention; `actadd_sign="plus"` adds +r everywhere, like the NNsight replication). With
`model` set (for example a checkpoint from `tlrefusal orthogonalize`) that model is evaluated as it is,
with no hooks, and its numbers sit where ablation's would.
"""
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hooks import ablation_hooks, addition_hooks
from tlrefusal import __version__, artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.data import Prompt, load_prompts, prompts_hash
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.evaluation.coherence import DEFAULT_TASKS, lm_eval_model, resolve_tasks, run_lm_eval
from tlrefusal.evaluation.guard import LlamaGuard
from tlrefusal.evaluation.loss import ce_loss, reply_sequence, text_sequence
from tlrefusal.evaluation.magnitude import magnitude_study
from tlrefusal.generation import greedy_completions
from tlrefusal.model import load_model, resolve_source
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.scoring import is_refusal

EVAL_DIR = "eval"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CE_DATASETS = ("pile", "alpaca", "on-distribution")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    # Empty: the run's own harmful / harmless pools, minus every prompt the run sampled (held out).
    harmful: tuple[str, ...] = ()
    harmless: tuple[str, ...] = ()
    n: int = 100  # prompts per dataset (the paper: JailbreakBench's 100 and 100 Alpaca test prompts)
    max_new_tokens: int = 512  # the paper's, after HarmBench (SPEC 1.8)
    batch_size: int = 16
    actadd_sign: str = "paper"  # "paper": -r on harmful, +r on harmless; "plus": +r on both (REPL)
    model: str | None = None  # evaluate this model without hooks instead of the run's model with hooks
    guard_model: Path | None = None  # a local Llama Guard 2 folder; None: safety score unavailable
    ce: tuple[str, ...] = CE_DATASETS
    ce_n: int = 64  # sequences per CE dataset (the paper: 4,096; see the README for the cost here)
    pile: str = "pile"  # a text file / .jsonl with a "text" field, or "pile" (monology/pile-uncopyrighted)
    alpaca: str = "alpaca"  # a .json/.jsonl with instruction + output, or "alpaca" (tatsu-lab/alpaca)
    magnitude: tuple[str, ...] = ()  # extra prompt sets for the magnitude study (e.g. xstest)
    tasks: tuple[str, ...] = DEFAULT_TASKS  # lm-eval task names or local task YAML files; () for none
    coherence_limit: int | None = 100  # documents per lm-eval (sub)task; None: all (the paper)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.coherence_limit is not None and self.coherence_limit < 1:
            raise TlrefusalError(f"coherence_limit must be at least 1 (or None for all), got {self.coherence_limit}")
        for name in ("n", "max_new_tokens", "batch_size", "ce_n"):
            if getattr(self, name) < 1:
                raise TlrefusalError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.actadd_sign not in ("paper", "plus"):
            raise TlrefusalError(f"actadd_sign must be 'paper' or 'plus', got {self.actadd_sign!r}")
        unknown = set(self.ce) - set(CE_DATASETS)
        if unknown:
            raise TlrefusalError(f"unknown CE dataset {sorted(unknown)[0]!r} (choose from {', '.join(CE_DATASETS)})")

    def to_json(self) -> dict:
        data = asdict(self)
        data["guard_model"] = str(self.guard_model) if self.guard_model else None
        return data


def run_eval(run_dir: Path, config: EvalConfig, cache_dir: Path | None = None,
             progress: Progress = NO_PROGRESS) -> dict:
    """Evaluate the run; writes RUN/eval/ and returns the report."""
    started = time.perf_counter()
    if not (run_dir / artifacts.CONFIG).is_file():
        raise TlrefusalError(f"{run_dir} is not a tlrefusal run folder (no {artifacts.CONFIG})")
    if not (run_dir / artifacts.DIRECTION).is_file():
        raise TlrefusalError(f"{run_dir} has no direction ({artifacts.DIRECTION}); `tlrefusal extract` chose none")
    if config.guard_model is not None and not (config.guard_model / "config.json").is_file():
        raise TlrefusalError(f"no guard model at {config.guard_model} (expected a Hugging Face folder)")
    run_config = artifacts.read_json(run_dir / artifacts.CONFIG)["config"]
    manifest = artifacts.read_json(run_dir / artifacts.MANIFEST)
    direction = artifacts.RefusalDirection.load(run_dir)
    sets = _eval_sets(run_dir, run_config, config, cache_dir)
    if config.tasks:
        resolve_tasks(config.tasks)  # an unknown task fails now, not after an hour of generation

    hooked = config.model is None
    source = resolve_source(config.model or run_config["model"], cache_dir, progress)
    model = load_model(source, run_config["dtype"], run_config["device"], run_config["trust_remote_code"], progress)
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    if direction.vector.shape[0] != model.d_model:
        raise TlrefusalError(f"the run's direction has width {direction.vector.shape[0]}, the model {model.d_model}")
    r, layer = direction.vector, direction.layer
    harmful_sign = -1.0 if config.actadd_sign == "paper" else 1.0
    interventions = {
        "harmful": {"baseline": [], "ablation": ablation_hooks(r, model.n_layers),
                    f"actadd ({'-' if harmful_sign < 0 else '+'}r)": addition_hooks(r, layer, harmful_sign)},
        "harmless": {"baseline": [], "ablation": ablation_hooks(r, model.n_layers),
                     "actadd (+r)": addition_hooks(r, layer, 1.0)},
    } if hooked else {"harmful": {"as loaded": []}, "harmless": {"as loaded": []}}

    out_dir = run_dir / EVAL_DIR
    identity = {"model": source.to_json()["loaded_from"], "hooked": hooked,
                "direction_sha256": artifacts.file_sha256(run_dir / artifacts.DIRECTION), "max_new_tokens": config.max_new_tokens}
    guard = LlamaGuard(config.guard_model) if config.guard_model else None
    completions: dict = {}
    scores: dict = {}
    for (label, name), prompts in sets.items():
        for iv, hooks in interventions[label].items():
            rows = _completions(out_dir, name, iv, prompts, identity, model, chat, hooks, config, progress)
            completions[(name, iv)] = rows
            scores.setdefault(name, {"label": label, "interventions": {}})["interventions"][iv] = \
                _score(rows, guard, progress, f"Llama Guard: {name}, {iv}")

    ce = _ce_losses(model, chat, sets, completions, interventions["harmless"], r, layer, config, cache_dir, progress)
    magnitude = None
    if hooked:
        extra = {src: [p.instruction for p in _sample(load_prompts(src, cache_dir), config.n, config.seed)]
                 for src in config.magnitude}
        study_sets = {name: [p.instruction for p in prompts] for (_, name), prompts in sets.items()} | extra
        with progress.task("Magnitude study", total=None):
            magnitude = magnitude_study(model, chat, study_sets, r, layer, manifest["refusal"]["token_ids"])

    coherence = _coherence(model, interventions["harmless"], config, progress)

    report = {"tool_version": __version__, "run": str(run_dir), "config": config.to_json(),
              "model": source.to_json(), "hooked": hooked,
              "direction": {"layer": layer, "position": direction.position, "norm": r.norm().item()},
              "refusal_and_safety": scores, "ce_loss": ce, "coherence": coherence, "magnitude": magnitude,
              "seconds": round(time.perf_counter() - started, 1)}
    artifacts.write_json(out_dir / REPORT_JSON, report)
    artifacts.write_text(out_dir / REPORT_MD, markdown_report(report))
    _plots(out_dir, report)
    return report


def _plots(out_dir: Path, report: dict) -> None:
    import matplotlib.pyplot as plt

    from tlrefusal.plots import projection_scatter, refusal_bars

    figures = {"refusal.png": refusal_bars(report)}
    if report["magnitude"] is not None:
        figures["projection_vs_refusal.png"] = projection_scatter(report["magnitude"], report["direction"]["layer"])
    for name, figure in figures.items():
        artifacts.write_plot(out_dir / "plots" / name, figure)
        plt.close(figure)


def _eval_sets(run_dir: Path, run_config: dict, config: EvalConfig, cache_dir: Path | None
               ) -> dict[tuple[str, str], list[Prompt]]:
    """(label, dataset name) -> the sampled prompts; the run's pools exclude every prompt it sampled."""
    used = artifacts.sampled_instructions(run_dir)
    sets: dict[tuple[str, str], list[Prompt]] = {}
    for label in ("harmful", "harmless"):
        sources = getattr(config, label) or (run_config[label],)
        for src in sources:
            pool = [p for p in load_prompts(src, cache_dir) if p.instruction not in used]
            if not pool:
                raise TlrefusalError(f"{src} has no prompt the run did not already use")
            sets[(label, _slug(src))] = _sample(pool, config.n, config.seed)
    return sets


def _sample(pool: list[Prompt], n: int, seed: int) -> list[Prompt]:
    return random.Random(seed).sample(pool, min(n, len(pool)))


def _completions(out_dir: Path, name: str, intervention: str, prompts: list[Prompt], identity: dict, model, chat,
                 hooks, config: EvalConfig, progress: Progress) -> list[dict]:
    """Greedy completions, reused from RUN/eval/completions when the same setup wrote them."""
    stem = f"{name}.{_slug(intervention.replace('+', 'plus ').replace('-', 'minus '))}"
    meta = {**identity, "intervention": intervention, "prompts_sha256": prompts_hash(prompts)}
    jsonl, meta_path = out_dir / "completions" / f"{stem}.jsonl", out_dir / "completions" / f"{stem}.json"
    if jsonl.is_file() and meta_path.is_file() and artifacts.read_json(meta_path) == meta:
        return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    with progress.task(f"Completions: {name}, {intervention}", total=len(prompts)) as advance:
        replies = greedy_completions(model, chat, [p.instruction for p in prompts], config.max_new_tokens, hooks,
                                     batch_size=config.batch_size, advance=advance)
    rows = [{"prompt": p.instruction, "category": p.category, "completion": c}
            for p, c in zip(prompts, replies, strict=True)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    artifacts.write_text(jsonl, text)
    artifacts.write_json(meta_path, meta)
    return rows


def _score(rows: list[dict], guard: LlamaGuard | None, progress: Progress, description: str) -> dict:
    """Refusal score (substring, overall and per category) and safety score (Llama Guard 2 or unavailable)."""
    refused = [is_refusal(r["completion"]) for r in rows]
    categories: dict[str, list[bool]] = {}
    for row, flag in zip(rows, refused, strict=True):
        categories.setdefault(row["category"] or "(none)", []).append(flag)
    result = {"n": len(rows), "refusal_score": sum(refused) / len(rows),
              "refusal_by_category": {k: {"n": len(v), "refusal_score": sum(v) / len(v)}
                                      for k, v in sorted(categories.items())}}
    if guard is None:
        result["safety_score"] = None
        result["safety_note"] = "unavailable: no --guard-model given"
    else:
        safe = guard.judge([r["prompt"] for r in rows], [r["completion"] for r in rows], progress=progress,
                           description=description)
        result["safety_score"] = sum(safe) / len(safe)
    return result


def _ce_losses(model, chat, sets, completions, harmless_interventions, r, layer, config: EvalConfig,
               cache_dir: Path | None, progress: Progress) -> dict:
    """CE loss per dataset under baseline, ablation and activation addition of -r (the paper's Table 9)."""
    if "baseline" in harmless_interventions:
        runs = {"baseline": [], "ablation": harmless_interventions["ablation"],
                "actadd (-r)": addition_hooks(r, layer, -1.0)}
    else:
        runs = dict(harmless_interventions)
    out: dict = {}
    for dataset in config.ce:
        try:
            sequences = _ce_sequences(dataset, model, chat, sets, completions, config, cache_dir)
        except TlrefusalError as exc:
            if {"pile": config.pile, "alpaca": config.alpaca}.get(dataset) not in (None, "pile", "alpaca"):
                raise  # a local file the user named: a real error; the hub being out of reach is not
            out[dataset] = {"unavailable": str(exc)}
            continue
        out[dataset] = {}
        for name, hooks in runs.items():
            with progress.task(f"CE loss: {dataset}, {name}", total=len(sequences)) as advance:
                out[dataset][name] = ce_loss(model, sequences, hooks, advance=advance)
    return out


def _coherence(model, harmless_interventions, config: EvalConfig, progress: Progress) -> dict:
    """lm-eval scores at baseline and under ablation (the paper's orthogonalized model), or as loaded.

    Hub tasks whose data cannot be fetched are reported unavailable; a local task file that fails is an error.
    """
    runs = {k: v for k, v in harmless_interventions.items() if k in ("baseline", "ablation", "as loaded")}
    lm = lm_eval_model(model, config.batch_size) if config.tasks else None
    out: dict = {}
    for task in config.tasks:
        out[task] = {}
        for name, hooks in runs.items():
            try:
                with progress.task(f"lm-eval: {task}, {name}", total=None):
                    out[task][name] = run_lm_eval(lm, [task], model.bridge.hooks(fwd_hooks=list(hooks)),
                                                  limit=config.coherence_limit)
            except Exception as exc:  # lm-eval and datasets raise many types when the hub is out of reach
                if Path(task).suffix in (".yaml", ".yml"):
                    raise
                first = first_line(exc)
                out[task] = {"unavailable": f"could not run {task}: {first}"}
                break
    return out


def _ce_sequences(dataset: str, model, chat, sets, completions, config: EvalConfig, cache_dir: Path | None):
    if dataset == "on-distribution":  # the baseline's own replies to the harmless prompts (ORIG's choice)
        harmless = [name for (label, name) in sets if label == "harmless"][0]
        baseline = next(iv for (name, iv) in completions if name == harmless)
        rows = completions[(harmless, baseline)]
        sequences = [reply_sequence(chat, row["prompt"], row["completion"]) for row in rows]
    elif dataset == "alpaca":
        pairs = _alpaca_pairs(config.alpaca, config.ce_n, config.seed)
        sequences = [reply_sequence(chat, instruction, output) for instruction, output in pairs]
    else:
        sequences = [text_sequence(model.tokenizer, text) for text in _pile_texts(config.pile, config.ce_n)]
    return [s for s in sequences if s is not None]


def _alpaca_pairs(source: str, n: int, seed: int) -> list[tuple[str, str]]:
    """(instruction, reference output) pairs with an empty input: Alpaca shuffled with seed 42 (SPEC 1.10)."""
    if source == "alpaca":
        rows = _hub_rows("tatsu-lab/alpaca", "train", shuffle_seed=seed)
    else:
        rows = _file_rows(Path(source))
    pairs = [(row["instruction"], row["output"]) for row in rows
             if not row.get("input") and row.get("instruction") and row.get("output")]
    if not pairs:
        raise TlrefusalError(f"{source} has no rows with an instruction, an output and no input")
    return pairs[:n]


def _pile_texts(source: str, n: int) -> list[str]:
    """The first n documents of the Pile (streamed, in order), or of a local text / .jsonl file."""
    if source == "pile":
        rows = _hub_rows("monology/pile-uncopyrighted", "train", streaming_n=n)
        texts = [row["text"] for row in rows]
    else:
        path = Path(source)
        texts = [row["text"] for row in _file_rows(path)] if path.suffix in (".jsonl", ".json") else \
            [t for t in _read(path).split("\n\n") if t.strip()]
    if not texts:
        raise TlrefusalError(f"{source} has no text")
    return texts[:n]


def _hub_rows(repo: str, split: str, shuffle_seed: int | None = None, streaming_n: int | None = None) -> list[dict]:
    try:
        from datasets import load_dataset

        if streaming_n is not None:
            stream = load_dataset(repo, split=split, streaming=True)
            return [row for _, row in zip(range(streaming_n), stream, strict=False)]
        data = load_dataset(repo, split=split)
        return list(data.shuffle(seed=shuffle_seed) if shuffle_seed is not None else data)
    except Exception as exc:  # offline, gated or missing: the datasets library raises many types
        first = first_line(exc)
        raise TlrefusalError(f"could not load {repo} from the Hugging Face hub ({first})") from exc


def _file_rows(path: Path) -> list[dict]:
    text = _read(path)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TlrefusalError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise TlrefusalError(f"{path} must hold a list of objects")
    return data


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TlrefusalError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _slug(text: str) -> str:
    """A file-name-safe name: a file source's stem, or the text itself."""
    name = Path(text).stem if Path(text).suffix else text
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def markdown_report(report: dict) -> str:
    """The paper's layout: refusal and safety per dataset and intervention; CE loss; magnitude."""
    d = report["direction"]
    lines = [f"# tlrefusal eval: {report['run']}", "",
             f"Model `{report['model']['spec']}`{' with hooks' if report['hooked'] else ' as loaded (no hooks)'}; "
             f"direction at layer {d['layer']}, position {d['position']}, norm {d['norm']:.4g}; "
             f"greedy, {report['config']['max_new_tokens']} new tokens.", "",
             "## Refusal score (substring) and safety score (Llama Guard 2)", "",
             "| dataset | intervention | n | refusal score | safety score |", "|---|---|---|---|---|"]
    for name, entry in report["refusal_and_safety"].items():
        for iv, s in entry["interventions"].items():
            safety = "n/a" if s["safety_score"] is None else f"{s['safety_score']:.2f}"
            lines.append(f"| {name} ({entry['label']}) | {iv} | {s['n']} | {s['refusal_score']:.2f} | {safety} |")
    lines += ["", "## CE loss (token-weighted)", ""]
    for dataset, runs in report["ce_loss"].items():
        if "unavailable" in runs:
            lines.append(f"- {dataset}: unavailable ({runs['unavailable']})")
    available = {k: v for k, v in report["ce_loss"].items() if "unavailable" not in v}
    if available:
        ivs = list(next(iter(available.values())))
        lines += ["", "| dataset | " + " | ".join(ivs) + " | tokens |", "|---|" + "---|" * (len(ivs) + 1)]
        for dataset, runs in available.items():
            lines.append(f"| {dataset} | " + " | ".join(f"{runs[iv]['loss']:.3f}" for iv in ivs)
                         + f" | {runs[ivs[0]]['tokens']} |")
    if report["coherence"]:
        lines += ["", "## Coherence (lm-eval, no chat template)", ""]
        for task, runs in report["coherence"].items():
            if "unavailable" in runs:
                lines.append(f"- {task}: unavailable ({runs['unavailable']})")
                continue
            for name, result in runs.items():
                values = ", ".join(f"{k}: {v:.4g}" for task_metrics in result["metrics"].values()
                                   for k, v in task_metrics.items() if "stderr" not in k)
                lines.append(f"- {task}, {name} (n = {sum(v or 0 for v in result['n_samples'].values())}): {values}")
    if report["magnitude"] is not None:
        m = report["magnitude"]
        lines += ["", f"## Magnitude study (projection ratio at layer {d['layer']}, position -1, vs refusal log-odds)",
                  "", "| dataset | n | mean projection ratio | Pearson r |", "|---|---|---|---|"]
        for name, s in m["datasets"].items():
            r = "n/a" if s["pearson_r"] is None else f"{s['pearson_r']:.3f}"
            lines.append(f"| {name} | {s['n']} | {s['mean_projection_ratio']:.3f} | {r} |")
        pooled = "n/a" if m["pooled"]["pearson_r"] is None else f"{m['pooled']['pearson_r']:.3f}"
        lines.append(f"| pooled | {m['pooled']['n']} | | {pooled} |")
    lines += ["", f"Time: {report['seconds']} s.", ""]
    return "\n".join(lines)
