"""The lm-eval adapter (SPEC 1.11): lm-eval's own numbers through the bridge, with and without hooks.

Offline: the tests write small task YAMLs over local JSONL files, one per request type (multiple-choice
log-likelihood, rolling log-likelihood, generation).
"""
import functools
import json

import pytest
import torch
from lm_eval import simple_evaluate

from hooks import ablation_hooks
from tlrefusal import artifacts
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation import coherence as coherence_module
from tlrefusal.evaluation.coherence import (
    PAPER_TASKS,
    REPORT_METRICS,
    coherence,
    lm_eval_model,
    parse_task_spec,
    resolve_tasks,
    run_lm_eval,
    task_coherence,
)
from tlrefusal.export import export_orthogonalized
from tlrefusal.interventions import BASELINE
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
    # The same questions, few-shot examples drawn from the test split; one YAML sets its own default count.
    shots_task = (f"{common}fewshot_split: test\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
                  "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
                  "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                  "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tiny_fs.yaml").write_text(f"task: tiny_fs\n{shots_task}")
    (root / "tiny_fs0.yaml").write_text(f"task: tiny_fs0\nnum_fewshot: 0\n{shots_task}")
    (root / "tiny_fs1.yaml").write_text(f"task: tiny_fs1\nnum_fewshot: 1\n{shots_task}")
    return [str(root / f"{name}.yaml") for name in ("tiny_mc", "tiny_ppl", "tiny_gen")]


def lm_eval_hf(folder, tasks):
    """lm-eval's own `hf` model, loaded by lm-eval from the folder: the independent reference."""
    specs, manager = resolve_tasks(tasks)
    results = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                              tasks=[s.name for s in specs],
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


# The paper's coherence settings (SPEC 1.11; Open LLM Leaderboard v1): task, few-shot count, quoted metric.
PAPER_SETTINGS = [("arc_challenge", 25, "acc_norm,none"), ("mmlu", 5, "acc,none"), ("truthfulqa_mc2", 0, "acc,none"),
                  ("gsm8k", 5, "exact_match,strict-match"), ("winogrande", 5, "acc,none")]


def test_paper_tasks_are_the_leaderboard_v1_settings():
    assert [(s.name, s.shots) for s in map(parse_task_spec, PAPER_TASKS)] == [(n, k) for n, k, _ in PAPER_SETTINGS]
    assert REPORT_METRICS == {n: m for n, _, m in PAPER_SETTINGS}
    specs, manager = resolve_tasks(PAPER_TASKS)  # the installed lm-eval knows every name
    # Each quoted metric (and GSM8K's filter) is one the installed lm-eval task computes.
    for name, _, quoted in PAPER_SETTINGS:
        metric, filter_name = quoted.split(",")
        cfg = manager.task_index[name].cfg
        listed = cfg.get("metric_list") or cfg.get("aggregate_metric_list")
        assert metric in [m["metric"] for m in listed], name
        assert filter_name in [f["name"] for f in cfg.get("filter_list", [])] + ["none"], name
    assert manager.task_index["truthfulqa_mc2"].cfg["doc_to_choice"] == "{{mc2_targets.choices}}"  # mc2, not mc1


@pytest.mark.parametrize("spec", ["arc:x", "arc:-1", "arc:", ":3", "arc:2.5"])
def test_bad_task_spec_is_a_one_line_error(spec):
    with pytest.raises(TlrefusalError, match="expected NAME or NAME:SHOTS") as err:
        resolve_tasks([spec])
    assert "\n" not in str(err.value)


def test_task_spec_syntax(task_files):
    assert parse_task_spec("mmlu") == coherence_module.TaskSpec("mmlu", None)
    assert parse_task_spec("arc_challenge:25") == coherence_module.TaskSpec("arc_challenge", 25)
    assert parse_task_spec("/x/y.yaml") == coherence_module.TaskSpec("/x/y.yaml", None)
    assert parse_task_spec("/x/y.yaml:3") == coherence_module.TaskSpec("/x/y.yaml", 3)
    with pytest.raises(TlrefusalError, match="given twice"):
        resolve_tasks(["arc_challenge:25", "arc_challenge"])


def _contexts_fed(lm, monkeypatch):
    """Record the contexts of every log-likelihood request lm-eval sends to the model."""
    seen = []
    original = lm.loglikelihood

    def recording(requests, *args, **kwargs):
        seen.extend(r.args[0] for r in requests)
        return original(requests, *args, **kwargs)

    monkeypatch.setattr(lm, "loglikelihood", recording)
    return seen


@functools.cache
def _fewshot_ref(folder, yaml_path, shots):
    """lm-eval's own `hf` model with simple_evaluate's global num_fewshot."""
    names, manager = resolve_tasks([yaml_path])
    results = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                              tasks=[names[0].name], task_manager=manager, device="cpu", batch_size=4,
                              num_fewshot=shots, bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234,
                              torch_random_seed=1234, fewshot_random_seed=1234)
    return results["results"][names[0].name]


