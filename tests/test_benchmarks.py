"""Smoke runs of the benchmarks on tiny inputs: they run end to end, and the numbers they report agree with a
recomputation here from what they wrote (per-candidate scores, files on disk) and with the paper's rules.

The full benchmarks (paper sizes, the demo model, the organism build) are not CI tests; see
benchmarks/README.md. The benchmarks that read the paper's splits get the paper's data folder as a flag
(`--paper-data`); the tests pass the one beside the checkout and skip when it is not there.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
PAPER_DATA = SHARED / "data"


def paper_data_flag() -> list[str]:
    """`--paper-data DIR` for the folder beside the checkout; skip the test when it is not there."""
    if not (PAPER_DATA / "datasets" / "splits").is_dir():
        pytest.skip(f"the paper's data folder {PAPER_DATA} is not here")
    return ["--paper-data", str(PAPER_DATA)]


def test_paper_data_dir_is_the_flag_else_the_environment_else_a_one_line_error(tmp_path, monkeypatch):
    from paper_data import ENV, paper_data_dir, splits_dir

    flag, env = tmp_path / "flag", tmp_path / "env"
    for folder in (flag, env):
        (folder / "datasets" / "splits").mkdir(parents=True)
    monkeypatch.setenv(ENV, str(env))
    assert paper_data_dir(str(flag)) == flag
    assert paper_data_dir(None) == env
    assert splits_dir(None) == env / "datasets" / "splits"
    monkeypatch.delenv(ENV)
    with pytest.raises(SystemExit) as missing:
        paper_data_dir(None)
    message = str(missing.value)
    assert "\n" not in message and "--paper-data" in message and ENV in message
    with pytest.raises(SystemExit) as wrong:  # a folder without the splits is named in the error
        paper_data_dir(str(tmp_path))
    assert str(tmp_path) in str(wrong.value) and "datasets/splits" in str(wrong.value)


def test_bench_extract_without_the_paper_data_stops_before_any_work(tiny_dirs, tmp_path, monkeypatch):
    import bench_extract
    from paper_data import ENV

    monkeypatch.delenv(ENV, raising=False)
    out = tmp_path / "extract.json"
    with pytest.raises(SystemExit, match="--paper-data"):
        bench_extract.main(["--model", str(tiny_dirs["llama"]), "--out", str(out)])
    assert not out.exists()


def test_bench_nnsight_reads_the_activation_addition_signs_from_the_intervention_table():
    pytest.importorskip("nnsight", reason="the bench extra is not installed")
    import bench_nnsight

    from tlrefusal.interventions import intervention_table

    r = torch.randn(8)
    # The paper's signs: -r on harmful prompts (a jailbreak), +r on harmless ones; "plus" adds +r on both.
    for sign, coeffs in (("paper", {"harmful": -1.0, "harmless": 1.0}), ("plus", {"harmful": 1.0, "harmless": 1.0})):
        table = intervention_table(r, 1, 4, actadd_sign=sign)
        for label, coeff in coeffs.items():
            setup = bench_nnsight._reference_setup(table.by_kind(label, "actadd"), r, 1)
            assert setup == {"add": r, "layer": 1, "coeff": coeff}
            assert bench_nnsight._reference_setup(table.by_kind(label, "ablation"), r, 1) == {"ablate": r}
            assert bench_nnsight._reference_setup(table.by_kind(label, "baseline"), r, 1) == {}


# SPEC 2: post-instruction token count and refusal token ids of the paper's five families.
SPEC_FORMATS = {"qwen": ("qwen", 5, [40, 2121]), "gemma": ("gemma", 5, [235285]), "llama3": ("llama", 5, [40]),
                "yi": ("llama", 6, [59597]), "llama2": ("llama", 6, [306])}


@pytest.mark.parametrize("family", sorted(SPEC_FORMATS))
def test_nnsight_reference_formats_the_paper_families_as_spec_section_2_and_as_tlrefusal(family):
    """The benchmark's independent chat format on the families' real tokenizers and real chat-template texts:
    SPEC 2's post-instruction counts and refusal ids, and the same prompt tokens as tlrefusal's ChatFormat."""
    from reference_steps import ReplicationChat

    from tests.test_paper_templates import REAL_TEMPLATES, chat_tokenizer, real_chat

    tokenizer = chat_tokenizer(family)
    tokenizer.chat_template = REAL_TEMPLATES[family]
    model_type, n_eoi, refusal_ids = SPEC_FORMATS[family]
    reference = ReplicationChat(tokenizer)
    assert (len(reference.eoi_ids), reference.refusal_ids(model_type)) == (n_eoi, refusal_ids)
    assert reference.render("x").endswith(("\n", " "))  # the replication's trailing-space rule
    ours = real_chat(family)
    assert list(ours.eoi_ids) == reference.eoi_ids and ours.positions == reference.positions
    for prompt in ("Write a poem about the sea.", "Hi"):
        assert ours.prompt_ids(prompt) == reference.prompt_ids(prompt)


def test_nnsight_reference_math_is_the_papers_formulas():
    """The reference side's scores and rejection, against numbers worked out by hand."""
    from reference_steps import (
        Score,
        is_refusal,
        kl_base_to_new,
        paper_choice,
        refusal_log_odds,
        reject,
        unit_of,
    )

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    # P_ref = 0.25 + 0.25: log-odds log(0.5 + 1e-8) - log(0.5 + 1e-8) = 0; P_ref = 0.25: log(1/3).
    assert refusal_log_odds(logits, [1, 2]).item() == pytest.approx(0.0, abs=1e-12)
    assert refusal_log_odds(logits, [1]).item() == pytest.approx(math.log((0.25 + 1e-8) / (0.75 + 1e-8)))
    other = torch.log(torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64))
    # KL(P_base || P_new) = 0.5 log(0.5/0.25) + 0.25 log(0.25/0.5) (+ eps), not the reverse.
    assert kl_base_to_new(logits, other).item() == pytest.approx(0.25 * math.log(2), abs=1e-5)
    x, r = torch.tensor([[3.0, 4.0]]), torch.tensor([2.0, 0.0])
    assert torch.allclose(reject(x, unit_of(r)).double(), torch.tensor([[0.0, 4.0]], dtype=torch.float64), atol=1e-7)
    assert is_refusal("well, i CAN'T do that") and not is_refusal("Sure, here it is")
    nan = float("nan")
    scores = [Score(-1, 0, -2.0, 0.5, 0.05), Score(-1, 1, -3.0, -0.1, 0.05), Score(-1, 2, -4.0, 0.5, 0.2),
              Score(-2, 0, -1.0, 0.5, 0.05), Score(-2, 3, -9.0, 0.5, 0.0), Score(-2, 1, nan, 0.5, 0.0)]
    assert paper_choice(scores, n_layers=4, prune=0.2) == scores[0]  # layer 3 >= int(4 * 0.8) is pruned


