"""The selection journal (`tlrefusal.journal`): exact floats, torn lines, records of other runs, `--force`,
and real extracts killed with SIGKILL mid-selection that resume to a byte-identical selection.json."""
import json
import math

import pytest
import torch

from tests import extract_runs as runs
from tests.tiny import save_tiny_model
from tlrefusal import artifacts
from tlrefusal.journal import JournalWriter, journal_file, journal_key, read_journal
from tlrefusal.selection import CandidateScore, SelectionConfig, scored_keys

NAN = float("nan")
# Floats that a short decimal form would change: only repr's shortest round-trip form keeps them.
AWKWARD = [0.1 + 0.2, 1 / 3, -1e-300, 5e-324, 1.7976931348623157e308, -0.0, 2.0**-40 + 1.0]


def same(a: CandidateScore, b: CandidateScore) -> bool:
    """Equal bit for bit (NaN equals NaN, -0.0 differs from 0.0)."""
    pairs = zip((a.bypass_score, a.induce_score, a.kl_score), (b.bypass_score, b.induce_score, b.kl_score),
                strict=True)
    return (a.position, a.layer) == (b.position, b.layer) and all(
        (math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1, x) == math.copysign(1, y)) for x, y in pairs)


def test_records_read_back_bit_for_bit(tmp_path):
    folder = tmp_path / artifacts.SELECTION_JOURNAL
    scores = [CandidateScore(-1, layer, x, -x, abs(x)) for layer, x in enumerate(AWKWARD)]
    scores.append(CandidateScore(-2, 0, NAN, 1.0, NAN))
    with JournalWriter(journal_file(folder, 0), "key") as journal:
        for score in scores:
            journal.extend([score])
    back = read_journal(folder, "key")
    assert list(back) == [(s.position, s.layer) for s in scores]
    assert all(same(back[(s.position, s.layer)], s) for s in scores)
    assert all(line.endswith("}") for line in journal_file(folder, 0).read_text().split("\n")[:-1])


def test_a_torn_last_line_is_skipped_and_cut_before_the_next_record(tmp_path):
    folder = tmp_path / artifacts.SELECTION_JOURNAL
    path = journal_file(folder, 0)
    with JournalWriter(path, "key") as journal:
        journal.extend([CandidateScore(-1, 0, 1.5, 2.5, 0.5)])
        journal.extend([CandidateScore(-1, 1, 1.25, 2.25, 0.25)])
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    for cut in (1, len(last) // 2, len(last) - 1):  # a crash mid-write; len - 1: the object but no newline
        path.write_bytes(whole[:-cut])
        assert list(read_journal(folder, "key")) == [(-1, 0)]
        with JournalWriter(path, "key") as journal:  # a resumed run appends after the cut
            journal.extend([CandidateScore(-1, 2, 3.5, 4.5, 1.5)])
        assert list(read_journal(folder, "key")) == [(-1, 0), (-1, 2)]
        assert all(json.loads(line) for line in path.read_text().splitlines())


def test_only_records_of_this_run_and_whole_lines_count(tmp_path):
    folder = tmp_path / artifacts.SELECTION_JOURNAL
    with JournalWriter(journal_file(folder, 1), "other") as journal:
        journal.extend([CandidateScore(-1, 0, 9.0, 9.0, 9.0)])
    with JournalWriter(journal_file(folder, 1), "key") as journal:
        journal.extend([CandidateScore(-1, 1, 1.0, 1.0, 1.0)])
    with JournalWriter(journal_file(folder, 0), "key") as journal:
        journal.extend([CandidateScore(-1, 1, 2.0, 2.0, 2.0)])  # the same candidate in rank 0's file: it wins
    with journal_file(folder, 0).open("a") as f:
        f.write('{"run": "key", "position": -1, "layer": "2", "bypass_score": 1.0, "induce_score": 1.0, '
                '"kl_score": 1.0}\nnot json\n[1, 2]\n')
    (folder / "notes.jsonl").write_text(journal_file(folder, 0).read_text())  # not a rank's file
    back = read_journal(folder, "key")
    assert list(back) == [(-1, 1)] and back[(-1, 1)].bypass_score == 2.0
    assert read_journal(tmp_path / "none", "key") == {}


def test_a_rank_with_nothing_to_score_writes_no_file(tmp_path):
    with JournalWriter(journal_file(tmp_path / artifacts.SELECTION_JOURNAL, 2), "key"):
        pass
    assert not (tmp_path / artifacts.SELECTION_JOURNAL).exists()


def test_the_key_changes_with_what_the_scores_depend_on():
    directions = torch.zeros(2, 3, 4, dtype=torch.float64)
    val = {"harmful_val": ["a"], "harmless_val": ["b"]}
    key = journal_key({"config": {"seed": 1}}, directions, val, [5])
    assert key == journal_key({"config": {"seed": 1}}, directions.clone(), val, [5])
    moved = directions.clone()
    moved[1, 2, 3] = 1e-12
    assert len({key, journal_key({"config": {"seed": 2}}, directions, val, [5]),
                journal_key({"config": {"seed": 1}}, moved, val, [5]),
                journal_key({"config": {"seed": 1}}, directions, {**val, "harmless_val": ["c"]}, [5]),
                journal_key({"config": {"seed": 1}}, directions, val, [6])}) == 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("journal") / "llama")


