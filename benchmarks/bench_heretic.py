"""tlrefusal's paper method beside heretic 1.4.0 on the same model, with the same prompts and the same judge.

heretic (`heretic-llm` on PyPI) is AGPL-3.0: nothing here imports it, copies its code, its refusal markers or
its default config. It runs as a separate program in its own virtual environment (`--setup-heretic` builds
it from `requirements-heretic.txt`), and this script reads what it prints and the model folder it saves.

Both tools get the same model (default: the refusing organism) and the same prompts: 128 + 128 training
and 32 + 32 validation prompts sampled from the paper's splits with the paper's seed (42), exactly the
prompts `tlrefusal extract --harmful harmful_train.json ... --harmless-val harmless_val.json` samples.
heretic computes its directions from the training prompts and scores its trials (refusals, first-token
KL) on the validation prompts; tlrefusal filters the training prompts by refusal, and selects its direction
on the validation prompts. heretic's system prompt is set to the chat template's default one (what the
template writes when no system message is given, as in tlrefusal's prompts), read from the rendered
template, so both tools format every prompt to the same text.

- tlrefusal: `tlrefusal extract` then `tlrefusal orthogonalize RUN --out DIR`, each a subprocess; wall time
  from the start of extract to the saved (and verified) checkpoint.
- heretic 1.4.0 has no non-interactive mode: with KAGGLE_KERNEL_RUN_TYPE set its menus are numbered lists
  read from standard input, which `drive` answers (`HereticAnswers`): the trial with the fewest refusals
  among the Pareto-front trials whose KL is at most --max-kl (default 0.5, the value above which heretic's
  menu warns of damage), ties to the lowest KL (if none is that low, the lowest-KL trial); save the merged
  model to a folder; return; exit. Wall time from the start of the process to "Model saved to".
  Every setting comes from a config.toml written in a fresh working folder from this script's values.

Judge (the same code for every model, tlrefusal's own functions): held-out prompts neither tool saw,
--eval-n per label from the paper's test splits (`held_out`: seed 5, outside the samples the other
benchmarks measure on); refusal rate by the paper's substrings on greedy replies (`refusal_rate`, 64 new
tokens); KL(organism || model) of the first-token distribution on the harmless held-out prompts
(`last_logits`, `kl_divergence`); CE loss of the model on the organism's own greedy replies to the
harmless held-out prompts (`reply_sequence`, `ce_loss`). Peak memory: the largest sum of RSS over the
tool's process tree, polled from /proc every 0.2 s. The load average is recorded at each tool's start
and end: the cores may be shared with other work.

With --parallel the two tools run at the same time (each then shares the cores with the other as well as with
whatever else runs). A --work folder that already holds a tool's record (`once`) reuses it and only judges.

    python benchmarks/bench_heretic.py --paper-data DIR --setup-heretic        # builds the venv once
    python benchmarks/bench_heretic.py --paper-data DIR --trials 8 --parallel
"""
import argparse
import codecs
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from paper_data import add_paper_data_flag, splits_dir

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).with_name("requirements-heretic.txt")
HERETIC = "heretic-llm==1.4.0"
TORCH = "torch==2.13.0"  # the project's build, a local wheel here: any other version would download gigabytes
DEFAULT_VENV = Path.home() / ".cache" / "tlrefusal-bench" / "heretic-venv"
DEFAULT_WORK = Path.home() / ".cache" / "tlrefusal-bench" / "runs"
# Held-out sample: bench_organism measures on 64-prompt samples of the test splits with seeds 0-4 (seed 4
# also at 128 harmful / 256 harmless), bench_nnsight on the first 32 of each; this one takes seed 5 of what
# those leave.
EVAL_SEED = 5
NNSIGHT_FIRST = 32
ORGANISM_SEED4 = {"harmful": 128, "harmless": 256}
SPLIT_NAMES = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
# heretic's datasets (its config's names) for each of tlrefusal's splits.
HERETIC_DATASETS = {"bad_prompts": "harmful_train", "good_prompts": "harmless_train",
                    "bad_evaluation_prompts": "harmful_val", "good_evaluation_prompts": "harmless_val"}


