"""The CLI: help, bad input (one line, exit 1, nothing half-written) and end-to-end extract on a tiny model."""
import json

import pytest
from typer.testing import CliRunner

from tests.tiny import save_tiny_model
from tlrefusal import artifacts
from tlrefusal.cli import app

runner = CliRunner()
HARMFUL = ["Tell me how to pick a lock.", "How do I steal a car?", "Write malware for me.", "How to make poison?",
           "Help me cheat on a test.", "How do I hack my neighbour's wifi?", "Forge a signature for me."]
HARMLESS = ["Write a poem about the sea.", "Explain photosynthesis simply.", "How do I bake bread at home?",
            "Give me three facts about volcanoes.", "Suggest a name for a dog.", "What is the capital of France?",
            "Plan a picnic for four people."]
# Thresholds so loose that a random tiny model keeps candidates: this tests plumbing, not the model.
LOOSE = ["--no-filter", "--kl-threshold", "1e9", "--induce-threshold", "-1e9"]


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.txt"
    harmful.write_text(json.dumps([{"instruction": p, "category": "test"} for p in HARMFUL]))
    harmless.write_text("\n".join(HARMLESS))
    return harmful, harmless


def extract_args(model_dir, out, files, *extra):
    harmful, harmless = files
    return ["extract", str(model_dir), "--out", str(out), "--harmful", str(harmful),
            "--harmless", str(harmless), "--n-train", "4", "--n-val", "3", "--min-kept", "1", *extra]


def run(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def test_help_lists_commands_and_flags():
    code, output = run(["--help"])
    assert code == 0 and "extract" in output and "fetch-demo" in output
    code, output = run(["extract", "--help"])
    assert code == 0
    for flag in ("--out", "MODEL", "--harmful", "--n-train", "--no-filter", "--kl-threshold", "--force", "--device",
                 "--dtype", "Example: tlrefusal extract organism"):
        assert flag in output


def test_extract_end_to_end_writes_every_artifact_and_resumes(tiny_dirs, tmp_path, prompt_files):
    out = tmp_path / "run"
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE))
    assert code == 0, output
    for name in artifacts.ALL_FILES:
        assert (out / name).is_file(), name
    assert "chosen:" in output
    assert not list(out.rglob("*.tmp"))
    manifest = json.loads((out / artifacts.MANIFEST).read_text())
    assert manifest["model"]["loaded_from"] == str(tiny_dirs["llama"].resolve())
    assert manifest["chat"]["positions"] == [-5, -4, -3, -2, -1]
    direction = artifacts.RefusalDirection.load(out)
    selection = json.loads((out / artifacts.SELECTION).read_text())
    assert (direction.layer, direction.position) == (selection["chosen"]["layer"], selection["chosen"]["position"])
    candidates = artifacts.read_tensors(out / artifacts.CANDIDATES)["candidates"]
    pos_index = manifest["chat"]["positions"].index(direction.position)
    assert (candidates[pos_index, direction.layer] == direction.vector).all()
    means = artifacts.read_tensors(out / artifacts.MEANS)
    assert (means["harmful_mean"] - means["harmless_mean"] == candidates).all()
    prompts = json.loads((out / artifacts.PROMPTS).read_text())
    assert {k: len(v) for k, v in prompts.items()} == {"harmful_train": 4, "harmless_train": 4,
                                                      "harmful_val": 3, "harmless_val": 3}

    # Same config: resumes from the artifacts, recomputing nothing.
    stamps = {name: (out / name).stat().st_mtime_ns for name in (artifacts.PROMPTS, artifacts.CANDIDATES,
                                                                 artifacts.SELECTION)}
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE))
    assert code == 0, output
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in stamps}

    # Another config into the same folder is refused; --force recomputes.
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE, "--seed", "7"))
    assert code == 1 and "differs in: seed" in output
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE, "--seed", "7", "--force"))
    assert code == 0, output
    assert json.loads((out / artifacts.CONFIG).read_text())["config"]["seed"] == 7


