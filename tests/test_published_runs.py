"""The 13 published runs' per-candidate scores through tlrefusal's filters and choice give the published choice.

5 runs of the original code (keys refusal_score = bypass, steering_score = induce, kl_div_score) and 8 of the
NNsight replication (bypass_score, induce_score, kl_div_score). For each run the chosen (pos, layer) must be the
run's direction_metadata.json, and the survivors, in order, its direction_evaluations_filtered.json.
The paper's data folder is $TLREFUSAL_PAPER_DATA, else the one beside the checkout; the tests skip when neither
is there, and fail when $TLREFUSAL_PAPER_DATA names a folder without the runs.
"""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import SHARED
from tlrefusal.selection import CandidateScore, SelectionConfig, choose

# Decoder layers of each published model (its config's num_hidden_layers).
N_LAYERS = {"qwen-1_8b-chat": 24, "qwen-7b-chat": 32, "gemma-2b-it": 18, "gemma-7b-it": 28, "yi-6b-chat": 32,
            "llama-2-7b-chat-hf": 32, "llama-2-13b-chat-hf": 40, "meta-llama-3-8b-instruct": 32}
# Score keys of each pipeline: bypass, induce, kl.
KEYS = {"original_runs": ("refusal_score", "steering_score", "kl_div_score"),
        "nnsight_runs": ("bypass_score", "induce_score", "kl_div_score")}
RUNS = [("original_runs", m) for m in ("qwen-1_8b-chat", "gemma-2b-it", "yi-6b-chat", "llama-2-7b-chat-hf",
                                       "meta-llama-3-8b-instruct")]
RUNS += [("nnsight_runs", m) for m in ("Qwen-1_8B-chat", "Qwen-7B-Chat", "gemma-2b-it", "gemma-7b-it", "yi-6b-chat",
                                       "Llama-2-7b-chat-hf", "Llama-2-13b-chat-hf", "Meta-Llama-3-8B-Instruct")]


def run_dir(pipeline: str, model: str) -> Path:
    env = os.environ.get("TLREFUSAL_PAPER_DATA")
    folder = (Path(env) if env else SHARED / "data") / pipeline / model
    if not (folder / "select_direction").is_dir():
        if env:
            pytest.fail(f"$TLREFUSAL_PAPER_DATA={env} has no {pipeline}/{model}/select_direction")
        pytest.skip(f"the paper's data folder is not here ({folder})")
    return folder


def read_scores(path: Path, keys: tuple[str, str, str]) -> list[CandidateScore]:
    bypass, induce, kl = keys
    return [CandidateScore(row["position"], row["layer"], float(row[bypass]), float(row[induce]), float(row[kl]))
            for row in json.loads(path.read_text())]


def test_all_thirteen_runs_are_listed():
    assert len(RUNS) == 13 and {m.lower() for _, m in RUNS} == set(N_LAYERS)


@pytest.mark.parametrize("pipeline,model", RUNS, ids=[f"{p}/{m}" for p, m in RUNS])
def test_published_scores_choose_the_published_direction(pipeline, model):
    folder = run_dir(pipeline, model)
    scores = read_scores(folder / "select_direction" / "direction_evaluations.json", KEYS[pipeline])
    n_layers = N_LAYERS[model.lower()]
    # Every (pos, layer) is there once, so the layer count agrees with the model's.
    positions = sorted({s.position for s in scores})
    assert max(s.layer for s in scores) + 1 == n_layers
    assert len(scores) == len(positions) * n_layers == len({(s.position, s.layer) for s in scores})

    result = choose(scores, n_layers=n_layers, config=SelectionConfig())

    published = json.loads((folder / "direction_metadata.json").read_text())
    assert (result.chosen.position, result.chosen.layer) == (published["pos"], published["layer"])
    expected = [(row["position"], row["layer"]) for row in
                json.loads((folder / "select_direction" / "direction_evaluations_filtered.json").read_text())]
    assert [(c.position, c.layer) for c in result.survivors()] == expected
