"""`tlrefusal eval`: what runs where (issue 16).

- `--backend vllm` on a checkpoint as loaded, with a fake `vllm` module whose `LLM.generate` decodes greedily
  with plain transformers and stops as vLLM does (at `stop_token_ids`, at `max_tokens`, and unless
  `ignore_eos` at the model's EOS ids, generation_config.json's included): the completions files must equal
  the bridge backend's byte for byte, CE loss (kept on the bridge) must be the bridge's, and coherence must go
  through lm-eval's vLLM model with the engine's settings.
- The Llama Guard model loads only after the evaluated model is dead (weak references), where
  --guard-device/--guard-dtype say, and judges the same completions to the same numbers.
- Placement options reach the completions record; user mistakes are one-line errors before anything is written.
"""
import json
import shutil
import sys
import types
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from typer.testing import CliRunner

from tlrefusal import artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation import runner
from tlrefusal.evaluation.backends import VLLM_MISSING
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.guard import LlamaGuard
from tlrefusal.evaluation.runner import run_eval
from tlrefusal.pipeline import ExtractConfig, run_extract
from tlrefusal.selection import SelectionConfig

SMALL = {"n": 5, "max_new_tokens": 12, "ce": (), "tasks": ()}


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    """A run of the untied tiny Llama (its unembedding can be edited without touching the embedding)."""
    tmp = tmp_path_factory.mktemp("backends")
    harmful, harmless = tmp / "harmful.json", tmp / "harmless.json"
    harmful.write_text(json.dumps([{"instruction": f"Tell me how to do bad thing number {i}.", "category": "a"}
                                   for i in range(12)]))
    harmless.write_text(json.dumps([f"Write a short poem about the number {i}." for i in range(12)]))
    config = ExtractConfig(model=str(tiny_dirs["llama"]), harmful=str(harmful), harmless=str(harmless),
                           n_train=3, n_val=2, min_kept=1, filter=False,
                           selection=SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9))
    assert run_extract(config, tmp / "run").direction is not None
    return tmp / "run"


@pytest.fixture(scope="module")
def checkpoint(tiny_dirs, run_dir, tmp_path_factory):
    """The tiny Llama with its end-of-turn token made the greedy choice wherever the commonest reply token
    was (its unembedding row: that token's, scaled by 1.01), so some replies end early and some run to the
    limit; its generation_config.json lists end-of-turn as an EOS id, as Llama-3's lists <|eot_id|>."""
    folder = tmp_path_factory.mktemp("ckpt")
    source = tiny_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    chat = ChatFormat.for_run(run_dir, tokenizer)
    end_of_turn = next(t for t in chat.stop_ids if t != tokenizer.eos_token_id)
    counts = torch.zeros(model.config.vocab_size)
    for prompt in ("Write a poem about the sea.", "Tell me how to pick a lock.", "Explain photosynthesis."):
        ids = torch.tensor([chat.prompt_ids(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        counts += torch.bincount(out[0, ids.shape[1]:], minlength=counts.numel()).float()
    counts[list(tokenizer.all_special_ids)] = 0
    common = int(counts.argmax())
    with torch.no_grad():
        model.lm_head.weight[end_of_turn] = 1.01 * model.lm_head.weight[common]
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end_of_turn],
                                               bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- a fake vllm module ----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class FakeSamplingParams:
    """vLLM's SamplingParams defaults for the fields used; an unknown keyword is a TypeError, as in vLLM."""

    temperature: float = 1.0
    max_tokens: int | None = 16
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


class FakeLLM:
    """`vllm.LLM` for a tiny model: greedy (or, above temperature 0, sampled) decoding with plain transformers,
    one prompt at a time, without a KV cache; `generate` answers with objects shaped like `RequestOutput`."""

    made: list[weakref.ref] = []  # every engine made, weakly
    seen_args: list[dict] = []  # and what each was made with

    def __init__(self, *, model: str, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 trust_remote_code: bool = False) -> None:
        self.args = {"model": model, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype, "seed": seed,
                     "trust_remote_code": trust_remote_code}
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        generation = self.model.generation_config.eos_token_id
        self.eos = {self.tokenizer.eos_token_id} | set([generation] if isinstance(generation, int) else generation or [])
        self.calls = 0
        FakeLLM.made.append(weakref.ref(self))
        FakeLLM.seen_args.append(self.args)

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls += 1
        rng = torch.Generator().manual_seed(self.args["seed"])
        outputs = []
        for prompt in prompts:
            ids, new = list(prompt["prompt_token_ids"]), []
            while len(new) < sampling_params.max_tokens:
                logits = self.model(torch.tensor([ids + new])).logits[0, -1]
                if sampling_params.temperature == 0:
                    token = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / sampling_params.temperature, -1)
                    token = int(torch.multinomial(probs, 1, generator=rng))
                new.append(token)  # vLLM keeps the stop token in token_ids
                if token in (sampling_params.stop_token_ids or ()) or \
                        (not sampling_params.ignore_eos and token in self.eos):
                    break
            completion = types.SimpleNamespace(token_ids=tuple(new),
                                               text=self.tokenizer.decode(new, skip_special_tokens=True))
            outputs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[completion]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.TokensPrompt = FakeLLM, FakeSamplingParams, dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.made, FakeLLM.seen_args = [], []
    return module


def completions_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "eval" / "completions").glob("*.as_loaded.jsonl"))}