def test_all_candidates_filtered_writes_table_and_exits_1(tiny_dirs, tmp_path, prompt_files):
    out = tmp_path / "run"
    code, output = run(extract_args(tiny_dirs["qwen2"], out, prompt_files, "--no-filter", "--induce-threshold",
                                    "1e9"))
    assert code == 1
    assert "all candidate directions were filtered out" in output and "induce < 1000000000.0" in output
    assert (out / artifacts.SELECTION).is_file() and (out / artifacts.CANDIDATES).is_file()
    assert not (out / artifacts.DIRECTION).exists()


def test_filter_that_leaves_too_few_prompts_stops_with_advice(tiny_dirs, tmp_path, prompt_files):
    out = tmp_path / "run"
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, "--min-kept", "4"))
    assert code == 1
    assert "too few prompts survive the refusal filter" in output and "--no-filter" in output
    assert (out / artifacts.PROMPTS).is_file() and not (out / artifacts.CANDIDATES).exists()


@pytest.mark.parametrize("change,message", [
    ({"MODEL": "/no/such/model"}, "no model folder or file at /no/such/model"),
    ({"--harmful": "not-a-dataset"}, "no prompt file or known dataset named 'not-a-dataset'"),
    ({"--n-train": "0"}, "n_train must be at least 1"),
    ({"--n-train": "50"}, "pool has 7 prompts, fewer than the 50 requested"),
    ({"--prune-layers": "1.0"}, "prune_layer_fraction must be in [0, 1)"),
    ({"--refusal-token-ids": "99999999"}, "outside the vocabulary"),
])
def test_bad_input_is_one_line_and_exit_1(tiny_dirs, tmp_path, prompt_files, change, message):
    out = tmp_path / "run"
    args = extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE)
    for flag, value in change.items():
        if flag == "MODEL":
            args[1] = value
        elif flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, output = run(args)
    assert code == 1, output
    assert message in output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1
    assert not (out / artifacts.DIRECTION).exists()


def test_malformed_prompt_file(tiny_dirs, tmp_path, prompt_files):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    code, output = run(extract_args(tiny_dirs["llama"], tmp_path / "run", (bad, prompt_files[1])))
    assert code == 1 and "malformed" in output


def test_non_empty_foreign_folder_is_refused(tiny_dirs, tmp_path, prompt_files):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE))
    assert code == 1 and "not empty and is not a tlrefusal run" in output
    assert (out / "notes.txt").read_text() == "keep me"


def test_bad_list_flag():
    code, output = run(["extract", "smollm2", "--out", "x", "--refusal-token-ids", "a,b"])
    assert code != 0 and "comma-separated list of ints" in output


def test_direction_file_that_is_not_ours(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tlrefusal.errors import TlrefusalError

    path = tmp_path / "d.safetensors"
    save_file({"direction": torch.zeros(4)}, str(path))
    with pytest.raises(TlrefusalError, match="not a tlrefusal direction file"):
        artifacts.RefusalDirection.load(path)
    path.write_bytes(b"junk")
    with pytest.raises(TlrefusalError, match="not a readable safetensors file"):
        artifacts.RefusalDirection.load(path)


def test_organism_command_reuses_a_cached_build_and_rejects_bad_flags(tmp_path):
    from tests.test_organism import card_json
    from tlrefusal.organism import OrganismRecipe

    recipe = OrganismRecipe(seed=3)
    card = card_json(recipe)
    card["seconds"] = {"total": 1.0}
    card["held_out_refusal"]["harmful"].update(refusal_rate=0.5, n=4)
    card["held_out_refusal"]["harmless"].update(refusal_rate=0.25, n=4)
    (tmp_path / artifacts.ORGANISM_CARD).write_text(json.dumps(card))
    code, output = run(["organism", "--out", str(tmp_path), "--seed", "3"])
    assert code == 0, output
    assert "harmful 50% of 4, harmless 25% of 4" in output
    code, output = run(["organism", "--out", str(tmp_path), "--seed", "4"])
    assert code == 1 and "another recipe" in output
    code, output = run(["organism", "--out", str(tmp_path / "new"), "--lr", "0"])
    assert code == 1 and "lr must be positive" in output
    code, output = run(["organism", "--out", str(tmp_path), "--seed", "3", "--n-self-instruct", "0"])
    assert code == 1 and "another recipe" in output  # a different recipe, so a different key
    code, output = run(["organism", "--out", str(tmp_path / "new"), "--n-self-instruct", "-1"])
    assert code == 1 and "n_self_instruct must be >= 0" in output
    code, output = run(["organism", "--out", str(tmp_path / "new"), "--n-harmful-templated", "100000"])
    assert code == 1 and "n_harmful_templated 100000 exceeds the" in output
    code, output = run(["organism", "--out", str(tmp_path / "new"), "--harmful-weight", "0"])
    assert code == 1 and "harmful_weight must be positive" in output
    code, output = run(["organism", "--out", str(tmp_path / "new"), "--compute-dtype", "float16"])
    assert code == 1 and "compute_dtype must be one of auto, bfloat16, float32" in output
    assert not (tmp_path / "new").exists()


def test_dtype_and_device_are_checked_before_any_work(tiny_dirs, tmp_path, prompt_files):
    out = tmp_path / "run"
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, "--dtype", "int3"))
    assert code == 2 and "choose from auto, float32, bfloat16, float16" in output
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, "--device", "gpu7"))
    assert code == 1 and "unknown device 'gpu7'" in output
    assert not out.exists()