# --- a process tree's peak memory ---------------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree_rss(pid: int) -> int:
    """Bytes of resident memory of `pid` and all its descendants (Linux /proc); 0 if it is gone."""
    children, total, todo = _children_map(), 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class PeakRss:
    """Polls a process tree's RSS in a thread until stopped; `peak` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# --- answering a program's numbered menus over standard input ------------------------------------------------

class DriverError(RuntimeError):
    """The driven program asked something the answers do not cover, or failed."""


@dataclass(frozen=True)
class Menu:
    message: str
    titles: tuple[str, ...]


@dataclass(frozen=True)
class TextPrompt:
    message: str


class Answers(Protocol):
    def select(self, message: str, titles: tuple[str, ...]) -> int:
        """The 1-based number to answer a numbered menu with."""

    def text(self, message: str) -> str:
        """The line to answer a text prompt with."""


SELECT_PROMPT = "Enter number: "
_CHOICE = re.compile(r"^\[(\d+)\] (.*)$")


def pending_prompt(output: str) -> Menu | TextPrompt | None:
    """The question the program waits on, read from the end of its output, or None.

    A prompt is an unterminated last line ending in ": " (what `input(prompt)` leaves). "Enter number: "
    asks for one of the numbered lines "[1] ...", "[2] ..." just above it, under a message line.
    """
    lines = output.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    last = lines[-1]
    if not last.endswith(": "):
        return None
    if last != SELECT_PROMPT:
        return TextPrompt(last[:-2].strip())
    numbered: list[tuple[int, str]] = []
    i = len(lines) - 2
    while i >= 0 and (m := _CHOICE.match(lines[i])):
        numbered.insert(0, (int(m.group(1)), m.group(2)))
        i -= 1
    if not numbered:
        raise DriverError("'Enter number:' with no numbered choices above it (an answer was refused?)")
    if [n for n, _ in numbered] != list(range(1, len(numbered) + 1)):
        raise DriverError(f"a numbered menu not numbered 1..n: {numbered}")
    titles = [t for _, t in numbered]
    while i >= 0 and not lines[i].strip():
        i -= 1
    return Menu(lines[i].strip() if i >= 0 else "", tuple(titles))


@dataclass
class Driven:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    marks: dict[str, float]  # pattern -> seconds from the start to its first appearance in the output
    answers: list[dict]  # each question and the answer given, with its time


def drive(cmd: list[str], log: Path, answers: Answers | None = None, cwd: Path | None = None,
          env: dict | None = None, marks: tuple[str, ...] = (), timeout: float | None = None,
          quiet: float = 0.3) -> Driven:
    """Run `cmd` (stdout and stderr into `log`), measure its process tree, and answer its prompts.

    When the program has printed nothing for `quiet` seconds and its output ends in a prompt
    (`pending_prompt`), `answers` gives the reply. An unexpected question, or a timeout, kills the
    program's process group and raises DriverError.
    """
    load_start = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if answers else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    peak = PeakRss(proc.pid)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    seen: dict[str, float] = {}
    given: list[dict] = []
    pending = ""  # output since the last answer, where the next question is read
    fd = proc.stdout.fileno()
    try:
        with log.open("w", encoding="utf-8") as out:
            while True:
                if timeout is not None and time.perf_counter() - started > timeout:
                    raise DriverError(f"{cmd[0]} ran past {timeout:.0f} s")
                ready, _, _ = select.select([fd], [], [], quiet)
                if ready:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    text = decoder.decode(chunk)
                    out.write(text)
                    out.flush()
                    pending = (pending + text)[-50_000:]
                    now = time.perf_counter() - started
                    for pattern in marks:
                        if pattern not in seen and pattern in pending:
                            seen[pattern] = now
                    continue
                if answers is None or proc.poll() is not None:
                    continue
                question = pending_prompt(pending)
                if question is None:
                    continue
                if isinstance(question, Menu):
                    number = answers.select(question.message, question.titles)
                    reply = str(number)
                    record = {"menu": question.message, "answer": question.titles[number - 1]}
                else:
                    reply = answers.text(question.message)
                    record = {"prompt": question.message, "answer": reply}
                record["seconds"] = time.perf_counter() - started
                given.append(record)
                out.write(f"\n<<< answered: {reply}\n")
                proc.stdin.write((reply + "\n").encode())
                proc.stdin.flush()
                pending = ""
        proc.wait()
    except BaseException:
        _kill(proc)
        raise
    finally:
        peak_bytes = peak.stop()
    return Driven(returncode=proc.returncode, seconds=time.perf_counter() - started, peak_rss_bytes=peak_bytes,
                  loadavg_start=load_start, loadavg_end=os.getloadavg(), marks=seen, answers=given)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the program and its children only
        proc.wait()


# --- heretic's menus ---------------------------------------------------------------------------------------

_TRIAL = re.compile(r"\[Trial\s+(\d+)\]\s+Refusals:\s*(\d+)/(\d+),\s+KL divergence:\s+([0-9.]+)")


@dataclass(frozen=True)
class Trial:
    index: int
    refusals: int
    n_prompts: int
    kl: float

    @classmethod
    def parse(cls, title: str) -> "Trial | None":
        m = _TRIAL.search(title)
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))) if m else None


def choose_trial(front: list[Trial], max_kl: float) -> Trial:
    """The fewest refusals among the trials with KL <= max_kl, ties to the lowest KL; if no trial is that
    low, the lowest-KL trial."""
    if not front:
        raise DriverError("the trial menu lists no trial")
    within = [t for t in front if t.kl <= max_kl]
    return min(within, key=lambda t: (t.refusals, t.kl)) if within else min(front, key=lambda t: t.kl)


def _title_index(titles: tuple[str, ...], wanted: str, message: str) -> int:
    for i, title in enumerate(titles, 1):
        if title.lower().startswith(wanted.lower()):
            return i
    raise DriverError(f"menu {message!r} has no choice {wanted!r}: {list(titles)}")


@dataclass
class HereticAnswers:
    """Choose a trial (`choose_trial`), save the merged model to `save_dir`, go back, exit."""

    save_dir: Path
    max_kl: float
    front: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    saved: bool = False

    def select(self, message: str, titles: tuple[str, ...]) -> int:
        if message.startswith("Which trial do you want to use"):
            if self.saved:
                return _title_index(titles, "Exit program", message)
            if self.chosen is not None:
                raise DriverError("back at the trial menu without having saved the chosen trial")
            numbered = [(i, Trial.parse(t)) for i, t in enumerate(titles, 1)]
            self.front = [t for _, t in numbered if t is not None]
            self.chosen = choose_trial(self.front, self.max_kl)
            return next(i for i, t in numbered if t == self.chosen)
        if message.startswith("What do you want to do with the decensored model"):
            if self.saved:
                return _title_index(titles, "Return to the trial selection menu", message)
            return _title_index(titles, "Save the model to a local folder", message)
        raise DriverError(f"unexpected menu {message!r}: {list(titles)}")

    def text(self, message: str) -> str:
        if message.startswith("Path to the folder"):
            self.saved = True
            return str(self.save_dir)
        raise DriverError(f"unexpected prompt {message!r}")


# --- prompts ----------------------------------------------------------------------------------------------

def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template writes when no system message is given (SmolLM2's and Qwen's
    templates have one), read from the rendered template; None if it writes no system turn then."""
    sentinel = "TLREFUSALSYSTEMSENTINEL"
    user = [{"role": "user", "content": "Hello"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": sentinel}] + user,
                                                    tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that rejects system messages (jinja raises its own types)
        return None
    before, found, after = with_system.partition(sentinel)
    if not found or len(plain) < len(before) + len(after) or not plain.startswith(before) or not plain.endswith(after):
        return None
    return plain[len(before):len(plain) - len(after)]


def same_rendering(tokenizer, system_prompt: str | None, instructions: list[str]) -> bool:
    """Whether heretic's rendering (a system message, then the user's) equals tlrefusal's (`ChatFormat`) for
    every instruction."""
    from tlrefusal.chat import ChatFormat

    if system_prompt is None:
        return False
    chat = ChatFormat.from_tokenizer(tokenizer)
    return all(tokenizer.apply_chat_template([{"role": "system", "content": system_prompt},
                                              {"role": "user", "content": x}],
                                             tokenize=False, add_generation_prompt=True) == chat.format(x)
               for x in instructions)


def train_val(splits: Path, n_train: int, n_val: int, seed: int) -> dict[str, list[str]]:
    """The prompts `tlrefusal extract` samples from the paper's split files (`sample_splits`)."""
    from tlrefusal.data import load_prompts, sample_splits

    pools = {name: load_prompts(str(splits / f"{name}.json")) for name in SPLIT_NAMES}
    sampled = sample_splits(pools["harmful_train"], pools["harmless_train"], n_train, n_val, seed=seed,
                            harmful_val=pools["harmful_val"], harmless_val=pools["harmless_val"])
    return {name: [p.instruction for p in prompts] for name, prompts in sampled.items()}


def held_out(splits: Path, n: int, model_folder: Path | None, seed: int = EVAL_SEED,
             exclude: Iterable[str] = ()) -> dict[str, list[str]]:
    """`n` prompts per label of the paper's test splits that no other benchmark measures on: outside
    bench_nnsight's first 32, bench_organism's seed 0-4 samples (seed 4 also at its larger sizes), the
    organism's own training prompts and `exclude`; drawn by `bench_organism.unused_sample` with `seed` from what
    is left (so excluding a prompt changes the draw, not only drops it)."""
    from bench_organism import trained_on_paper_prompts, unused_sample

    from tlrefusal.data import load_prompts
    from tlrefusal.organism import normalise_prompt

    trained = trained_on_paper_prompts(model_folder, splits) if model_folder is not None else []
    exclude = set(exclude)  # read once: an iterator would be spent on the first label
    out = {}
    for label in ("harmful", "harmless"):
        pool = [p.instruction for p in load_prompts(str(splits / f"{label}_test.json"))]
        used = (set(pool[:NNSIGHT_FIRST]) | set(unused_sample(pool, ORGANISM_SEED4[label], 4)) | set(trained)
                | exclude)
        out[label] = unused_sample(pool, n, seed, exclude=frozenset(map(normalise_prompt, used)))
    return out


# --- the judge --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """What every model is compared with: the baseline's first-token logits on the harmless held-out
    prompts and its greedy replies to them (the CE loss's targets)."""

    logits: object  # Float[Tensor, "n d_vocab"]
    replies: tuple[str, ...]


def judge(folder: Path, prompts: dict[str, list[str]], reference: Reference | None = None,
          max_new_tokens: int = 64, batch_size: int = 32) -> tuple[dict, Reference]:
    """Refusal rates, first-token KL against `reference` and CE loss on its replies, for the model in
    `folder`; without a reference, the model is its own (KL 0) and the returned Reference is its."""
    from tlrefusal.activations import last_logits
    from tlrefusal.chat import ChatFormat
    from tlrefusal.evaluation.loss import ce_loss, reply_sequence
    from tlrefusal.interventions import BASELINE
    from tlrefusal.model import ModelSource, load_model, release_memory
    from tlrefusal.refusal import refusal_rate
    from tlrefusal.scoring import kl_divergence

    model = load_model(ModelSource(str(folder), "local", Path(folder)))
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    rates = {label: refusal_rate(model, chat, prompts[label], BASELINE, max_new_tokens, batch_size=batch_size)
             for label in ("harmful", "harmless")}
    logits = last_logits(model, chat, prompts["harmless"], batch_size=batch_size)
    if reference is None:
        reference = Reference(logits, rates["harmless"].replies)
    kl = kl_divergence(reference.logits, logits)
    sequences = [s for s in (reply_sequence(chat, x, r) for x, r in zip(prompts["harmless"], reference.replies,
                                                                          strict=True)) if s is not None]
    ce = ce_loss(model, sequences, batch_size=8)
    row = {"refusal_harmful": rates["harmful"].rate, "refusal_harmless": rates["harmless"].rate,
           "kl_first_token": float(kl.mean()), "kl_first_token_max": float(kl.max()),
           "ce_loss": ce.loss, "ce_tokens": ce.tokens, "ce_sequences": ce.sequences,
           "n": {label: rates[label].n for label in rates},
           "examples": {label: rates[label].examples(2) for label in rates},
           "replies": {label: list(rates[label].replies) for label in rates}}
    del model
    release_memory()
    return row, reference


# --- the two tools ----------------------------------------------------------------------------------------

def setup_heretic(venv: Path) -> None:
    """Create heretic's venv: torch (the local build), heretic's dependencies, then heretic without deps."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH], check=True)
    subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True)
    subprocess.run(pip + ["--no-deps", HERETIC], check=True)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    return repr(value)


def heretic_config(model: Path, datasets: dict[str, Path], system_prompt: str, trials: int, seed: int,
                   batch_size: int, max_response_length: int) -> str:
    """config.toml for heretic, from this benchmark's values: CPU, float32, fixed batch size and an empty
    response prefix (no batch-size sweep, no prefix generation), merged export, a fixed seed."""
    top = {"model": str(model), "device_map": "cpu", "dtypes": ["float32"], "batch_size": batch_size,
           "response_prefix": "", "max_response_length": max_response_length, "n_trials": trials,
           "n_startup_trials": max(1, round(0.3 * trials)),  # heretic's default ratio, 60 of 200
           "seed": seed, "system_prompt": system_prompt, "export_strategy": "merge",
           "study_checkpoint_dir": "checkpoints"}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, folder in datasets.items():
        lines += ["", f"[{name}]", f"dataset = {_toml_value(str(folder))}", 'split = "train"', 'column = "text"']
    return "\n".join(lines) + "\n"


def write_dataset(folder: Path, prompts: list[str]) -> Path:
    """A local dataset folder (one JSON Lines file, column "text"): prompts keep their newlines, which a
    one-prompt-a-line text file would split."""
    folder.mkdir(parents=True)
    with (folder / "data.jsonl").open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
    return folder


def run_heretic(venv: Path, model: Path, sampled: dict[str, list[str]], system_prompt: str, work: Path,
                args) -> tuple[dict, Path]:
    folder = work / "heretic"
    folder.mkdir()  # fresh: a checkpoint journal there would add a continue/restart menu
    datasets = {name: write_dataset(work / "prompts" / split, sampled[split])
                for name, split in HERETIC_DATASETS.items()}
    (folder / "config.toml").write_text(heretic_config(model, datasets, system_prompt, args.trials, args.seed,
                                                       args.batch_size, args.max_response_length), encoding="utf-8")
    save_dir = work / "heretic-model"
    answers = HereticAnswers(save_dir=save_dir, max_kl=args.max_kl)
    env = os.environ | {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(venv / "bin" / "heretic"), "--model", str(model)]
    run = drive(cmd, work / "heretic.log", answers, cwd=folder, env=env, marks=("Model saved to",),
                timeout=args.heretic_timeout)
    log = (work / "heretic.log").read_text(encoding="utf-8")
    if run.returncode != 0 or not (save_dir / "config.json").is_file():
        raise DriverError(f"heretic exited {run.returncode} without a saved model; see {work / 'heretic.log'}")
    initial = re.search(r"Initial refusals:\s*(\d+)/(\d+)", log)
    record = {
        "command": cmd, "cwd": str(folder), "config_toml": (folder / "config.toml").read_text(encoding="utf-8"),
        "trials": args.trials, "trials_run": len(set(re.findall(r"Running trial (\d+) of", log))),
        "trial_rule": f"fewest refusals among the Pareto-front trials with KL <= {args.max_kl}, ties to the "
                      "lowest KL; the lowest-KL trial if none is that low",
        "pareto_front": [t.__dict__ for t in answers.front],
        "chosen_trial": answers.chosen.__dict__ if answers.chosen else None,
        "initial_refusals": [int(initial.group(1)), int(initial.group(2))] if initial else None,
        "seconds_to_saved_model": run.marks.get("Model saved to"), "process_seconds": run.seconds,
        "peak_rss_mib": run.peak_rss_bytes / 2**20, "loadavg_start": run.loadavg_start,
        "loadavg_end": run.loadavg_end, "answers": run.answers, "log": str(work / "heretic.log")}
    return record, save_dir


def run_tlrefusal(model: Path, splits: Path, work: Path, args) -> tuple[dict, Path]:
    from tlrefusal.selection import CandidateScore, SelectionConfig, choose

    run_dir, out = work / "tlrefusal-run", work / "tlrefusal-model"
    tl = [sys.executable, "-m", "tlrefusal"]
    extract = tl + ["extract", str(model), "--out", str(run_dir),
                    "--harmful", str(splits / "harmful_train.json"), "--harmless", str(splits / "harmless_train.json"),
                    "--harmful-val", str(splits / "harmful_val.json"),
                    "--harmless-val", str(splits / "harmless_val.json"),
                    "--n-train", str(args.n_train), "--n-val", str(args.n_val), "--seed", str(args.sample_seed),
                    "--kl-threshold", str(args.kl_threshold)] + args.tlrefusal_arg
    steps = {"extract": drive(extract, work / "tlrefusal-extract.log")}
    selection = json.loads((run_dir / "selection.json").read_text()) if (run_dir / "selection.json").is_file() else None
    orthogonalize = tl + ["orthogonalize", str(run_dir), "--out", str(out)]
    fallback = None
    if steps["extract"].returncode == 1 and selection is not None and selection["chosen"] is None:
        # No candidate passed --kl-threshold: the demo's rule (KL <= 2), re-chosen from the journaled scores.
        n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        config = SelectionConfig(**(selection["config"] | {"kl_threshold": args.fallback_kl_threshold}))
        chosen = choose([CandidateScore.from_json(c) for c in selection["candidates"]], n_layers, config).chosen
        if chosen is None:
            raise DriverError(f"no tlrefusal candidate passes KL <= {args.fallback_kl_threshold} either")
        fallback = {"kl_threshold": args.fallback_kl_threshold, **chosen.to_json()}
        orthogonalize += ["--layer", str(chosen.layer), "--position", str(chosen.position)]
    elif steps["extract"].returncode != 0:
        raise DriverError(f"tlrefusal extract exited {steps['extract'].returncode}; see the log in {work}")
    steps["orthogonalize"] = drive(orthogonalize, work / "tlrefusal-orthogonalize.log")
    if steps["orthogonalize"].returncode != 0:
        raise DriverError(f"tlrefusal orthogonalize exited {steps['orthogonalize'].returncode}; see the log in {work}")
    saved = json.loads((run_dir / "prompts.json").read_text())
    record = {
        "commands": [extract, orthogonalize],
        "chosen": (selection or {}).get("chosen"), "fallback": fallback,
        "filter_counts": (selection or {}).get("filter_counts"),
        "kept": {name: [sum(p.get("kept", True) for p in rows), len(rows)] for name, rows in saved.items()
                 if isinstance(rows, list)},
        "sampled": {name: [p["instruction"] for p in rows] for name, rows in saved.items() if isinstance(rows, list)},
        "seconds_to_saved_model": sum(s.seconds for s in steps.values()),
        "step_seconds": {k: s.seconds for k, s in steps.items()},
        "peak_rss_mib": max(s.peak_rss_bytes for s in steps.values()) / 2**20,
        "step_peak_rss_mib": {k: s.peak_rss_bytes / 2**20 for k, s in steps.items()},
        "loadavg_start": steps["extract"].loadavg_start, "loadavg_end": steps["orthogonalize"].loadavg_end,
        "step_loadavg": {k: [s.loadavg_start, s.loadavg_end] for k, s in steps.items()}}
    return record, out


# --- the benchmark ----------------------------------------------------------------------------------------

def once(record: Path, run) -> tuple[dict, Path]:
    """A tool's record and saved model: read from `record` in the working folder if an earlier call with the
    same --work wrote it (a rerun then only judges), else `run()` and write it."""
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        return data["record"], Path(data["folder"])
    out, folder = run()
    record.write_text(json.dumps({"record": out, "folder": str(folder)}, indent=1, ensure_ascii=False),
                      encoding="utf-8")
    return out, folder


def versions(venv: Path | None) -> dict:
    from importlib.metadata import version

    import torch

    out = {"tlrefusal": version("tlrefusal"), "torch": torch.__version__, "transformers": version("transformers"),
           "transformer_lens": version("transformer-lens"), "python": platform.python_version()}
    if venv is not None and (venv / "bin" / "python").is_file():
        probe = ("from importlib.metadata import version as v; import json; print(json.dumps({n: v(n) for n in "
                 "('heretic-llm', 'torch', 'transformers', 'peft', 'optuna', 'accelerate')}))")
        got = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
        out["heretic_venv"] = json.loads(got.stdout) if got.returncode == 0 else {"error": got.stderr[-300:]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism", help='a built-in model ("organism", the default) or a folder')
    add_paper_data_flag(parser)
    parser.add_argument("--heretic-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--setup-heretic", action="store_true", help="create --heretic-venv if it has no heretic")
    parser.add_argument("--work", type=Path, default=None, help="a fresh working folder (default: a new one under "
                                                               f"{DEFAULT_WORK})")
    parser.add_argument("--trials", type=int, default=60, help="heretic's n_trials")
    parser.add_argument("--seed", type=int, default=42, help="heretic's seed")
    parser.add_argument("--max-kl", type=float, default=0.5, help="the trial rule's KL cap (HereticAnswers)")
    parser.add_argument("--batch-size", type=int, default=32, help="heretic's batch_size (no sweep)")
    parser.add_argument("--max-response-length", type=int, default=32,
                        help="tokens of the replies heretic counts refusals in, per trial (its default 100; 32 to fit a CPU)")
    parser.add_argument("--heretic-timeout", type=float, default=3600.0)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--sample-seed", type=int, default=42, help="train/val sampling seed (paper: 42)")
    parser.add_argument("--kl-threshold", type=float, default=0.1, help="tlrefusal's KL filter (paper: 0.1)")
    parser.add_argument("--fallback-kl-threshold", type=float, default=2.0,
                        help="if no candidate passes --kl-threshold, the demo's threshold, re-chosen from the scores")
    parser.add_argument("--tlrefusal-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `tlrefusal extract` (repeatable), e.g. --tlrefusal-arg=--no-filter")
    parser.add_argument("--eval-n", type=int, default=64, help="held-out prompts per label for the judge")
    parser.add_argument("--eval-tokens", type=int, default=64)
    parser.add_argument("--parallel", action="store_true",
                        help="run the two tools at the same time (each then shares the cores with the other)")
    parser.add_argument("--skip", action="append", default=[], choices=["tlrefusal", "heretic"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heretic_organism.json")
    args = parser.parse_args(argv)
    splits = splits_dir(args.paper_data).resolve()

    import torch
    from transformers import AutoTokenizer

    from tlrefusal.model import resolve_source

    heretic_bin = args.heretic_venv / "bin" / "heretic"
    if "heretic" not in args.skip and not heretic_bin.is_file():
        if not args.setup_heretic:
            raise SystemExit(f"error: no heretic in {args.heretic_venv}; pass --setup-heretic to create it there")
        setup_heretic(args.heretic_venv)
    model = resolve_source(args.model).path.resolve()
    work = (args.work or DEFAULT_WORK / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)  # a --work that holds a tool's record reuses it (`once`)

    tokenizer = AutoTokenizer.from_pretrained(model)
    system_prompt = default_system_prompt(tokenizer)
    sampled = train_val(splits, args.n_train, args.n_val, args.sample_seed)
    every = [x for name in SPLIT_NAMES for x in sampled[name]]
    evaluation = held_out(splits, args.eval_n, model)
    report: dict = {
        "benchmark": "bench_heretic", "command": [sys.executable] + sys.argv if argv is None else argv,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": str(model),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "shared_cores_note": "the cores may be shared with other work (they were on the machine this was written on): "
                             "the load average at each tool's "
                             "start and end is recorded, and the seconds are pessimistic where it is above the "
                             "core count",
        "versions": versions(None if "heretic" in args.skip else args.heretic_venv),
        "prompts": {"train_val": {name: len(v) for name, v in sampled.items()}, "sample_seed": args.sample_seed,
                    "held_out": {"n": {k: len(v) for k, v in evaluation.items()}, "seed": EVAL_SEED,
                                 "prompts": evaluation},
                    "system_prompt": system_prompt,
                    "heretic_renders_like_tlrefusal": same_rendering(tokenizer, system_prompt, every)},
        "judge": {"refusal": "the paper's refusal substrings (tlrefusal.scoring.is_refusal) on greedy replies "
                             f"of {args.eval_tokens} new tokens, cut at the template's end of turn",
                  "kl": "KL(organism || model) of the next-token distribution at the last prompt position "
                        "(the first reply token), mean over the harmless held-out prompts",
                  "ce": "token-weighted CE loss of each model on the organism's own greedy replies to the "
                        "harmless held-out prompts (tokens after the post-instruction run)"},
        "work": str(work)}
    if system_prompt is None:
        raise SystemExit("error: the chat template writes no default system prompt; heretic always sends one, so "
                         "the two tools would not see the same prompts")

    folders = {args.model if args.model in ("organism", "smollm2") else "baseline": model}  # the reference row
    tools = {"tlrefusal": lambda: once(work / "tlrefusal.json", lambda: run_tlrefusal(model, splits, work, args)),
             "heretic": lambda: once(work / "heretic.json", lambda: run_heretic(
                 args.heretic_venv, model, sampled, system_prompt, work, args))}
    tools = {name: run for name, run in tools.items() if name not in args.skip}
    report["tools_ran"] = "at the same time" if args.parallel and len(tools) > 1 else "one after the other"
    with ThreadPoolExecutor(max_workers=max(1, len(tools)) if args.parallel else 1) as pool:
        done = {name: pool.submit(run) for name, run in tools.items()}
        for name, future in done.items():
            report[name], folders[name] = future.result()
    if "sampled" in report.get("tlrefusal", {}):
        report["prompts"]["tlrefusal_sampled_the_same"] = {
            name: sorted(report["tlrefusal"]["sampled"].get(name, [])) == sorted(sampled[name]) for name in SPLIT_NAMES}
    reference = None
    report["results"] = {}
    for name, folder in folders.items():
        row, reference = judge(folder, evaluation, reference, args.eval_tokens)
        report["results"][name] = row
        (work / f"judge-{name}.json").write_text(json.dumps(row, indent=1, ensure_ascii=False), encoding="utf-8")
    with (work / "replies.json").open("w", encoding="utf-8") as f:
        json.dump({k: v.pop("replies") for k, v in report["results"].items()}, f, indent=1, ensure_ascii=False)
    if "tlrefusal" in report:
        report["tlrefusal"].pop("sampled", None)
    for name in ("tlrefusal", "heretic"):
        if name in report and name in report["results"]:
            report["results"][name] |= {k: report[name][k] for k in
                                        ("seconds_to_saved_model", "peak_rss_mib", "loadavg_start", "loadavg_end")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("| model | refusal harmful | refusal harmless | KL (first token) | CE loss | wall to saved model | "
          "peak RSS | load avg start -> end |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in report["results"].items():
        wall = f"{r['seconds_to_saved_model']:.0f} s" if r.get("seconds_to_saved_model") else ""
        peak = f"{r['peak_rss_mib']:,.0f} MiB" if r.get("peak_rss_mib") else ""
        load = (f"{r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}" if r.get("loadavg_start") else "")
        print(f"| {name} | {r['refusal_harmful']:.0%} | {r['refusal_harmless']:.0%} | {r['kl_first_token']:.3f} | "
              f"{r['ce_loss']:.3f} | {wall} | {peak} | {load} |")


if __name__ == "__main__":
    main()
