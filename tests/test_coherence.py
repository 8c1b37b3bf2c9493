"""The lm-eval adapter (SPEC 1.11): lm-eval's own numbers through the bridge, with and without hooks.

Offline: the tests write small task YAMLs over local JSONL files, one per request type (multiple-choice
log-likelihood, rolling log-likelihood, generation).
"""
import json

import pytest
import torch
from lm_eval import simple_evaluate

from hooks import ablation_hooks
from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.coherence import coherence, resolve_tasks, run_lm_eval
from tlrefusal.export import export_orthogonalized
from tlrefusal.model import ModelSource

QUESTIONS = [("What is the sea full of?", ["water", "sand", "bread"], 0),
             ("What do you bake bread with?", ["flour", "rocks", "fire"], 0),
             ("Which is a colour?", ["dog", "blue", "lock"], 1),
             ("What jumps over the lazy dog?", ["the sea", "the poem", "the quick brown fox"], 2)]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sure, here is a recipe with flour, water and salt."]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                                           for q, c, y in QUESTIONS))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = "test_split: test\ndataset_path: json\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{choices[label]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return [str(root / f"{name}.yaml") for name in ("tiny_mc", "tiny_ppl", "tiny_gen")]


def lm_eval_hf(folder, tasks):
    """lm-eval's own `hf` model, loaded by lm-eval from the folder: the independent reference."""
    names, manager = resolve_tasks(tasks)
    results = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"}, tasks=names,
                              task_manager=manager, device="cpu", batch_size=4, bootstrap_iters=0,
                              random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                              fewshot_random_seed=1234)
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in results["results"].items()}


def assert_same(ours, ref):
    assert set(ours) == set(ref)
    for task in ref:
        for metric, value in ref[task].items():
            if metric in ours[task]:
                assert ours[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_adapter_equals_lm_evals_own_hf_model(tiny_models, tiny_dirs, task_files):
    ours = coherence(tiny_models["llama"], {"baseline": []}, task_files)["baseline"]
    assert ours.n_samples["tiny_mc"] == 4
    assert ours.metrics["tiny_ppl"]["word_perplexity,none"] > 1
    assert_same(ours.metrics, lm_eval_hf(tiny_dirs["llama"], task_files))


def test_adapter_under_ablation_equals_the_orthogonalized_checkpoint(tiny_models, tiny_dirs, task_files, tmp_path):
    model = tiny_models["llama_tied"]
    r = torch.randn(32, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    direction = artifacts.RefusalDirection(r, 1, -1, "tiny")
    path = direction.save(tmp_path / "d.safetensors")
    export_orthogonalized(ModelSource("tiny", "local", tiny_dirs["llama_tied"]), direction, path, tmp_path / "o",
                          verify=False)
    ours = coherence(model, {"baseline": [], "ablation": ablation_hooks(r, model.n_layers)}, task_files)
    base, ablated = ours["baseline"].metrics, ours["ablation"].metrics
    assert ablated["tiny_ppl"]["word_perplexity,none"] != pytest.approx(base["tiny_ppl"]["word_perplexity,none"])
    assert_same(ablated, lm_eval_hf(tmp_path / "o", task_files))


def test_unknown_task_and_bad_yaml(tmp_path):
    with pytest.raises(TlrefusalError, match="unknown lm-eval task 'no_such_task_xyz'"):
        resolve_tasks(["no_such_task_xyz"])
    with pytest.raises(TlrefusalError, match="no task file"):
        resolve_tasks([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(TlrefusalError, match="no 'task' name"):
        run_lm_eval(None, [str(bad)])
