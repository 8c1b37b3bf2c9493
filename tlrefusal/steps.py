"""The steps of a whole run (`tlrefusal run`), the artifacts each one writes, and what depends on what.

Every step resumes by its artifacts (written for the same settings, they are reused), so "redo from a step" is
"discard that step's artifacts and everything that depends on them, then run again" (`discard`): the artifacts
of the steps it does not reach stay as they are, byte for byte.

    filter -> candidates -> selection -> completions -> judge
                 |            |              `-> loss
                 `------------+-> loss, coherence, magnitude, orthogonalize

(the filter's kept validation prompts score the candidates; the loss on the model's own replies needs the
completions.) Each step belongs to a stage, the command that runs it: extract, eval or orthogonalize.
"""
import shutil
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError

STEPS = ("filter", "candidates", "selection", "completions", "judge", "loss", "coherence", "magnitude",
         "orthogonalize")
STAGE = {"filter": "extract", "candidates": "extract", "selection": "extract", "completions": "eval",
         "judge": "eval", "loss": "eval", "coherence": "eval", "magnitude": "eval", "orthogonalize": "orthogonalize"}
_NEEDED_BY = {"filter": ("candidates", "selection"), "candidates": ("selection",),
              "selection": ("completions", "loss", "coherence", "magnitude", "orthogonalize"),
              "completions": ("judge", "loss")}
_EVAL = Path(artifacts.EVAL_DIR)
ARTIFACTS: dict[str, tuple[Path, ...]] = {
    "filter": (Path(artifacts.PROMPTS),),
    "candidates": (Path(artifacts.MEANS), Path(artifacts.CANDIDATES)),
    "selection": (Path(artifacts.SELECTION), Path(artifacts.SELECTION_JOURNAL), Path(artifacts.DIRECTION),
                  Path(artifacts.PLOT).parent),
    "completions": (_EVAL / artifacts.COMPLETIONS_DIR,),
    "judge": (_EVAL / artifacts.EVAL_SCORES,),
    "loss": (_EVAL / artifacts.EVAL_LOSS,),
    "coherence": (_EVAL / artifacts.EVAL_COHERENCE,),
    "magnitude": (_EVAL / artifacts.EVAL_MAGNITUDE,),
    "orthogonalize": (Path(artifacts.ORTHOGONALIZED), Path(f"{artifacts.ORTHOGONALIZED}.gguf"),
                      Path(f"{artifacts.ORTHOGONALIZED}.orthogonalization.json")),
}
# What summarizes the evaluation steps: made again whenever one of them is.
_EVAL_SUMMARY = (_EVAL / artifacts.REPORT_JSON, _EVAL / artifacts.REPORT_MD, _EVAL / artifacts.EVAL_PLOTS_DIR)


def setting_step(name: str) -> str:
    """The first step a setting of the extract stage acts on (a name as the run-setup error gives it:
    "selection.kl_threshold", "n_train", "data_sha256.harmful"): the selection's own settings act from
    `selection` on, every other setting (model, data, sampling, filter, and the batch size, which the filter and
    the candidates run at too) from `filter`."""
    return "selection" if name.startswith("selection.") and name != "selection.batch_size" else "filter"


def check_step(step: str) -> str:
    if step not in STEPS:
        raise TlrefusalError(f"unknown step {step!r}; the steps are {', '.join(STEPS)}")
    return step


def check_extract_step(step: str) -> str:
    """A step `tlrefusal extract --from` can redo."""
    if STAGE[check_step(step)] != "extract":
        raise TlrefusalError(f"extract redoes filter, candidates or selection, not {step} (that is `tlrefusal "
                             "run --from`)")
    return step


def affected(step: str) -> list[str]:
    """`step` and every step that depends on it, in run order."""
    seen, todo = {check_step(step)}, [step]
    while todo:
        for later in _NEEDED_BY.get(todo.pop(), ()):
            if later not in seen:
                seen.add(later)
                todo.append(later)
    return [s for s in STEPS if s in seen]


def discard(run_dir: Path, step: str) -> list[Path]:
    """Remove the artifacts of `step` and of every step that depends on it (and the reports that sum them up);
    returns what was removed. Nothing else in the run folder is touched."""
    steps = affected(step)
    paths = [p for s in steps for p in ARTIFACTS[s]] + [Path(artifacts.RUN_REPORT)]
    if any(STAGE[s] == "eval" for s in steps):
        paths += _EVAL_SUMMARY
    removed = []
    for relative in paths:
        path = run_dir / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
