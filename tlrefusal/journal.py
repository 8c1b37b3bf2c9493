"""The selection journal: each candidate's scores, written as soon as it is scored, so that a selection that
crashes or is killed resumes with the candidates it had scored (`tlrefusal.pipeline`).

RUN/selection_journal/rank{N}.jsonl holds one JSON object a line, one line per candidate; the candidates
that share forward passes (`selection.candidate_groups`) are written with one `write` call and fsync'd
before the next group starts:

    {"run": "<key>", "position": -1, "layer": 3, "bypass_score": -4.2, "induce_score": 1.3, "kl_score": 0.05}

- Each process of a torchrun job writes only its own file (N = its rank), so no two processes ever write
  one file; a reader takes every file it finds, rank 0's first.
- Floats are written as Python's `repr` (what `json` does), which reads back as the same float, so a
  resumed run writes a selection.json byte-identical to a run that was never stopped. NaN is written null,
  as in selection.json.
- Only lines that end in a newline and parse are read: a line torn by a crash is skipped (that candidate's
  group is scored again), and a writer cuts a torn tail off its own file before it appends.
- `run` is a digest of everything the scores depend on (the run's identity, the candidate directions, the
  val prompts, the refusal tokens): a record of another setup, for example a node-local journal that
  `--force` on rank 0 could not clear, is never mixed in.
- The journal is kept once selection.json is written: the same scores, plus which rank scored each. A
  re-run with the same setup reads selection.json and never the journal; `--force` removes both.
"""
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from tlrefusal.selection import CandidateScore, Key

_FILE = re.compile(r"^rank(\d+)\.jsonl$")
_SCORES = ("bypass_score", "induce_score", "kl_score")


def journal_key(identity: dict, directions: torch.Tensor, val: dict[str, list[str]], refusal_ids: list[int]) -> str:
    """A digest of what a candidate's scores depend on; records carry it, and only matching ones are read."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"identity": identity, "val": val, "refusal_ids": list(refusal_ids)},
                             sort_keys=True, ensure_ascii=False).encode())
    digest.update(repr((str(directions.dtype), tuple(directions.shape))).encode())
    digest.update(directions.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def journal_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.jsonl"


def read_journal(folder: Path, key: str) -> dict[Key, CandidateScore]:
    """Every candidate recorded under `key` in the journal files of `folder` (none if it does not exist).

    Files are read in rank order and the first record of a candidate wins, so every reader of the same
    files gets the same scores.
    """
    if not folder.is_dir():
        return {}
    files = sorted((int(m.group(1)), path) for path in folder.iterdir() if (m := _FILE.match(path.name)))
    scores: dict[Key, CandidateScore] = {}
    for _, path in files:
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue  # unreadable: its candidates are scored again
        for line in text.split("\n")[:-1]:  # the last piece ends in no newline: empty, or a torn line
            score = _parse(line, key)
            if score is not None:
                scores.setdefault((score.position, score.layer), score)
    return scores


def _parse(line: str, key: str) -> CandidateScore | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("run") != key:
        return None
    if not all(type(data.get(name)) is int for name in ("position", "layer")):
        return None
    if not all(data.get(name) is None or type(data.get(name)) is float for name in _SCORES):
        return None
    return CandidateScore.from_json({**data, "filtered": None})


class JournalWriter:
    """Appends one record per candidate to one rank's journal file; the file is made at the first record,
    so a rank with nothing to score leaves nothing behind."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key, self._fd = path, key, None

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extend(self, scores: Sequence[CandidateScore]) -> None:
        """One line per candidate, all in one write: a group of candidates scored together is journaled whole
        or (killed mid-write) with a torn tail that readers skip and the next writer cuts."""
        lines = []
        for score in scores:
            data = score.to_json()
            record = {"run": self.key, "position": data["position"], "layer": data["layer"],
                      **{name: data[name] for name in _SCORES}}
            lines.append(json.dumps(record) + "\n")
        block = "".join(lines).encode()
        if self._fd is None:
            self._fd = self._open()
        written = os.write(self._fd, block)  # O_APPEND: one write puts the whole block at the end
        if written != len(block):  # a full disk: the torn tail is cut before the next append
            raise OSError(f"wrote {written} of {len(block)} bytes to {self.path}")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        folder = self.path.parent
        made = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)  # the umask applies, as to artifacts
        try:
            _cut_torn_tail(fd)
            if made:  # the new folder's entry survives a power cut too
                _fsync_folder(folder.parent)
            _fsync_folder(folder)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _cut_torn_tail(fd: int) -> None:
    """Truncate the file after its last newline (a crash mid-write left a partial line)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    keep, offset, block = 0, size, 1 << 16
    while offset > 0:
        start = max(0, offset - block)
        chunk = os.pread(fd, offset - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        offset = start
    if keep != size:
        os.ftruncate(fd, keep)
        os.fsync(fd)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