@pytest.mark.parametrize("task, spec, shots", [("tiny_fs", ":2", 2), ("tiny_fs0", ":2", 2), ("tiny_fs1", "", 1),
                                               ("tiny_fs1", ":0", 0)])
def test_shots_spec_is_what_lm_eval_runs(tiny_models, tiny_dirs, task_files, monkeypatch, task, spec, shots):
    """"NAME:2" makes lm-eval build 2-shot prompts (also over a YAML that says 0); a plain NAME keeps the YAML's."""
    yaml_path = str(task_files[0]).replace("tiny_mc.yaml", f"{task}.yaml")
    lm = lm_eval_model(tiny_models["llama"], 4)
    contexts = _contexts_fed(lm, monkeypatch)
    result = run_lm_eval(lm, [yaml_path + spec])
    # Each context holds the question asked plus `shots` solved examples, each "Question: ...\nAnswer: <choice>".
    assert len(contexts) == sum(len(c) for _, c, _ in QUESTIONS)
    assert {c.count("Question:") for c in contexts} == {shots + 1}
    assert {c.count("\nAnswer: ") for c in contexts} == {shots}
    assert result.n_shot == {task: shots}  # lm-eval's own "n-shot" field
    # lm-eval alone, told `shots` (over the YAML without a default: lm-eval ignores num_fewshot where one says 0)
    ref = _fewshot_ref(tiny_dirs["llama"], str(task_files[0]).replace("tiny_mc.yaml", "tiny_fs.yaml"), shots)
    assert result.metrics[task]["acc_norm,none"] == pytest.approx(ref["acc_norm,none"])
    assert result.metrics[task]["acc,none"] == pytest.approx(ref["acc,none"])


def test_report_metric_is_recorded_and_quoted(tiny_models, tiny_dirs, task_files, monkeypatch):
    monkeypatch.setitem(REPORT_METRICS, "tiny_fs", "acc_norm,none")
    yaml_path = str(task_files[0]).replace("tiny_mc.yaml", "tiny_fs.yaml")
    result = run_lm_eval(lm_eval_model(tiny_models["llama"], 4), [yaml_path + ":2", task_files[0]])
    assert result.report_metric == {"tiny_fs": "acc_norm,none"}  # tiny_mc has no quoted metric: all are shown
    assert result.n_shot == {"tiny_fs": 2, "tiny_mc": 0}
    assert result.headline() == {"tiny_fs": pytest.approx(_fewshot_ref(tiny_dirs["llama"], yaml_path, 2)["acc_norm,none"])}
    again = type(result).from_json(json.loads(json.dumps(result.to_json())))
    assert again == result
    # The report's line: tiny_fs's quoted metric alone, tiny_mc's every metric, each with its shots.
    acc_norm, mc = result.metrics["tiny_fs"]["acc_norm,none"], result.metrics["tiny_mc"]
    assert result.summary() == (f"tiny_fs (2-shot) acc_norm: {acc_norm:.4g}; tiny_mc (0-shot) "
                                + ", ".join(f"{k.split(',')[0]}: {v:.4g}" for k, v in mc.items() if "stderr" not in k))


def test_eval_coherence_is_keyed_by_task_name_and_records_shots(tiny_models, task_files):
    """`tlrefusal eval`'s coherence section: "FILE:1" is reported under FILE, with the shots lm-eval used."""
    yaml_path = str(task_files[0]).replace("tiny_mc.yaml", "tiny_fs.yaml")
    out = task_coherence(tiny_models["llama"], [BASELINE], [yaml_path + ":1"], limit=None, batch_size=4)
    assert list(out) == [yaml_path]
    assert out[yaml_path].runs["baseline"].n_shot == {"tiny_fs": 1}