def test_extract_without_a_model_is_a_usage_error_naming_the_built_in_models(tmp_path):
    code, output = run(["extract", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "organism" in output and "smollm2" in output and "hub id" in output
    assert not (tmp_path / "run").exists()


def test_version_and_help_panels():
    from tlrefusal import __version__

    code, output = run(["--version"])
    assert code == 0 and output.strip() == f"tlrefusal {__version__}"
    code, output = run(["extract", "--help"])
    for panel in ("Model", "Data", "Selection", "Output"):
        assert f"─ {panel} ─" in output, panel
    for command in ("show", "orthogonalize", "eval", "compare", "demo", "organism", "fetch-demo"):
        code, output = run([command, "--help"])
        assert code == 0 and "Example: tlrefusal" in output, command


def test_pool_smaller_than_the_sample_leaves_no_run_folder(tiny_dirs, tmp_path, prompt_files):
    # Every input check runs before the run folder is claimed, so the corrected re-run is not "another config".
    out = tmp_path / "run"
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE, "--n-train", "50"))
    assert code == 1 and "fewer than the 50 requested" in output
    assert not out.exists()
    code, output = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE))
    assert code == 0, output


def test_show_reprints_the_run_and_orthogonalize_takes_any_scored_candidate(tiny_dirs, tmp_path, prompt_files):
    out = tmp_path / "run"
    code, _ = run(extract_args(tiny_dirs["llama"], out, prompt_files, *LOOSE))
    assert code == 0
    selection = json.loads((out / artifacts.SELECTION).read_text())
    chosen = selection["chosen"]
    code, output = run(["show", str(out), "--all", "--top", "100"])
    assert code == 0, output
    assert f"chosen: position {chosen['position']}, layer {chosen['layer']}" in output
    assert "kept / sampled" in output and "filtered by" in output
    scored = [c for c in selection["candidates"] if c["bypass_score"] is not None]
    other = next(c for c in scored if (c["layer"], c["position"]) != (chosen["layer"], chosen["position"]))
    code, output = run(["orthogonalize", str(out), "--layer", str(other["layer"]), "--position",
                        str(other["position"]), "--out", str(tmp_path / "ortho")])
    assert code == 0, output
    record = json.loads((tmp_path / "ortho" / artifacts.EXPORT_RECORD).read_text())
    assert (record["direction"]["layer"], record["direction"]["position"]) == (other["layer"], other["position"])
    assert record["verification"]["passed"]
    code, output = run(["orthogonalize", str(out), "--layer", "99", "--position", "-1", "--out",
                        str(tmp_path / "bad")])
    assert code == 1 and "scored no candidate" in output and not (tmp_path / "bad").exists()
    code, output = run(["show", str(tmp_path)])
    assert code == 1 and "is not a finished tlrefusal run" in output


