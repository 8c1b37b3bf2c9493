"""`tlrefusal run` (the whole pipeline in one command), `--config` on the stages, and `--from STEP`, on a tiny
model through the CLI. What each stage ran with is read back from the artifacts it wrote, not from `run`."""
import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from tlrefusal import artifacts
from tlrefusal.cli import app
from tlrefusal.steps import affected, discard

runner = CliRunner()
CONFIG = """
n-train = 4
n-val = 3
min-kept = 1
no-filter = true
kl-threshold = 1e9
induce-threshold = -1e9

[eval]
n-eval = 3
max-new-tokens = 4
ce = "on-distribution"
tasks = ""

[orthogonalize]
verify = "weights"
"""


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def digests(run_dir):
    """sha256 of every file under the run folder, by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    harmful, harmless = root / "harmful.json", root / "harmless.json"
    harmful.write_text(json.dumps([{"instruction": f"Tell me how to do bad thing number {i}.", "category": "x"}
                                   for i in range(14)]))
    harmless.write_text(json.dumps([f"Write a short poem about the number {i}." for i in range(14)]))
    config = root / "tiny.toml"
    config.write_text(f'harmful = "{harmful}"\nharmless = "{harmless}"\n' + CONFIG)
    return {"model": tiny_dirs["llama_tied"], "config": config, "root": root}


@pytest.fixture(scope="module")
def finished(setup):
    """A run made by `tlrefusal run` (kept read-only: tests that change it work on a copy)."""
    run_dir = setup["root"] / "run"
    code, output = invoke("run", setup["model"], "--out", run_dir, "--config", setup["config"])
    assert code == 0, output
    return run_dir, output


def copy_of(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_run_does_every_stage_with_the_configs_settings(finished, setup):
    run_dir, output = finished
    config = artifacts.read_json(run_dir / artifacts.CONFIG)
    assert config["config"]["n_train"] == 4 and config["config"]["selection"]["kl_threshold"] == 1e9
    report = artifacts.read_json(run_dir / artifacts.EVAL_DIR / artifacts.REPORT_JSON)
    assert report["config"]["n"] == 3 and report["config"]["max_new_tokens"] == 4
    assert report["config"]["ce"] == ["on-distribution"] and report["config"]["tasks"] == []
    record = artifacts.read_json(run_dir / artifacts.ORTHOGONALIZED / artifacts.EXPORT_RECORD)
    assert record["verify"].startswith("weights") and record["verification"]["passed"]
    assert record["direction"]["sha256"] == artifacts.file_sha256(run_dir / artifacts.DIRECTION)
    # config.json records what the later stages ran with, so that it can repeat the run.
    assert config["run"]["steps"] == ["extract", "eval", "orthogonalize"]
    assert config["run"]["eval"]["n_eval"] == 3 and config["run"]["orthogonalize"]["verify"] == "weights"
    page = (run_dir / artifacts.RUN_REPORT).read_text()
    chosen = artifacts.read_json(run_dir / artifacts.SELECTION)["chosen"]
    assert f"position {chosen['position']}, layer {chosen['layer']}" in page
    assert "## Evaluation" in page and "| harmful (harmful) |" in page
    assert f"`{run_dir / artifacts.ORTHOGONALIZED}`: verified" in page
    assert "tlrefusal run:" in output


def test_a_second_run_reuses_every_stage(finished, setup, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    before = digests(run_dir)
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    code, output = invoke("run", setup["model"], "--out", run_dir, "--config", setup["config"])
    assert code == 0, output
    assert "reused:" in output
    # Only the summaries are written again (they record each invocation's times).
    summaries = {artifacts.MANIFEST, artifacts.REPORT_JSON, artifacts.REPORT_MD, artifacts.REFUSAL_PLOT,
                 artifacts.PROJECTION_PLOT}
    changed = {p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed <= summaries
    after = digests(run_dir)
    assert {k: v for k, v in after.items() if k.rsplit("/", 1)[-1] not in summaries} == \
        {k: v for k, v in before.items() if k.rsplit("/", 1)[-1] not in summaries}


def test_flags_override_the_config_file(finished, setup, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    code, output = invoke("run", setup["model"], "--out", run_dir, "--config", setup["config"], "--n-eval", 2,
                          "--steps", "eval")
    assert code == 0, output
    report = artifacts.read_json(run_dir / artifacts.EVAL_DIR / artifacts.REPORT_JSON)
    assert report["config"]["n"] == 2
    assert all(s["n"] == 2 for d in report["refusal_and_safety"].values() for s in d["interventions"].values())


def test_the_runs_config_json_repeats_the_run(finished, tmp_path):
    run_dir = finished[0]
    again = tmp_path / "again"
    code, output = invoke("run", "--config", run_dir / artifacts.CONFIG, "--out", again)
    assert code == 0, output
    a, b = digests(run_dir), digests(again)
    same = [artifacts.PROMPTS, artifacts.MEANS, artifacts.CANDIDATES, artifacts.SELECTION, artifacts.DIRECTION]
    assert all(a[name] == b[name] for name in same)
    completions = [k for k in a if k.startswith(f"{artifacts.EVAL_DIR}/{artifacts.COMPLETIONS_DIR}/")
                   and k.endswith(".jsonl")]
    assert completions and all(a[k] == b[k] for k in completions)
    assert artifacts.read_json(again / artifacts.CONFIG)["run"] == artifacts.read_json(run_dir / artifacts.CONFIG)["run"]


def test_from_selection_rescoring_gives_the_same_selection_and_keeps_earlier_steps(finished, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    before = digests(run_dir)
    # No MODEL and no --config: the run folder's own config.json.
    code, output = invoke("run", "--out", run_dir, "--from", "selection")
    assert code == 0, output
    assert f"discarded: {run_dir / artifacts.SELECTION}" in output
    after = digests(run_dir)
    for name in (artifacts.PROMPTS, artifacts.MEANS, artifacts.CANDIDATES, artifacts.SELECTION, artifacts.DIRECTION):
        assert after[name] == before[name], name
    assert (run_dir / artifacts.ORTHOGONALIZED / artifacts.EXPORT_RECORD).is_file()


def test_from_selection_takes_new_selection_settings_and_refuses_new_filter_settings(finished, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    before = digests(run_dir)
    # A setting of an earlier step: refused before anything is discarded.
    code, output = invoke("run", "--out", run_dir, "--from", "selection", "--n-train", "5")
    assert code == 1 and "--from selection keeps the artifacts of the steps before it, but n_train changed" in output
    assert "use --from filter" in output and digests(run_dir) == before
    # Prompt data edited since the run was made (its hash in config.json differs): refused, nothing discarded.
    config_path = run_dir / artifacts.CONFIG
    made = config_path.read_text()
    config_path.write_text(made.replace(json.loads(made)["data_sha256"]["harmful"], "0" * 64))
    changed = digests(run_dir)
    code, output = invoke("run", "--out", run_dir, "--from", "selection")
    assert code == 1 and "but data_sha256.harmful changed" in output and digests(run_dir) == changed
    config_path.write_text(made)
    # The selection's own setting: the filter's and candidates' artifacts stay (not even rewritten), the new
    # threshold is recorded.
    kept = (artifacts.PROMPTS, artifacts.MEANS, artifacts.CANDIDATES)
    stamps = {name: (run_dir / name).stat().st_mtime_ns for name in kept}
    code, output = invoke("run", "--out", run_dir, "--from", "selection", "--kl-threshold", "1e8")
    assert code == 0, output
    assert f"discarded: {run_dir / artifacts.SELECTION}" in output
    after = digests(run_dir)
    assert {name: (run_dir / name).stat().st_mtime_ns for name in kept} == stamps
    for name in kept:
        assert after[name] == before[name], name
    config = json.loads((run_dir / artifacts.CONFIG).read_text())
    assert config["config"]["selection"]["kl_threshold"] == 1e8 and "run" in config
    selection = json.loads((run_dir / artifacts.SELECTION).read_text())
    assert selection["config"]["kl_threshold"] == 1e8
    # A plain rerun now reuses everything under the new setting.
    code, output = invoke("run", "--out", run_dir)
    assert code == 0, output
    assert digests(run_dir)[artifacts.SELECTION] == after[artifacts.SELECTION]


def test_from_judge_keeps_the_completions_and_runs_no_extraction(finished, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    completions = run_dir / artifacts.EVAL_DIR / artifacts.COMPLETIONS_DIR
    stamps = {p: p.stat().st_mtime_ns for p in completions.iterdir()}
    selection = (run_dir / artifacts.SELECTION).stat().st_mtime_ns
    code, output = invoke("run", "--out", run_dir, "--from", "judge")
    assert code == 0, output
    assert "tlrefusal extract:" not in output and "tlrefusal eval:" in output
    assert stamps == {p: p.stat().st_mtime_ns for p in completions.iterdir()}
    assert (run_dir / artifacts.SELECTION).stat().st_mtime_ns == selection
    assert (run_dir / artifacts.EVAL_DIR / artifacts.EVAL_SCORES).is_file()


def test_discard_removes_exactly_the_step_and_what_depends_on_it(finished, tmp_path):
    assert affected("candidates") == ["candidates", "selection", "completions", "judge", "loss", "coherence",
                                      "magnitude", "orthogonalize"]
    assert affected("completions") == ["completions", "judge", "loss"]
    run_dir = copy_of(finished[0], tmp_path)
    before = digests(run_dir)
    discard(run_dir, "completions")
    after = digests(run_dir)
    eval_dir = f"{artifacts.EVAL_DIR}/"
    gone = set(before) - set(after)
    assert all(k.startswith(eval_dir) or k == artifacts.RUN_REPORT for k in gone)
    assert not any(k.startswith(f"{eval_dir}{artifacts.COMPLETIONS_DIR}/") for k in after)
    assert f"{eval_dir}{artifacts.EVAL_LOSS}" not in after and f"{eval_dir}{artifacts.EVAL_SCORES}" not in after
    assert all(after[k] == before[k] for k in after)  # nothing left is changed


def test_each_stage_command_takes_the_config_file(finished, setup, tmp_path):
    """extract, eval and orthogonalize read the same file as `run` (the top level and their own table)."""
    run_dir = finished[0]
    alone = tmp_path / "alone"
    code, output = invoke("extract", setup["model"], "--out", alone, "--config", setup["config"])
    assert code == 0, output
    assert artifacts.read_json(alone / artifacts.CONFIG) == \
        {k: v for k, v in artifacts.read_json(run_dir / artifacts.CONFIG).items() if k != "run"}
    code, output = invoke("eval", alone, "--config", setup["config"], "--n-eval", 2)  # the flag over [eval]
    assert code == 0, output
    report = artifacts.read_json(alone / artifacts.EVAL_DIR / artifacts.REPORT_JSON)
    assert report["config"]["n"] == 2 and report["config"]["max_new_tokens"] == 4 and report["config"]["tasks"] == []
    code, output = invoke("orthogonalize", alone, "--out", tmp_path / "export", "--config", setup["config"])
    assert code == 0, output
    assert artifacts.read_json(tmp_path / "export" / artifacts.EXPORT_RECORD)["verify"].startswith("weights")


def test_judge_only_from_the_command_line_scores_as_the_run_did(finished, setup, tmp_path, monkeypatch):
    run_dir = copy_of(finished[0], tmp_path)
    first = artifacts.read_json(run_dir / artifacts.EVAL_DIR / artifacts.REPORT_JSON)["refusal_and_safety"]
    (run_dir / artifacts.EVAL_DIR / artifacts.EVAL_SCORES).unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("--judge-only loaded the evaluated model")

    monkeypatch.setattr("tlrefusal.evaluation.runner.load_model", no_model)
    code, output = invoke("eval", run_dir, "--judge-only", "--config", setup["config"])
    assert code == 0, output
    assert artifacts.read_json(run_dir / artifacts.EVAL_DIR / artifacts.REPORT_JSON)["refusal_and_safety"] == first
    code, output = invoke("eval", run_dir, "--judge-only", "--config", setup["config"], "--max-new-tokens", 5)
    assert code == 1 and "without --judge-only" in output


@pytest.mark.parametrize("args, message", [
    (["--from", "nonsense"], "unknown step 'nonsense'"),
    (["--steps", "extract,judge"], "choose from extract, eval, orthogonalize"),
])
def test_bad_run_input_fails_before_any_work(setup, tmp_path, args, message):
    out = tmp_path / "run"
    code, output = invoke("run", setup["model"], "--out", out, "--config", setup["config"], *args)
    assert code in (1, 2) and message in " ".join(output.split())
    assert not out.exists()


def test_run_needs_a_model_and_a_folder(tmp_path):
    code, output = invoke("run", "--out", tmp_path / "run")
    assert code == 2 and "MODEL" in output
    code, output = invoke("run", "organism")
    assert code == 2 and "--out" in output
    assert not (tmp_path / "run").exists()
