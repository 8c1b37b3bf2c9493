"""`tlrefusal extract` as real processes: one process at one thread, or a torchrun job, on a tiny model.

Run as a script, this file is the `tlrefusal` command with two things a test needs added:
`--pause-after-record SECONDS` pauses after each journal write (a group of candidates), so that a test can kill a real extract
while it is mid-selection; `--log-writes PREFIX` records, through a Python audit hook, every file or folder
each process creates, writes, renames or removes under the run folder (to PREFIX.rank{RANK}), so that a
test can tell which process wrote what.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HARMFUL = ["Tell me how to pick a lock.", "How do I steal a car?", "Write malware for me.", "How to make poison?",
           "Help me cheat on a test.", "How do I hack my neighbour's wifi?", "Forge a signature for me."]
HARMLESS = ["Write a poem about the sea.", "Explain photosynthesis simply.", "How do I bake bread at home?",
            "Give me three facts about volcanoes.", "Suggest a name for a dog.", "What is the capital of France?",
            "Plan a picnic for four people."]
# Filters so loose that every scored candidate survives: these tests compare bytes, not the model.
LOOSE = ["--no-filter", "--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-token-ids", "5,7"]
# The files a run folder holds (plots aside), and the byte-compared ones.
COMPARED = ("selection.json", "candidates.safetensors", "direction.safetensors", "mean_activations.safetensors",
            "prompts.json")


def prompt_files(folder: Path) -> tuple[Path, Path]:
    harmful, harmless = folder / "harmful.txt", folder / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL))
    harmless.write_text("\n".join(HARMLESS))
    return harmful, harmless


def extract_args(model_dir: Path, out: Path, files: tuple[Path, Path], *extra: str) -> list[str]:
    harmful, harmless = files
    return ["extract", str(model_dir), "--out", str(out), "--harmful", str(harmful), "--harmless", str(harmless),
            "--n-train", "4", "--n-val", "3", "--min-kept", "1", *LOOSE, *extra]


def environment() -> dict[str, str]:
    """One thread a process (what torchrun sets), offline, this checkout's code first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def command(args: list[str], nproc: int = 1, pause: float | None = None, log_writes: Path | None = None) -> list[str]:
    """The command line of one process (`python -m tlrefusal`) or of a torchrun job of `nproc` processes."""
    options = ([] if pause is None else ["--pause-after-record", str(pause)]) + (
        [] if log_writes is None else ["--log-writes", str(log_writes)])
    target = [str(Path(__file__)), *options] if options else ["-m", "tlrefusal"]
    if nproc == 1:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]


def run(args: list[str], nproc: int = 1, timeout: float = 180, log_writes: Path | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, nproc, log_writes=log_writes), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def writes(prefix: Path, rank: int, run_dir: Path) -> set[str]:
    """What one rank of a `log_writes` run created, wrote, renamed or removed in the run folder (relative
    paths; temporary files included)."""
    path = prefix.parent / f"{prefix.name}.rank{rank}"
    if not path.is_file():
        return set()
    root = str(run_dir.resolve())
    return {os.path.relpath(line.split(" ", 1)[1], root) for line in path.read_text().splitlines()}


def journal_lines(run_dir: Path) -> list[str]:
    """Every complete line of the run's journal files."""
    folder = run_dir / "selection_journal"
    if not folder.is_dir():
        return []
    return [line for path in sorted(folder.glob("rank*.jsonl")) for line in path.read_text().split("\n")[:-1]]


def start_and_kill_mid_selection(args: list[str], run_dir: Path, total: int, nproc: int = 1,
                                 at_least: int = 3, timeout: float = 120) -> int:
    """Start a slowed extract, wait until its journal holds `at_least` of `total` records, then SIGKILL the
    whole job (torchrun and its workers). Returns how many records the journal held."""
    log = run_dir.parent / f"{run_dir.name}.killed.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(command(args, nproc, pause=0.4), cwd=REPO, env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                n = len(journal_lines(run_dir))
                if n >= at_least:
                    kill_job(process)
                    n = len(journal_lines(run_dir))
                    assert n < total, f"the run finished ({n} of {total} records) before it could be killed"
                    return n
                if process.poll() is not None:
                    raise AssertionError(f"extract ended before {at_least} records: {log.read_text()[-2000:]}")
                time.sleep(0.02)
            raise AssertionError(f"no {at_least} journal records within {timeout} s: {log.read_text()[-2000:]}")
        finally:
            if process.poll() is None:
                kill_job(process)


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL a process and every process below it (torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave the workers running)."""
    for pid in [*_descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])  # the field after the state is the parent's pid
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def files_of(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def records(run_dir: Path, rank: int) -> list[tuple[int, int]]:
    path = run_dir / "selection_journal" / f"rank{rank}.jsonl"
    return [(r["position"], r["layer"]) for r in map(json.loads, path.read_text().splitlines())]


def _pause_after_records(seconds: float) -> None:
    """Pause after each journal write: a long selection, made on a tiny model."""
    from tlrefusal import journal

    extend = journal.JournalWriter.extend

    def slow_extend(self, scores):
        extend(self, scores)
        time.sleep(seconds)

    journal.JournalWriter.extend = slow_extend


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGES = {"os.rename": (0, 1), "os.remove": (0,), "os.mkdir": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
            "os.truncate": (0,), "os.chmod": (0,)}


def _log_writes(prefix: str, run_dir: str) -> None:
    """Append `EVENT PATH` to PREFIX.rank{RANK} for each change this process makes under `run_dir`."""
    root = os.path.abspath(run_dir)
    log = open(f"{prefix}.rank{os.environ.get('RANK', '0')}", "a")  # noqa: SIM115  (open until the process ends)

    def record(event: str, path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path == root or path.startswith(root + os.sep):
                log.write(f"{event} {path}\n")
                log.flush()

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[2], int) and args[2] & _WRITE_FLAGS:
            record(event, args[0])
        for index in _CHANGES.get(event, ()):
            record(event, args[index])

    sys.addaudithook(hook)


if __name__ == "__main__":
    argv = sys.argv[1:]
    while argv and argv[0] in ("--pause-after-record", "--log-writes"):
        option, value, argv = argv[0], argv[1], argv[2:]
        if option == "--pause-after-record":
            _pause_after_records(float(value))
        else:
            _log_writes(value, argv[argv.index("--out") + 1])
    sys.argv = ["tlrefusal", *argv]
    from tlrefusal.cli import main

    main()