def test_bench_nnsight_smoke(tiny_dirs, tmp_path):
    pytest.importorskip("nnsight", reason="the bench extra is not installed")
    import bench_nnsight

    out = tmp_path / "nnsight.json"
    report = bench_nnsight.main(paper_data_flag() + ["--model", str(tiny_dirs["llama"]), "--n-train", "4", "--n-val", "2",
                                 "--prune", "0.5", "--repeats", "1", "--gen-prompts", "2", "--gen-tokens", "3",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # The independent side finds the same post-instruction tokens (the tiny model's ChatML template: 5) and
    # refusal tokens (a llama config: 'I' alone).
    fmt = report["fidelity"]["format"]
    assert fmt["same"] and len(fmt["eoi_ids"]["reference"]) == 5 and len(fmt["refusal_ids"]["reference"]) == 1
    for name in ("nnsight", "plain torch"):  # same candidate directions on all three sides
        assert report["fidelity"]["candidates"][name]["max_abs_diff"] < 1e-5
    selection = report["selection"]
    assert selection["candidates_scored"] == 5 * 2  # 5 positions x layers 0-1 of 4
    # Every score of each side, candidate by candidate: the reported differences are recomputed here.
    ours, theirs = ({(s["position"], s["layer"]): s for s in selection["scores"][name]} for name in
                    ("tlrefusal", "nnsight"))
    assert set(ours) == set(theirs) == {(p, layer) for p in range(-5, 0) for layer in (0, 1)}
    for key, reported in selection["max_abs_score_diff"].items():
        assert reported == max(abs(ours[c][key] - theirs[c][key]) for c in ours) and reported < 1e-3
    # The choice of each side is the paper's rule applied here to its scores (layer < int(4 * 0.5) holds).
    for name, scores in (("tlrefusal", ours), ("nnsight", theirs)):
        kept = [s for s in scores.values() if s["kl_score"] <= 0.1 and s["induce_score"] >= 0.0]
        best = min(kept, key=lambda s: s["bypass_score"], default=None)
        assert selection["chosen"][name] == (None if best is None else [best["position"], best["layer"]])
    assert selection["same_choice"] == (selection["chosen"]["tlrefusal"] == selection["chosen"]["nnsight"])
    assert selection["same_choice"]
    assert all(f["gflops_per_candidate"] > 0 for f in selection["flops"].values())
    generation = report["generation"]
    assert set(generation["interventions"]) == {"baseline", "ablation", "actadd"}
    for entry in generation["interventions"].values():  # greedy on a float32 model: the same tokens everywhere
        assert all(v["identical"] == 4 and v["differ"] == 0 for v in entry["vs_tlrefusal"].values())
        # The same replies, each side judging them with its own substring list: the same refusal rates.
        assert entry["refusal"]["nnsight"] == entry["refusal"]["plain torch"] == entry["refusal"]["tlrefusal"]


def test_bench_selection_smoke(tiny_dirs, tmp_path):
    """Candidates per pass: the same scores within 1e-5 whatever the grouping, and less padding with more
    candidates per pass (a length's rows batch together); the padding share recomputed here by hand."""
    import bench_selection

    out = tmp_path / "selection.json"
    report = bench_selection.main(paper_data_flag() + ["--model", str(tiny_dirs["llama"]), "--n-train", "4",
                                                       "--n-val", "3", "--layers", "1", "--per-pass-sweep", "1,3",
                                                       "--batch-size", "2", "--skip-growth", "--out", str(out)])
    assert json.loads(out.read_text())["per_pass"] == report["per_pass"]
    one, three = report["per_pass"]
    assert one["max_abs_score_diff_from_one_per_pass"] == 0.0
    assert three["max_abs_score_diff_from_one_per_pass"] < 1e-5
    assert 0.0 <= three["padding"] < one["padding"] < 1.0
    assert one["gflop_per_candidate"] > 0 and three["gflop_per_candidate"] < one["gflop_per_candidate"]

    class Chat:  # suffixes of lengths 3, 5 and 4 (each its own token) after a shared 2-token head
        def tokenize(self, prompts):
            return [[1, 2] + [int(p)] * int(p) for p in prompts]

    val = {"harmful": ["3"], "harmless": ["5", "4"]}
    # one per pass, batches of 2 rows sorted by length: ablation (3, 4) (5) -> padded 8 + 5 for 12 real tokens;
    # addition (4, 5) -> padded 10 for 9 real tokens
    assert bench_selection.padding_share(Chat(), val, 1, 2) == pytest.approx(1 - 21 / 23)


def test_bench_orthogonalize_smoke(tiny_dirs, tmp_path):
    import bench_orthogonalize

    out = tmp_path / "ortho.json"
    report = bench_orthogonalize.main(["--model", str(tiny_dirs["llama_tied"]), "--shard-size", "40KB",
                                       "--out", str(out)])
    rows = report["rows"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["shards"] for r in rows][0] == 1 and rows[1]["shards"] > 1
    # The sizes it reports, recomputed from the checkpoint's files: bytes on disk and the largest tensor.
    files = list(tiny_dirs["llama_tied"].glob("*.safetensors"))
    assert rows[0]["checkpoint_mb"] == pytest.approx(sum(f.stat().st_size for f in files) / 2**20)
    from safetensors import safe_open

    largest = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            largest = max([largest] + [handle.get_tensor(k).nbytes for k in handle.keys()])  # noqa: SIM118
    for row in rows:  # re-sharding moves tensors, never resizes them
        assert row["largest_tensor_mb"] == pytest.approx(largest / 2**20)
        assert row["streaming_rss_mb"] == pytest.approx(row["peak_rss_mb"] - row["baseline_rss_mb"])
        assert row["streaming_over_largest_tensor"] == pytest.approx(row["streaming_rss_mb"] / (largest / 2**20))


def test_bench_extract_smoke(tiny_dirs, tmp_path):
    import bench_extract

    out = tmp_path / "extract.json"
    report = bench_extract.main(paper_data_flag() + ["--model", str(tiny_dirs["llama"]), "--n-train", "4", "--n-val", "2",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # The tiny model: 4 layers, the ChatML template's 5 post-instruction tokens; the paper's layer filter
    # prunes layers >= int(4 * 0.8) = 3, so 5 x 3 candidates are scored.
    assert (report["n_layers"], report["n_positions"]) == (4, 5)
    assert (report["candidates_total"], report["candidates_scored"]) == (20, 15)
    counts = report["filter_counts"]
    assert sum(counts.values()) == 20 and counts["layer >= 3"] == 5
    assert (report["chosen"] is None) == ("kept" not in counts)
    # Prompt passes: 4 + 4 train; 2 harmless baseline, then per scored candidate 2 harmful + 2 x 2 harmless.
    passes = report["prompt_forward_passes"]
    assert (passes["candidates"], passes["selection"]) == (8, 2 + 15 * (2 + 2 * 2))
    for step, n in passes.items():  # both rounded to 2 decimals: seconds, and ms per pass
        ms, seconds = report["ms_per_prompt_pass"][step], report["seconds"][step]
        assert abs(ms * n / 1000 - seconds) <= 0.005 + 0.005 * n / 1000 + 1e-9


def test_bench_organism_smoke(tiny_dirs, tmp_path):
    import bench_organism

    out = tmp_path / "organism.json"
    recipe = ["base=" + str(tiny_dirs["llama"]), "n_harmful=4", "n_harmless=4", "n_self_instruct=3",
              "self_instruct_tokens=12", "target_tokens=2", "eval_n=2", "eval_tokens=2"]
    report = bench_organism.main([arg for item in recipe for arg in ("--set", item)] + [
        "--eval-n", "2", "--paper-n", "2", "--paper-n-harmless", "3", "--n-train", "4", "--n-val", "2", "--no-filter",
        "--out", str(out), *(["--paper-data", str(SHARED / "data")] if (SHARED / "data").is_dir() else [])])
    assert json.loads(out.read_text())["recipe_key"] == report["recipe_key"]
    assert report["build_seconds"] > 0 and report["recipe"]["n_harmful"] == 4
    assert report["organism_card"]["data"]["self_instructed"].startswith("3 sampled from the base model")
    assert {"harmful_refusal", "build_seconds", "candidate_survives_paper_filters"} <= set(report["checks"])
    from tests.conftest import SPLITS

    if SPLITS.is_dir():  # the paper's test splits: 2 harmful prompts, and the 3 harmless ones asked for
        paper = report["paper_test_refusal"]
        assert (paper["harmful"]["n"], paper["harmless"]["n"]) == (2, 3)
    # The organism's KL per layer, measured again outside selection on the same prompts, is the selection's
    # kl_score of each candidate at that position; the base model gets the same measurement.
    kl = report["kl_by_layer_at_chosen_position"]
    assert kl["position"] == (report["chosen"]["position"] if report["chosen"] else -1) and kl["n"] == 2
    n_layers = json.loads((tiny_dirs["llama"] / "config.json").read_text())["num_hidden_layers"]
    assert len(kl["selection"]) == len(kl["organism"]) == len(kl["base"]) == n_layers
    scored = [layer for layer, v in enumerate(kl["selection"]) if v is not None]  # the pruned layers are not
    assert scored
    assert [kl["organism"][i] for i in scored] == pytest.approx([kl["selection"][i] for i in scored], rel=1e-4,
                                                                 abs=1e-7)
    assert min(kl["base"]) >= 0
    # The paper's own choice (KL <= 0.1), with its interventions whenever there is one.
    assert (report["paper_chosen"] is None) == (report["paper_chosen_refusal"] is None)
    assert (report["paper_chosen"] is None) == (report["checks"]["candidate_survives_paper_filters"]["met"] is False)


def test_bench_organism_measures_on_a_sample_disjoint_from_the_used_ones_and_the_training_prompts():
    import random

    import bench_organism

    pool = [f"Prompt number {i}." for i in range(400)]
    used, rest = [], list(pool)
    for seed in (0, 1, 2):  # as written down: each used sample is drawn from what the earlier ones left
        used.append(set(random.Random(seed).sample(rest, 64)))
        rest = [p for p in rest if p not in used[-1]]
    got = bench_organism.unused_sample(pool, 64, seed=3, exclude=frozenset({"prompt number 7."}))
    assert len(got) == len(set(got)) == 64
    assert not set(got) & set().union(*used)
    assert got == random.Random(3).sample([p for p in rest if p != "Prompt number 7."], 64)


def test_bench_organism_candidate_reads_the_scored_position_and_layer(tmp_path):
    from types import SimpleNamespace

    import bench_organism

    from tlrefusal import artifacts

    # candidates.safetensors is [position, layer, d_model] over positions -3, -2, -1.
    candidates = torch.arange(3 * 4 * 5, dtype=torch.float64).reshape(3, 4, 5)
    artifacts.write_tensors(tmp_path / artifacts.CANDIDATES, {"candidates": candidates})
    got = bench_organism.candidate(tmp_path, SimpleNamespace(position=-1, layer=2), "tiny")
    assert (got.layer, got.position) == (2, -1) and torch.equal(got.vector, candidates[2, 2])
    got = bench_organism.candidate(tmp_path, SimpleNamespace(position=-3, layer=0), "tiny")
    assert (got.layer, got.position) == (0, -3) and torch.equal(got.vector, candidates[0, 0])
    assert torch.equal(bench_organism.candidates_at(tmp_path, -2), candidates[1])


def test_gpu_check_without_cuda_lists_every_check_as_not_run(tmp_path, monkeypatch, capsys):
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "gpu" and report["cuda"] is False and report["failed"] == {}
    assert set(report["checks"]) == set(gpu_check.CHECKS)
    # Nothing passes silently: every check says why it did not run, in the JSON and on the console.
    assert report["not_run"] == {name: "not run: no CUDA device" for name in gpu_check.CHECKS}
    printed = capsys.readouterr().out
    assert all(f"NOT RUN {name}: not run: no CUDA device" in printed for name in gpu_check.CHECKS)


def test_gpu_check_scales_the_papers_budget_by_peak_bfloat16_throughput():
    import gpu_check

    assert gpu_check.gpu_budget("NVIDIA H200")["seconds"] == pytest.approx(300 * 154.8 / 989.5)
    assert gpu_check.gpu_budget("NVIDIA H200 NVL")["seconds"] == pytest.approx(300 * 154.8 / 835.0)
    assert gpu_check.gpu_budget("NVIDIA RTX A6000")["seconds"] == pytest.approx(300)
    assert gpu_check.gpu_budget("Some Future GPU")["seconds"] is None
    assert gpu_check.extrapolate(3.0, 5.0, (2, 6), 32) == pytest.approx(3.0 + 0.5 * 30)


def test_gpu_check_cpu_smoke_runs_the_checks_code(tmp_path):
    """The GPU checks' code on the CPU with tiny shapes: placements agree bitwise, torchrun's run is
    byte-identical to one process's, and the extrapolations are the straight lines through what was measured."""
    import gpu_check

    out = tmp_path / "smoke.json"
    checks = ["bf16_device_map", "torchrun_two_ranks", "scale_8b"]
    assert gpu_check.main(["--cpu-smoke", "--out", str(out), *[a for c in checks for a in ("--only", c)]]) == 0
    report = json.loads(out.read_text())
    assert report["mode"].startswith("cpu smoke") and report["failed"] == {} and set(report["checks"]) == set(checks)
    placements = report["checks"]["bf16_device_map"]
    assert placements["status"] == "passed" and set(placements["max_abs_diff"].values()) == {0.0}
    torchrun = report["checks"]["torchrun_two_ranks"]
    assert torchrun["status"] == "passed" or torchrun["status"].startswith("not run: ")
    if torchrun["status"] == "passed":
        assert all(torchrun["byte_identical"].values()) and len(torchrun["byte_identical"]) == 5
    scale = report["checks"]["scale_8b"]
    assert scale["status"] == "measured" and scale["full_layers"] == 32
    depths = scale["depths"]
    for batch in gpu_check.SMOKE.batches:
        rows = [scale["measured"][f"batch{batch}_depth{d}"] for d in depths]
        # Every layer's candidates are scored at every position: 5 positions x depth.
        assert [r["scoring"]["candidates"] for r in rows] == [5 * d for d in depths]
        line = scale["extrapolated"][f"batch{batch}"]
        per = [r["scoring"]["seconds_per_candidate"] for r in rows]
        assert line["scoring_seconds_per_candidate"] == pytest.approx(
            per[0] + (per[1] - per[0]) * (32 - depths[0]) / (depths[1] - depths[0]))
        assert line["candidates"] == 5 * int(32 * 0.8)
        assert line["projected_selection_seconds"] == pytest.approx(
            line["filter_seconds"] + line["mean_activations_seconds"]
            + line["candidates"] * line["scoring_seconds_per_candidate"])
        assert all(r[step]["peak_gib"] is None for r in rows for step in ("scoring", "generation", "ce"))
    assert scale["paper_budget"] == {"status": "not applicable: a CPU smoke run"}


def test_bench_scale_smoke(tmp_path):
    """The scale benchmark's code on a tiny checkpoint: the sizes it compares with are recomputed from the
    files, every ratio from its parts, and a step it could not run says why."""
    import bench_scale
    from safetensors import safe_open

    out = tmp_path / "scale.json"
    report = bench_scale.main(["--shape", "tiny", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    files = list(Path(report["checkpoint"]).glob("*.safetensors"))
    largest = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                largest = max(largest, math.prod(handle.get_slice(key).get_shape()))
    sizes = report["sizes_on_disk"]
    assert sizes["largest_tensor_fp32_bytes"] == 4 * largest
    assert sizes["parameters"] == bench_scale.SHAPES["tiny"].params()
    assert sizes["weights_bytes"] <= sum(f.stat().st_size for f in files)  # the files hold headers too
    steps = report["steps"]
    one = steps["extract_one_process"]
    assert one["rc"] == 0 and one["threads"] == 1 and one["candidates_scored"] == 10  # 5 positions x layers 0-1
    assert one["peak_rss_over_weights"] == pytest.approx(one["peak_rss_mb"] * 2**20 / sizes["weights_bytes"])
    assert len(one["loadavg_before"]) == 3
    two = steps["extract_two_processes"]
    if "status" in two:
        assert two["status"].startswith("not run: ")
    else:
        assert two["rc"] == 0 and two["vs_one_process"]["identical"]
        assert two["selection_seconds_over_one_process"] == pytest.approx(
            two["seconds"]["selection"] / one["seconds"]["selection"])
    export = steps["export"]
    assert export["rc"] == 0
    assert export["streaming_rss_mb"] == pytest.approx(export["peak_rss_mb"] - export["baseline_rss_mb"])
    verification = steps["verification"]  # one model at a time: the larger of the source and the export
    if verification.get("rc") == 0:
        one_model = max(sizes["weights_bytes"], verification["export_weights_bytes"])
        assert verification["peak_rss_over_one_model"] == pytest.approx(verification["peak_rss_mb"] * 2**20 / one_model)
        assert verification["verification"]["passed"]
    for name, check in report["checks"].items():  # a measured value with its verdict, or why it is missing
        assert ("met" in check and check["met"] == (check["value"] <= check["max"])) or \
            check["status"].startswith(("not run", "failed")), name
    attention = steps["attention"]
    assert attention["status"] == "measured"
    seconds = attention["median_seconds"]
    assert attention["hf_sdpa_over_eager"] == pytest.approx(seconds["hf_sdpa"] / seconds["hf_eager"])
    assert seconds["hf_sdpa_impl"] == "sdpa" and seconds["bridge_sdpa_impl_after_boot"] == "eager"


def test_gpu_check_stops_a_check_at_its_budget_and_fails_it(tmp_path, monkeypatch):
    import dataclasses

    import gpu_check

    # One second: the check's process is stopped while it imports; the report says so and the exit is 1.
    monkeypatch.setattr(gpu_check, "SMOKE", dataclasses.replace(gpu_check.SMOKE, budgets={"scale_8b": 1}))
    out = tmp_path / "budget.json"
    assert gpu_check.main(["--cpu-smoke", "--only", "scale_8b", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == {"scale_8b": "failed: stopped at its 1 s budget (partial results kept)"}
    assert report["checks"]["scale_8b"]["budget_seconds"] == 1


def test_bench_gguf_memory_smoke(tmp_path, monkeypatch):
    """The GGUF edit's peak-memory benchmark on a tiny GGUF: it runs, and its bound is the issue's formula
    recomputed here from the file (2 x the largest tensor in float32 + the metadata's bytes)."""
    import bench_gguf_memory
    import gguf

    from tests.tiny_gguf import write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0", tied=True)
    out = tmp_path / "mem.json"
    monkeypatch.setattr(sys, "argv", ["bench_gguf_memory.py", "--gguf", str(src), "--out", str(out)])
    bench_gguf_memory.main()
    (case,) = json.loads(out.read_text())["cases"]
    reader = gguf.GGUFReader(src)
    largest = max(4 * int(t.n_elements) for t in reader.tensors)
    metadata = sum(sum(int(p.nbytes) for p in f.parts) for k, f in reader.fields.items() if not k.startswith("GGUF."))
    assert case["bound"] == 2 * largest + metadata
    assert case["growth"] > 0 and case["edited_tensors"] == 5


def test_bench_gguf_draws_its_held_out_prompts_from_outside_what_the_run_sampled(tmp_path):
    import bench_gguf
    import bench_heretic

    from tlrefusal import artifacts

    paper_data_flag()
    splits = PAPER_DATA / "datasets" / "splits"
    first = bench_heretic.held_out(splits, 8, None)
    # A run that sampled three of those harmful prompts and one harmless one (prompts.json as extract writes it).
    sampled = {"harmful_train": [{"instruction": p} for p in first["harmful"][:3]],
               "harmless_val": [{"instruction": first["harmless"][0]}]}
    (tmp_path / artifacts.PROMPTS).write_text(json.dumps(sampled))
    got, n_sampled = bench_gguf.prompts_for(splits, 8, None, tmp_path)
    assert {label: len(prompts) for label, prompts in got.items()} == {"harmful": 8, "harmless": 8}
    assert not set(got["harmful"]) & set(first["harmful"][:3]) and first["harmless"][0] not in got["harmless"]
    assert n_sampled == 4
