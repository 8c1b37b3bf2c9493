"""Candidate scoring spread over processes (`tlrefusal.distributed`): the deal, the process facts, errors that
reach every rank, and torchrun jobs of 2 and 3 processes whose artifacts equal one process's byte for byte."""
import json
import subprocess
import sys
import textwrap

import pytest

from tests import extract_runs as runs
from tests.tiny import save_tiny_model
from tlrefusal import distributed
from tlrefusal.distributed import World
from tlrefusal.errors import TlrefusalError
from tlrefusal.selection import SelectionConfig, candidate_groups, scored_keys


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 15])
def test_share_deals_every_candidate_to_exactly_one_rank_in_a_fixed_order(size, n):
    keys = scored_keys(list(range(-5, 0)), 4, SelectionConfig())[:n]  # layer-major, layers 0..2
    parts = [distributed.share(keys, World(rank=rank, local_rank=rank, size=size)) for rank in range(size)]
    dealt = [key for part in parts for key in part]
    assert sorted(dealt) == sorted(keys) and len(dealt) == len(keys)  # each exactly once
    for part in parts:  # each rank keeps the fixed order, and the deal is the same every time
        assert part == sorted(part, key=keys.index)
    assert parts == [distributed.share(keys, World(rank=rank, local_rank=rank, size=size)) for rank in range(size)]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # even shares
    if n < size:
        assert all(len(part) == 0 for part in parts[n:])  # ranks past the end get none


def test_scored_keys_are_layer_major_and_stop_at_the_layer_filter():
    assert scored_keys([-2, -1], 10, SelectionConfig()) == [(p, layer) for layer in range(8) for p in (-2, -1)]
    assert scored_keys([-1], 4, SelectionConfig(prune_layer_fraction=0.5)) == [(-1, 0), (-1, 1)]


def test_world_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == World(rank=0, local_rank=0, size=1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.world() == World(rank=3, local_rank=1, size=4)
    assert not distributed.world().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(TlrefusalError, match="RANK=4 does not fit WORLD_SIZE=4"):
        distributed.world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(TlrefusalError, match="RANK='x'"):
        distributed.world()


def test_one_process_uses_no_process_group():
    import torch.distributed as dist

    one = World()
    with distributed.process_group(one):
        assert not dist.is_initialized()
        assert distributed.on_main(one, lambda: 7) == 7
        assert distributed.everywhere(one, lambda: 8) == 8
        assert distributed.all_gather(one, 9) == [9]


COLLECTIVES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tlrefusal import distributed
    from tlrefusal.errors import TlrefusalError

    world = distributed.world()

    def outcome(step):
        try:
            return ["ok", step()]
        except distributed.Reported as exc:
            return ["reported", str(exc)]
        except Exception as exc:
            return [type(exc).__name__, str(exc)]

    def fail_on(rank, value):
        def step():
            if world.rank == rank:
                raise TlrefusalError(f"broken on rank {rank}")
            return value
        return step

    def unexpected():
        raise ZeroDivisionError("division by zero")

    with distributed.process_group(world):
        result = {
            "share": distributed.all_gather(world, distributed.share(list(range(5)), world)),
            "on_main": outcome(lambda: distributed.on_main(world, lambda: {"from": world.rank})),
            "main_fails": outcome(lambda: distributed.on_main(world, fail_on(0, 1))),
            "rank1_fails": outcome(lambda: distributed.everywhere(world, fail_on(1, world.rank))),
            "rank0_fails": outcome(lambda: distributed.everywhere(world, fail_on(0, world.rank))),
            "unexpected": outcome(lambda: distributed.on_main(world, unexpected)),
            "after": distributed.all_gather(world, "still in step"),
        }
    # One file per rank: lines that three processes print to one pipe can interleave.
    (Path(sys.argv[1]) / f"rank{world.rank}.json").write_text(json.dumps(result))
""")


@pytest.mark.slow
def test_a_failure_on_any_rank_stops_every_rank_and_is_printed_once(tmp_path):
    """Three gloo processes: rank 0's result reaches every rank; an error on rank 0 or rank 1 reaches every
    rank (rank 0 raises it, the others raise the quiet `Reported`), and no rank waits for one that failed."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(script), str(tmp_path)], cwd=runs.REPO, env=runs.environment(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    by_rank = {int(path.stem.removeprefix("rank")): json.loads(path.read_text()) for path in tmp_path.glob("rank*.json")}
    assert sorted(by_rank) == [0, 1, 2]
    for rank, result in by_rank.items():
        assert result["share"] == [[0, 3], [1, 4], [2]]
        assert result["on_main"] == ["ok", {"from": 0}]
        assert result["after"] == ["still in step"] * 3
        if rank == 0:
            assert result["main_fails"] == ["TlrefusalError", "broken on rank 0"]
            assert result["rank1_fails"] == ["PeerFailed", "rank 1 of 3 failed: broken on rank 1"]
            assert result["rank0_fails"] == ["TlrefusalError", "broken on rank 0"]
            assert result["unexpected"] == ["ZeroDivisionError", "division by zero"]
        else:
            assert result["main_fails"] == ["reported", "broken on rank 0"]
            assert result["rank1_fails"] == ["reported", "broken on rank 1"]
            assert result["rank0_fails"] == ["reported", "broken on rank 0"]
            assert result["unexpected"] == ["reported", "unexpected ZeroDivisionError: division by zero"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("dist") / "llama")


def assert_same_run(one, many, log, nproc):
    """The byte-compared artifacts are equal; the job holds what one process writes plus the journals of the
    other ranks that scored candidates. "Only rank 0 wrote": every other rank created, wrote, renamed or
    removed nothing in the run folder but its own journal file (and the journal folder, if it came first);
    returns the files the job holds beyond one process's."""
    for name in runs.COMPARED:
        assert (one / name).read_bytes() == (many / name).read_bytes(), name
    assert runs.files_of(one) <= runs.files_of(many)
    for rank in range(1, nproc):
        assert runs.writes(log, rank, many) <= {"selection_journal", f"selection_journal/rank{rank}.jsonl"}, rank
    assert {"config.json", "selection.json", "direction.safetensors"} <= {
        path for path in runs.writes(log, 0, many) if "/" not in path}  # the log sees rank 0's writes
    return runs.files_of(many) - runs.files_of(one)


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tiny_model, tmp_path):
    files = runs.prompt_files(tmp_path)
    one = runs.run(runs.extract_args(tiny_model, tmp_path / "one", files))
    assert one.returncode == 0, one.stderr[-3000:]
    two = runs.run(runs.extract_args(tiny_model, tmp_path / "two", files), nproc=2, log_writes=tmp_path / "writes")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("chosen:") == 1 and two.stdout.count("tlrefusal extract:") == 1  # rank 0 alone prints
    extra = assert_same_run(tmp_path / "one", tmp_path / "two", tmp_path / "writes", 2)
    assert extra == {"selection_journal/rank1.jsonl"}
    keys = scored_keys(list(range(-5, 0)), 4, SelectionConfig())  # 5 positions x layers 0-2 = 15
    # Whole groups of 6 dealt out in turn: rank 0 scores candidates 0-5 and 12-14, rank 1 candidates 6-11.
    assert candidate_groups(keys, SelectionConfig().candidates_per_pass) == [tuple(keys[:6]), tuple(keys[6:12]),
                                                                            tuple(keys[12:])]
    assert runs.records(tmp_path / "two", 0) == keys[:6] + keys[12:] and runs.records(tmp_path / "two", 1) == keys[6:12]
    assert runs.records(tmp_path / "one", 0) == keys
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert (manifest["processes"], manifest["threads"]) == (2, 1)