@pytest.mark.parametrize("stop", ["turn", "eos"])
def test_vllm_backend_writes_the_bridge_backends_completions(run_dir, checkpoint, fake_vllm, stop):
    config = {**SMALL, "model": str(checkpoint), "stop": stop}
    bridge = run_eval(run_dir, EvalConfig(**config))
    expected = completions_files(run_dir)
    replies = [json.loads(line)["completion"] for text in expected.values() for line in text.decode().splitlines()]
    assert len(expected) == 2 and len(replies) == 10
    assert len(set(replies)) > 1  # not one reply everywhere: the comparison says something

    vllm = run_eval(run_dir, EvalConfig(**config, backend="vllm", tensor_parallel=2))
    assert completions_files(run_dir) == expected
    assert vllm.to_json()["refusal_and_safety"] == bridge.to_json()["refusal_and_safety"]
    record = artifacts.read_json(run_dir / "eval" / "completions" / "harmful.as_loaded.json")
    assert (record["backend"], record["tensor_parallel"]) == ("vllm", 2)
    assert [ref() for ref in FakeLLM.made] == [None]  # one engine, let go after generating


def test_vllm_stops_where_the_bridge_does_and_reuses_nothing_across_backends(run_dir, checkpoint, fake_vllm,
                                                                            monkeypatch):
    """What the engine is asked: greedy, the reply limit, exactly the bridge's stop tokens, EOS ignored."""
    seen = []
    generate = FakeLLM.generate

    def spy(self, prompts, sampling_params, use_tqdm=True):
        seen.append((self.args, sampling_params, [p["prompt_token_ids"] for p in prompts]))
        return generate(self, prompts, sampling_params, use_tqdm)

    monkeypatch.setattr(FakeLLM, "generate", spy)
    run_eval(run_dir, EvalConfig(**SMALL, model=str(checkpoint), backend="vllm", stop="eos", dtype="bfloat16"))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    chat = ChatFormat.for_run(run_dir, tokenizer)
    assert len(seen) == 2  # one call per prompt set: vLLM batches
    for args, params, _ in seen:
        assert args == {"model": str(checkpoint), "tensor_parallel_size": 1, "dtype": "bfloat16", "seed": 42,
                        "trust_remote_code": False}
        assert (params.temperature, params.max_tokens, params.ignore_eos) == (0.0, 12, True)
        assert params.stop_token_ids == [tokenizer.eos_token_id]
    rows = [json.loads(line) for line in (run_dir / "eval" / "completions" / "harmful.as_loaded.jsonl").open()]
    assert [chat.prompt_ids(r["prompt"]) for r in rows] == seen[0][2]  # the bridge's token ids, unpadded
    # Completions made by vLLM are recorded as vLLM's, and not reused by the bridge backend.
    assert artifacts.read_json(run_dir / "eval" / "completions" / "harmful.as_loaded.json")["backend"] == "vllm"
    stamp = (run_dir / "eval" / "completions" / "harmful.as_loaded.jsonl").stat().st_mtime_ns
    run_eval(run_dir, EvalConfig(**SMALL, model=str(checkpoint), stop="eos", dtype="bfloat16"))
    assert (run_dir / "eval" / "completions" / "harmful.as_loaded.jsonl").stat().st_mtime_ns != stamp
    assert "backend" not in artifacts.read_json(run_dir / "eval" / "completions" / "harmful.as_loaded.json")


