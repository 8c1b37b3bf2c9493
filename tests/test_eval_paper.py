"""`tlrefusal eval --paper` (issue 15, items 4 and 8): the original code's evaluation sets and settings.

The reference is an independent replay of the original's sampling, written here with Python's `random`
on the paper's split files (SPEC 1.1 and 1.8): `random.seed(42)`; `random.sample` of harmful_train 128,
harmless_train 128, harmful_val 32, harmless_val 32; then `random.sample(harmless_test, 100)`. The harmful
set is JailbreakBench whole (the paper's processed file stands in for the hub, which tests never reach).
"""
import json
import random

import pytest
from typer.testing import CliRunner

from tests.conftest import SHARED, SPLITS
from tlrefusal import artifacts
from tlrefusal.data import load_prompts, prompts_hash
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.sets import eval_sets

JAILBREAKBENCH = SHARED / "data" / "datasets" / "processed" / "jailbreakbench.json"
SPLIT_FILES = {"harmful": "harmful_train", "harmless": "harmless_train", "harmful_val": "harmful_val",
               "harmless_val": "harmless_val"}


def instructions(name: str, folder=SPLITS) -> list[str]:
    return [row["instruction"] for row in json.loads((folder / f"{name}.json").read_text())]


def original_harmless_sample(n: int = 100, n_train: int = 128, n_val: int = 32, folder=SPLITS) -> list[str]:
    """The original's `run_pipeline`: four samples from the seed-42 stream, then the harmless test sample."""
    random.seed(42)
    for name, k in (("harmful_train", n_train), ("harmless_train", n_train), ("harmful_val", n_val),
                    ("harmless_val", n_val)):
        random.sample(instructions(name, folder), k)
    return random.sample(instructions("harmless_test", folder), n)


def paper_run_dir(tmp_path, pools=None):
    """A run folder's RUN/config.json as `tlrefusal extract` records it for a run on the paper's splits."""
    pools = pools or {key: str(SPLITS / f"{name}.json") for key, name in SPLIT_FILES.items()}
    config = {**pools, "n_train": 128, "n_val": 32, "seed": 42}
    identity = {"config": config, "data_sha256": {k: prompts_hash(load_prompts(v)) for k, v in pools.items()}}
    run = tmp_path / "run"
    artifacts.write_json(run / artifacts.CONFIG, identity)
    return run, config


def test_paper_sets_are_jailbreakbench_and_the_seed_42_harmless_test_sample(tmp_path):
    run, run_config = paper_run_dir(tmp_path)
    config = EvalConfig.resolve(paper=True, harmful=(str(JAILBREAKBENCH),), harmless=(str(SPLITS / "harmless_test.json"),))
    harmful, harmless = eval_sets(run, run_config, config, None)
    jbb = [row["instruction"] for row in json.loads(JAILBREAKBENCH.read_text())]
    assert (harmful.label, len(jbb)) == ("harmful", 100)
    assert harmful.instructions == jbb  # whole, in order
    assert harmless.label == "harmless" and harmless.name == "harmless_test"
    assert harmless.instructions == original_harmless_sample()
    # The preset's own harmful set is JailbreakBench (by name; the hub is out of reach here).
    assert EvalConfig.resolve(paper=True).harmful == ("jailbreakbench",)


def test_paper_sets_refuse_a_changed_pool_and_a_missing_test_pool(tmp_path):
    run, run_config = paper_run_dir(tmp_path)
    with pytest.raises(TlrefusalError, match="harmless test pool"):
        eval_sets(run, run_config, EvalConfig.resolve(paper=True, harmful=(str(JAILBREAKBENCH),)), None)
    changed = tmp_path / "harmful_train.json"
    changed.write_text(json.dumps(instructions("harmful_train")[:-1]))
    artifacts.write_json(run / artifacts.CONFIG, {**artifacts.read_json(run / artifacts.CONFIG),
                                                  "config": {**run_config, "harmful": str(changed)}})
    config = EvalConfig.resolve(paper=True, harmful=(str(JAILBREAKBENCH),), harmless=(str(SPLITS / "harmless_test.json"),))
    with pytest.raises(TlrefusalError, match="changed since extraction"):
        eval_sets(run, {**run_config, "harmful": str(changed)}, config, None)