@pytest.mark.slow
def test_three_processes_with_fewer_candidates_than_processes(tiny_model, tmp_path):
    # A template with one post-instruction token and half the layers pruned, one candidate per pass: two
    # groups of candidates for three ranks.
    template = tmp_path / "short.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    files = runs.prompt_files(tmp_path)
    extra = ["--chat-template", str(template), "--prune-layers", "0.5", "--candidates-per-pass", "1"]
    one = runs.run(runs.extract_args(tiny_model, tmp_path / "one", files, *extra))
    assert one.returncode == 0, one.stderr[-3000:]
    three = runs.run(runs.extract_args(tiny_model, tmp_path / "three", files, *extra), nproc=3,
                     log_writes=tmp_path / "writes")
    assert three.returncode == 0, three.stderr[-3000:]
    assert three.stdout.count("chosen:") == 1
    selection = json.loads((tmp_path / "three" / "selection.json").read_text())
    assert selection["filter_counts"] == {"kept": 2, "layer >= 2": 2}
    log = tmp_path / "writes"
    assert assert_same_run(tmp_path / "one", tmp_path / "three", log, 3) == {"selection_journal/rank1.jsonl"}
    assert runs.writes(log, 2, tmp_path / "three") == set()  # the rank with no candidate wrote nothing
    assert runs.records(tmp_path / "three", 0) == [(-1, 0)] and runs.records(tmp_path / "three", 1) == [(-1, 1)]


@pytest.mark.slow
def test_an_error_on_rank_0_reaches_every_rank_and_is_printed_once(tiny_model, tmp_path):
    """Rank 0 alone checks the run folder: its refusal must end the job at once, printed by rank 0 alone."""
    files = runs.prompt_files(tmp_path)
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    job = runs.run(runs.extract_args(tiny_model, out, files), nproc=2, timeout=120)
    assert job.returncode != 0
    assert job.stderr.count("is not empty and is not a tlrefusal run") == 1, job.stderr[-3000:]
    assert runs.files_of(out) == {"notes.txt"}


SAVE_DIRECTION = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from tlrefusal import artifacts
    vector = torch.linspace(-1, 1, 8, dtype=torch.float64)
    artifacts.RefusalDirection(vector, 3, -2, "some/model").save(Path(sys.argv[1]))
    artifacts.write_tensors(Path(sys.argv[2]), {"b": vector.float(), "a": vector}, {"z": "1", "a": "2", "m": "3"})
""")


def test_tensor_files_written_by_separate_processes_are_byte_identical(tmp_path):
    """safetensors orders the header's metadata by a per-process hash seed; `artifacts.write_tensors` fixes the
    order, so rank 0 of a job and a lone process write the same bytes."""
    from tlrefusal import artifacts

    outputs = []
    for i in range(3):
        paths = [tmp_path / f"direction{i}.safetensors", tmp_path / f"tensors{i}.safetensors"]
        subprocess.run([sys.executable, "-c", SAVE_DIRECTION, *map(str, paths)], cwd=runs.REPO, env=runs.environment(),
                       check=True, timeout=120)
        outputs.append([path.read_bytes() for path in paths])
    assert outputs[0] == outputs[1] == outputs[2]
    loaded = artifacts.RefusalDirection.load(tmp_path / "direction0.safetensors")
    assert (loaded.layer, loaded.position, loaded.model) == (3, -2, "some/model")
    tensors = artifacts.read_tensors(tmp_path / "tensors0.safetensors")
    assert sorted(tensors) == ["a", "b"] and tensors["b"].dtype.is_floating_point