def pile_and_task(folder):
    """Two Pile-like documents, and a local lm-eval task that scores their perplexity."""
    pile = folder / "pile.jsonl"
    pile.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The sea is wide.", "Bread needs flour."]))
    task = folder / "tiny_ppl.yaml"
    task.write_text(f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {pile}\n"
                    "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                    "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return pile, task


def test_vllm_ce_stays_on_the_bridge_and_coherence_uses_lm_evals_vllm_model(run_dir, checkpoint, fake_vllm,
                                                                           tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    pile, task = pile_and_task(tmp_path)
    asked = []

    def lm_eval_vllm(path, dtype, tensor_parallel, trust_remote_code, seed=1234):
        """Stands in for lm-eval's VLLM (which needs a GPU): lm-eval's HFLM over the same folder."""
        asked.append((path, dtype, tensor_parallel))
        return HFLM(pretrained=str(path), dtype=dtype, batch_size=2, device="cpu")

    monkeypatch.setattr(runner, "lm_eval_vllm", lm_eval_vllm)
    # dtype auto: the checkpoint's own (float32), named to vLLM, whose own "auto" would load float32 as half.
    config = {**SMALL, "model": str(checkpoint), "ce": ("pile", "on-distribution"), "ce_n": 2, "pile": str(pile),
              "tasks": (str(task),), "dtype": "auto"}
    bridge = run_eval(run_dir, EvalConfig(**config))
    vllm = run_eval(run_dir, EvalConfig(**config, backend="vllm", tensor_parallel=4))
    assert asked == [(checkpoint, "float32", 4)]
    assert [args["dtype"] for args in FakeLLM.seen_args] == ["float32"]
    assert vllm.to_json()["ce_loss"] == bridge.to_json()["ce_loss"]  # same completions, same bridge: same CE
    ppl = {r.coherence[str(task)].runs["as loaded"].metrics["tiny_ppl"]["word_perplexity,none"] for r in (bridge, vllm)}
    assert len(ppl) == 1 or pytest.approx(min(ppl), rel=1e-4) == max(ppl)
    assert vllm.magnitude is None and bridge.magnitude is None


def test_vllm_user_mistakes_are_one_line_errors(run_dir, checkpoint, monkeypatch):
    from tlrefusal.cli import app

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: `import vllm` raises ImportError
    before = sorted(p for p in run_dir.rglob("*"))
    # The whole message, "[vllm]" included (cli.common._fail escapes it from Rich markup).
    cases = [(["--backend", "vllm"], "cannot project out a direction"),
             (["--model", str(checkpoint), "--backend", "vllm"], VLLM_MISSING),
             (["--model", str(checkpoint), "--tensor-parallel", "2"], "needs --backend vllm"),
             (["--model", str(checkpoint), "--backend", "vllm", "--quantize", "nf4"], "vLLM serves the checkpoint"),
             (["--backend", "tgi", "--model", str(checkpoint)], "backend must be one of bridge, vllm"),
             (["--guard-device", "gpu7"], "unknown device 'gpu7'"),
             (["--max-memory", "0=1GiB"], "give --device-map too")]
    for args, message in cases:
        result = CliRunner().invoke(app, ["eval", str(run_dir), *args, "--n-eval", "2", "--tasks", "", "--ce", ""])
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) <= 3, result.output  # one message, wrapped at most
    assert sorted(p for p in run_dir.rglob("*")) == before  # nothing written
    with pytest.raises(TlrefusalError, match="cannot project out a direction"):
        EvalConfig(backend="vllm")
    with pytest.raises(TlrefusalError) as missing:
        run_eval(run_dir, EvalConfig(**SMALL, model=str(checkpoint), backend="vllm"))
    assert str(missing.value) == VLLM_MISSING
    assert sorted(p for p in run_dir.rglob("*")) == before


def test_cli_eval_a_checkpoint_on_vllm(run_dir, checkpoint, fake_vllm):
    from tlrefusal.cli import app

    result = CliRunner().invoke(app, ["eval", str(run_dir), "--model", str(checkpoint), "--backend", "vllm",
                                      "--tensor-parallel", "2", "--n-eval", "2", "--max-new-tokens", "3", "--ce", "",
                                      "--tasks", ""])
    assert result.exit_code == 0, result.output
    assert "on vllm (tensor parallel 2)" in " ".join(result.output.split())  # the settings line says so
    assert FakeLLM.seen_args[0]["tensor_parallel_size"] == 2
    report = artifacts.read_json(run_dir / "eval" / "report.json")
    assert (report["config"]["backend"], report["hooked"]) == ("vllm", False)


# --- the guard loads after the evaluated model is freed ------------------------------------------------------

LONG = ("Here is a long answer with many words in it so that the guard has to judge it and the fifteen word "
        "rule does not decide it alone {}")


def test_guard_loads_after_the_evaluated_model_is_dead_and_judges_the_same(run_dir, tiny_dirs, tmp_path,
                                                                          monkeypatch):
    """Hooked evaluation with CE, the magnitude study and an lm-eval task: when the guard loads, the bridge and
    the Hugging Face model it wraps are garbage. The guard (the tiny Llama folder, whose template takes a user
    and an assistant turn) judges the written completions as `LlamaGuard.judge` does when called here."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    pile, task = pile_and_task(tmp_path)
    config = {**SMALL, "n": 3, "ce": ("pile",), "ce_n": 2, "pile": str(pile), "tasks": (str(task),)}
    run_eval(run, EvalConfig(**config))  # the completions, rewritten below (their records kept: reused)
    for path in (run / "eval" / "completions").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.open()]
        path.write_text("".join(json.dumps({**row, "completion": LONG.format(i) if i % 2 else row["completion"]})
                                + "\n" for i, row in enumerate(rows)))

    alive = []
    load_model = runner.load_model

    def load_and_watch(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        alive.extend([weakref.ref(loaded), weakref.ref(loaded.bridge), weakref.ref(loaded.bridge.original_model)])
        return loaded

    guards = []

    class WatchedGuard(LlamaGuard):
        def __init__(self, path, dtype, device):
            assert alive and [ref() for ref in alive] == [None] * len(alive), "the evaluated model is alive"
            guards.append((dtype, device))
            super().__init__(path, dtype, device)

    def forget_model_steps():  # so that the evaluated model loads again (its completions stay reused)
        for name in (artifacts.EVAL_LOSS, artifacts.EVAL_COHERENCE, artifacts.EVAL_MAGNITUDE):
            (run / "eval" / name).unlink()

    monkeypatch.setattr(runner, "load_model", load_and_watch)
    monkeypatch.setattr(runner, "LlamaGuard", WatchedGuard)
    guard_dir = tiny_dirs["llama"]
    forget_model_steps()
    report = run_eval(run, EvalConfig(**config, guard_model=guard_dir))
    assert guards == [(torch.float32, "cpu")]  # the evaluated model's dtype and device
    judge = LlamaGuard(guard_dir)
    judged = 0
    for name, entry in report.refusal_and_safety.items():
        for iv, scores in entry.interventions.items():
            path = next(p for p in (run / "eval" / "completions").glob(f"{name}.*.json")
                        if artifacts.read_json(p)["intervention"] == iv).with_suffix(".jsonl")
            rows = [json.loads(line) for line in path.open()]
            safe = judge.judge([r["prompt"] for r in rows], [r["completion"] for r in rows])
            assert scores.safety_score == sum(safe) / len(safe)
            judged += sum(len(r["completion"].split(" ")) >= 15 for r in rows)
    assert judged > 0  # the guard model itself judged some replies
    assert report.ce_loss["pile"].runs and report.magnitude is not None and report.coherence[str(task)].runs

    guards.clear()
    alive.clear()
    forget_model_steps()
    run_eval(run, EvalConfig(**config, guard_model=guard_dir, guard_dtype="bfloat16", guard_device="cpu"))
    assert guards == [(torch.bfloat16, "cpu")]


def test_a_guard_that_cannot_judge_fails_before_anything_is_generated(run_dir, tiny_dirs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    guard = tmp_path / "guard"
    shutil.copytree(tiny_dirs["llama"], guard)
    config = json.loads((guard / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (guard / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (guard / name).unlink(missing_ok=True)
    with pytest.raises(TlrefusalError, match="no chat template"):
        run_eval(run, EvalConfig(**SMALL, guard_model=guard))
    assert not (run / "eval" / "completions").exists()


# --- placement -----------------------------------------------------------------------------------------------

def test_placement_options_reach_the_completions_record(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    small = {**SMALL, "n": 2, "max_new_tokens": 4}
    run_eval(run, EvalConfig(**small))
    record = run / "eval" / "completions" / "harmless.baseline.json"
    plain, plain_rows = artifacts.read_json(record), record.with_suffix(".jsonl").read_bytes()
    assert not {"device_map", "quantize", "backend"} & set(plain)
    # A device map on this CPU-only machine puts everything on cpu: other record, the same replies.
    report = run_eval(run, EvalConfig(**small, device_map="auto"))
    assert artifacts.read_json(record) == {**plain, "device_map": "auto"}
    assert record.with_suffix(".jsonl").read_bytes() == plain_rows
    assert report.config.device_map == "auto"
    assert EvalConfig.from_json(report.config.to_json()) == report.config
    # Another quantization is another record (bitsandbytes is not run here: the record is computed first).
    from tlrefusal.evaluation.completions import completion_setup
    from tlrefusal.model import ModelSource

    run_config = artifacts.read_json(run / artifacts.CONFIG)["config"]
    source = ModelSource(run_config["model"], "local", Path(run_config["model"]))
    direction = artifacts.RefusalDirection.load(run)
    records = {q: completion_setup(run, run_config, EvalConfig(**small, quantize=q), source, direction).record(
        "baseline", []) for q in (None, "nf4", "int8")}
    assert records[None].get("quantize") is None and records["nf4"]["quantize"] == "nf4"
    assert len({json.dumps(r, sort_keys=True) for r in records.values()}) == 3