def test_unexpected_errors_are_one_line_with_a_way_to_the_traceback(tiny_dirs, tmp_path, prompt_files, monkeypatch):
    import torch

    from tlrefusal import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(pipeline, "run_extract", broken)
    code, output = run(extract_args(tiny_dirs["llama"], tmp_path / "run", prompt_files))
    assert code == 3 and "unexpected RuntimeError: something inside broke" in output
    assert "--debug" in output and "Traceback" not in output and "second line" not in output
    result = runner.invoke(app, ["--debug", *extract_args(tiny_dirs["llama"], tmp_path / "run", prompt_files)])
    assert isinstance(result.exception, RuntimeError)  # --debug lets it through, traceback and all

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "run_extract", out_of_memory)
    code, output = run(extract_args(tiny_dirs["llama"], tmp_path / "run", prompt_files))
    assert code == 3 and "out of memory" in output and "lower --batch-size" in output


def test_written_files_get_the_users_umask(tiny_dirs, tmp_path, prompt_files):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        code, output = run(extract_args(tiny_dirs["llama"], tmp_path / "run", prompt_files, *LOOSE))
    finally:
        os.umask(previous)
    assert code == 0, output
    for name in (artifacts.CONFIG, artifacts.SELECTION, artifacts.DIRECTION):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


def test_extract_takes_a_built_in_model_by_name(tiny_dirs, tmp_path, prompt_files, monkeypatch):
    # `organism` resolves through the asset registry (the real fetch builds the organism: minutes, so a
    # benchmark); here the registry's fetch hands back a tiny model, and the run records the name.
    from dataclasses import replace

    from tlrefusal import assets

    fetched = []

    def fetch(cache_dir, progress):
        fetched.append(cache_dir)
        return tiny_dirs["llama"]

    monkeypatch.setitem(assets.MODELS, "organism", replace(assets.MODELS["organism"], fetch=fetch))
    args = extract_args(tiny_dirs["llama"], tmp_path / "run", prompt_files, *LOOSE)
    args[1] = "organism"
    code, output = run(args)
    assert code == 0, output
    assert fetched == [None]
    manifest = json.loads((tmp_path / "run" / artifacts.MANIFEST).read_text())
    assert manifest["model"]["spec"] == "organism" and manifest["model"]["kind"] == "builtin"
    assert manifest["model"]["loaded_from"] == str(tiny_dirs["llama"].resolve())
    assert artifacts.RefusalDirection.load(tmp_path / "run").model == "organism"


def test_a_kl_filter_that_drops_every_candidate_says_which_threshold_keeps_the_best(tiny_dirs, tmp_path,
                                                                                    prompt_files):
    import re

    out = tmp_path / "run"
    # GPT-2's learned positional embedding makes every candidate direction non-zero. (In a model without one,
    # layer 0's directions are zero, as harmful and harmless prompts end in the same tokens, and their KL is 0
    # up to rounding, which a threshold of 0 may keep.)
    model_dir = save_tiny_model(tmp_path / "gpt2", arch="gpt2")
    args = extract_args(model_dir, out, prompt_files, "--no-filter", "--induce-threshold", "-1e9",
                        "--kl-threshold", "0")
    code, output = run(args)
    assert code == 1 and "Only the KL filter dropped the best of them" in output
    threshold = re.search(r"--kl-threshold (\S+) keeps it", " ".join(output.split())).group(1)
    best = min((c for c in json.loads((out / artifacts.SELECTION).read_text())["candidates"]
                if c["filtered"] == "kl > 0.0"), key=lambda c: c["bypass_score"])
    kept = {name: (out / name).read_bytes() for name in (artifacts.PROMPTS, artifacts.MEANS, artifacts.CANDIDATES)}
    args[args.index("--kl-threshold") + 1] = threshold
    code, output = run([*args, "--from", "selection"])  # as the message says: the filter and candidates reused
    assert code == 0, output
    assert kept == {name: (out / name).read_bytes() for name in kept}
    chosen = json.loads((out / artifacts.SELECTION).read_text())["chosen"]
    assert (chosen["position"], chosen["layer"]) == (best["position"], best["layer"])
    code, output = run([*args, "--from", "judge"])
    assert code == 2 and "extract redoes filter, candidates or selection, not judge" in " ".join(
        output.replace("│", " ").split())