def test_paper_preset_and_explicit_overrides():
    from tlrefusal.evaluation.coherence import PAPER_TASKS

    paper = EvalConfig.resolve(paper=True)
    assert (paper.paper, paper.eval_sets, paper.stop, paper.n, paper.max_new_tokens, paper.actadd_sign) == \
        (True, "paper", "eos", 100, 512, "paper")
    assert (paper.ce_n, paper.tasks, paper.coherence_limit) == (2048 * 2, PAPER_TASKS, None)
    fast = EvalConfig.resolve()
    assert (fast.paper, fast.eval_sets, fast.stop, fast.ce_n, fast.coherence_limit) == (False, "held-out", "turn", 64, 100)
    mixed = EvalConfig.resolve(paper=True, ce_n=8, stop="turn", tasks=())
    assert (mixed.ce_n, mixed.stop, mixed.tasks, mixed.eval_sets) == (8, "turn", (), "paper")
    with pytest.raises(TlrefusalError, match="stop must be one of"):
        EvalConfig(stop="eot")


def test_cli_eval_paper_on_a_run_extracted_from_the_papers_splits(tiny_dirs, tmp_path):
    """`tlrefusal extract` on the paper's splits with seed 42, then `tlrefusal eval RUN --paper`: the completions
    are of exactly the prompts the original's stream gives for the run's sizes (small here, to keep the test
    short: the paper's 128 / 32 are checked without a model above), and the report records the preset and the
    overrides."""
    from tlrefusal.cli import app

    splits = tmp_path / "splits"  # the 40 shortest prompts of each split, in file order: short forward passes
    splits.mkdir()
    for name in (*SPLIT_FILES.values(), "harmless_test"):
        rows = json.loads((SPLITS / f"{name}.json").read_text())
        short = set(sorted(range(len(rows)), key=lambda i: len(rows[i]["instruction"]))[:40])
        (splits / f"{name}.json").write_text(json.dumps([row for i, row in enumerate(rows) if i in short]))
    run = tmp_path / "run"
    extract = ["extract", str(tiny_dirs["llama"]), "--out", str(run), "--seed", "42", "--no-filter",
               "--n-train", "5", "--n-val", "3", "--kl-threshold", "1e9", "--induce-threshold", "-1e9"]
    for key, name in SPLIT_FILES.items():
        extract += [f"--{key.replace('_', '-')}", str(splits / f"{name}.json")]
    result = CliRunner().invoke(app, extract)
    assert result.exit_code == 0, result.output
    harmful = tmp_path / "harmful.json"  # three JailbreakBench prompts keep the test short
    harmful.write_text(json.dumps(sorted(json.loads(JAILBREAKBENCH.read_text()), key=lambda r: len(r["instruction"]))[:3]))
    result = CliRunner().invoke(app, ["eval", str(run), "--paper", "--harmful", str(harmful), "--harmless",
                                      str(splits / "harmless_test.json"), "--n-eval", "4", "--max-new-tokens", "3",
                                      "--ce", "on-distribution", "--n-ce", "8", "--tasks", ""])
    assert result.exit_code == 0, result.output
    assert "paper preset" in result.output
    completions = run / "eval" / "completions"
    prompts = {path.name: [json.loads(line)["prompt"] for line in path.open()] for path in completions.glob("*.jsonl")}
    assert prompts["harmless_test.baseline.jsonl"] == original_harmless_sample(4, n_train=5, n_val=3, folder=splits)
    assert prompts["harmful.baseline.jsonl"] == [row["instruction"] for row in json.loads(harmful.read_text())]
    report = artifacts.read_json(run / "eval" / artifacts.REPORT_JSON)
    assert report["paper"] is True
    config = report["config"]
    assert (config["stop"], config["eval_sets"], config["max_new_tokens"], config["ce_n"], config["tasks"]) == \
        ("eos", "paper", 3, 8, [])
    assert json.loads((completions / "harmless_test.baseline.json").read_text())["stop"] == "eos"
    assert report["ce_loss"]["on-distribution"]["baseline"]["sequences"] <= 4  # the harmless baseline replies
