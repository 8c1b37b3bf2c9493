"""Where one completion set lives: RUN/eval/completions/<set>.<intervention>.jsonl (the replies) and .json beside
it (the record of what made them). The one home of that naming: generation writes these files, the judge reads
them, `--judge-only` checks them."""
import json
from dataclasses import dataclass
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.data import read_text
from tlrefusal.evaluation.sets import EvalSet, slug
from tlrefusal.interventions import Intervention


@dataclass(frozen=True)
class CompletionFiles:
    jsonl: Path  # one {"prompt", "category", "completion"} a line
    record: Path  # `CompletionSetup.record` of the setup that made them

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in read_text(self.jsonl).splitlines()]


def completion_files(out_dir: Path, eval_set: EvalSet, intervention: Intervention) -> CompletionFiles:
    """The files of `eval_set`'s completions under `intervention` in `out_dir` (RUN/eval)."""
    stem = f"{eval_set.name}.{slug(intervention.name.replace('+', 'plus ').replace('-', 'minus '))}"
    folder = out_dir / artifacts.COMPLETIONS_DIR
    return CompletionFiles(folder / f"{stem}.jsonl", folder / f"{stem}.json")