def extract_args(model, run_dir, files):
    """Groups of 2 candidates (8 groups: 4 a rank under torchrun), so that a job killed after a few journal
    writes is mid-selection, with both ranks' journals started."""
    return runs.extract_args(model, run_dir, files, "--candidates-per-pass", "2")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """One process, never stopped: the selection.json every resumed run must reproduce byte for byte."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    files = runs.prompt_files(folder)
    done = runs.run(extract_args(tiny_model, folder / "run", files))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run", files


N_SCORED = len(scored_keys(list(range(-5, 0)), 4, SelectionConfig()))  # 15


def resume_and_compare(args, run_dir, reference, nproc):
    killed_at = len(runs.journal_lines(run_dir))
    assert not (run_dir / artifacts.SELECTION).exists()
    # A crash can tear the line being written: the resumed run must skip it.
    with (run_dir / artifacts.SELECTION_JOURNAL / "rank0.jsonl").open("a") as f:
        f.write('{"run": "0123", "position": -1, "layer": 0, "bypass_sc')
    resumed = runs.run(args, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{killed_at} of {N_SCORED} from the journal" in resumed.stderr
    for name in runs.COMPARED:
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
    # Every candidate was scored once: the resumed run scored only what the journal lacked.
    keys = [(r["position"], r["layer"]) for r in map(json.loads, runs.journal_lines(run_dir))]
    assert sorted(keys) == sorted(scored_keys(list(range(-5, 0)), 4, SelectionConfig()))


@pytest.mark.slow
def test_an_extract_killed_mid_selection_resumes_to_the_same_selection(uninterrupted, tiny_model, tmp_path):
    reference, files = uninterrupted
    run_dir = tmp_path / "run"
    args = extract_args(tiny_model, run_dir, files)
    runs.start_and_kill_mid_selection(args, run_dir, N_SCORED)
    resume_and_compare(args, run_dir, reference, nproc=1)


@pytest.mark.slow
def test_a_torchrun_job_killed_mid_selection_resumes_to_the_same_selection(uninterrupted, tiny_model, tmp_path):
    """Both ranks journal their own share; the job is killed, then resumed by the same torchrun command."""
    reference, files = uninterrupted
    run_dir = tmp_path / "run"
    args = extract_args(tiny_model, run_dir, files)
    runs.start_and_kill_mid_selection(args, run_dir, N_SCORED, nproc=2, at_least=4)
    assert {p.name for p in (run_dir / artifacts.SELECTION_JOURNAL).iterdir()} == {"rank0.jsonl", "rank1.jsonl"}
    resume_and_compare(args, run_dir, reference, nproc=2)


def test_force_clears_the_journal(tiny_model, tmp_path):
    from tlrefusal.pipeline import ExtractConfig, run_extract

    files = runs.prompt_files(tmp_path)
    config = ExtractConfig(model=str(tiny_model), harmful=str(files[0]), harmless=str(files[1]), n_train=4,
                           n_val=3, min_kept=1, filter=False, refusal_token_ids=(5, 7),
                           selection=SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9, prune_layer_fraction=0.5))
    run_dir = tmp_path / "run"
    run_extract(config, run_dir)
    journal = run_dir / artifacts.SELECTION_JOURNAL
    stale = journal / "rank7.jsonl"  # a rank of an earlier, larger job
    stale.write_text((journal / "rank0.jsonl").read_text())
    run_extract(config, run_dir, force=True)
    assert sorted(p.name for p in journal.iterdir()) == ["rank0.jsonl"]
    assert len((journal / "rank0.jsonl").read_text().splitlines()) == 10  # 5 positions x layers 0-1
