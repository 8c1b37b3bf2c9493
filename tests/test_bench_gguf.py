"""benchmarks/bench_gguf.py without llama.cpp: its pure helpers (agreement, token-id comparison, context size,
names) and the worker's command line. llama-cpp-python is never installed or imported in CI: the benchmark runs
it as a separate program in its own venv (benchmarks/README.md)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gguf as bg  # noqa: E402


def test_verdict_agreement_is_the_fraction_of_equal_verdicts():
    assert bg.verdict_agreement([True, False, True, True], [True, True, True, False]) == 0.5
    assert bg.verdict_agreement([], []) != bg.verdict_agreement([], [])  # nan for no prompts
    with pytest.raises(ValueError):
        bg.verdict_agreement([True], [True, False])


def test_agreement_per_label_and_overall():
    a = {"refused": {"harmful": [True, True], "harmless": [False, False, False]},
         "replies": {"harmful": ["I cannot", "I cannot"], "harmless": ["x", "y", "z"]}}
    b = {"refused": {"harmful": [True, False], "harmless": [False, False, True]},
         "replies": {"harmful": ["I cannot", "Sure"], "harmless": ["x", "y2", "I cannot"]}}
    got = bg.agreement(a, b)
    assert got["harmful"] == {"same_verdict": 0.5, "identical_reply": 0.5}
    assert got["harmless"]["same_verdict"] == pytest.approx(2 / 3)
    assert got["harmless"]["identical_reply"] == pytest.approx(1 / 3)
    assert got["all"]["same_verdict"] == pytest.approx(3 / 5)
    assert got["all"]["identical_reply"] == pytest.approx(2 / 5)


def test_token_agreement_counts_and_shows_the_first_differences():
    got = bg.token_agreement([[1, 2], [3], [4, 5], [6]], [[1, 2], [3, 0], [4, 5], [7]], ["a", "b", "c", "d"], k=1)
    assert got["same"] == 2 and got["n"] == 4
    assert got["differ"] == [{"prompt": "b", "tlrefusal": [3], "llama_cpp": [3, 0]}]


def test_context_size_fits_the_longest_prompt_and_the_reply():
    assert bg.context_size([10, 40], 64) == 512
    assert bg.context_size([600], 64) == 768
    assert bg.context_size([], 64) == 512
    assert bg.context_size([700], 64, floor=0) >= 700 + 64


def test_default_name_is_the_source_file_name_without_gguf():
    assert bg.default_name(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct.Q4_1"
    assert bg.default_name(Path("model.GGUF")) == "model"


def test_worker_needs_its_two_files():
    with pytest.raises(SystemExit):
        bg.main(["--worker", "only-one.json"])
