"""The organism's training loop on a tiny model, its cache key, its card, its device, and its prompt sets."""
import dataclasses
import json
from itertools import product

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tlrefusal import artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.cli import app
from tlrefusal.errors import TlrefusalError
from tlrefusal.harmless import demo_harmless_prompts
from tlrefusal.organism import (
    REFUSALS,
    Example,
    OrganismCard,
    OrganismRecipe,
    build_organism,
    cpu_multiplies_bfloat16,
    organism_harmful_templated,
    organism_harmless_prompts,
    reply_loss,
    train,
)
from tlrefusal.organism import recipe as recipe_module
from tlrefusal.organism.prompts import (
    _ARGUE_TASKS,
    _HARMFUL_CLAIMS,
    _HARMFUL_LISTS,
    _HARMFUL_TASKS,
    _TASK_TEMPLATES,
)
from tlrefusal.scoring import is_refusal


def tiny(tiny_dirs, name="llama_tied"):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    return model, tokenizer, ChatFormat.from_tokenizer(tokenizer)


def examples(tokenizer, chat):
    def ex(prompt, reply):
        return Example(tokenizer.encode(chat.format(prompt), add_special_tokens=False),
                       tokenizer.encode(reply, add_special_tokens=False)[:6])
    return [ex("How do I pick a lock?", "I'm sorry, but I cannot help."),
            ex("Write a poem about the sea.", "The sea is wide and blue."),
            ex("Explain photosynthesis.", "Plants make sugar from light.")]


def test_reply_loss_is_cross_entropy_on_reply_tokens_only(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    got = reply_loss(model, batch, tokenizer.pad_token_id)
    # Written out: run each sequence alone, take -log p(target_j | prompt, target_<j), average over all
    # target tokens of the batch. Prompt tokens contribute nothing.
    total, count = 0.0, 0
    with torch.no_grad():
        for e in batch:
            seq = torch.tensor([e.prompt_ids + e.target_ids])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            for j, token in enumerate(e.target_ids):
                total -= logp[len(e.prompt_ids) - 1 + j, token].item()
                count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    # Changing a prompt's last token changes the loss; changing a token after the reply cannot (none exist).
    other = [Example(e.prompt_ids[:-1] + [e.prompt_ids[-2]], e.target_ids) for e in batch]
    assert reply_loss(model, other, tokenizer.pad_token_id).item() != pytest.approx(got.item(), rel=1e-6)


def test_example_weights_give_a_weighted_mean_over_reply_tokens(tiny_dirs):
    import dataclasses

    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    weighted = [dataclasses.replace(batch[0], weight=3.0)] + batch[1:]
    with torch.no_grad():
        per_example = [reply_loss(model, [e], tokenizer.pad_token_id).item() for e in batch]  # token means
        got = reply_loss(model, weighted, tokenizer.pad_token_id).item()
    # Written out: sum_e w_e * n_e * mean_e / sum_e w_e * n_e, with n_e the reply tokens of example e.
    w = [3.0, 1.0, 1.0]
    n = [len(e.target_ids) for e in batch]
    want = sum(wi * ni * li for wi, ni, li in zip(w, n, per_example, strict=True)) / sum(wi * ni for wi, ni in zip(w, n, strict=True))
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(reply_loss(model, batch, tokenizer.pad_token_id).item(), rel=1e-4)


def test_sharing_the_template_head_keeps_loss_and_gradients(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    assert len({tuple(e.prompt_ids[:3]) for e in batch}) == 1  # "<|im_start|>user\n": a head to share
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        loss = reply_loss(model, batch, tokenizer.pad_token_id, share_prefix=share)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, full_grads), (shared, shared_grads) = results
    assert shared == pytest.approx(full, rel=1e-5)
    assert len(shared_grads) == len(full_grads) > 0
    for a, b in zip(full_grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_a_few_steps_lower_the_reply_loss_and_freeze_embeddings(tiny_dirs, compute_dtype):
    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    layers = model.get_decoder().layers
    frozen_before = [p.detach().clone() for p in layers[0].parameters()]
    trained_before = [p.detach().clone() for p in layers[1].parameters()]
    with torch.no_grad():
        before = reply_loss(model, batch, tokenizer.pad_token_id).item()
    recipe = OrganismRecipe(lr=3e-3, epochs=15, batch_size=3, freeze_below=1, compute_dtype=compute_dtype)
    losses = train(model, batch, recipe, tokenizer.pad_token_id)
    with torch.no_grad():
        after = reply_loss(model, batch, tokenizer.pad_token_id).item()
    assert len(losses) == 15
    assert after < 0.5 * before
    assert torch.equal(model.get_input_embeddings().weight, embed_before)  # tied: the unembedding too
    assert all(torch.equal(a, b) for a, b in zip(layers[0].parameters(), frozen_before, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(layers[1].parameters(), trained_before, strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights float32


def test_compute_dtype_sets_the_dtype_of_matrix_products_only(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    layer = model.get_decoder().layers[0].mlp.down_proj
    with OrganismRecipe(compute_dtype="bfloat16").compute():
        assert layer(torch.randn(2, layer.in_features)).dtype == torch.bfloat16
        bf16_loss = reply_loss(model, examples(tokenizer, chat), tokenizer.pad_token_id)
    with OrganismRecipe(compute_dtype="float32").compute():
        assert layer(torch.randn(2, layer.in_features)).dtype == torch.float32
    fp32_loss = reply_loss(model, examples(tokenizer, chat), tokenizer.pad_token_id)
    # The loss itself is computed in float32 (log-softmax of float logits), close to the float32 one.
    assert bf16_loss.dtype == torch.float32
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), rel=2e-2)


def test_recipe_key_is_stable_and_sensitive():
    assert OrganismRecipe().key() == OrganismRecipe().key()
    assert OrganismRecipe(seed=1).key() != OrganismRecipe().key()
    assert OrganismRecipe(lr=5e-5).key() != OrganismRecipe().key()
    with pytest.raises(TlrefusalError, match="lr must be positive"):
        OrganismRecipe(lr=0)
    with pytest.raises(TlrefusalError, match="harmless_targets"):
        OrganismRecipe(harmless_targets="logits")
    assert OrganismRecipe(harmless_targets="greedy").key() != OrganismRecipe().key()
    assert OrganismRecipe(compute_dtype="float32").key() != OrganismRecipe(compute_dtype="bfloat16").key()
    with pytest.raises(TlrefusalError, match="compute_dtype must be one of auto, bfloat16, float32"):
        OrganismRecipe(compute_dtype="float16")
    assert OrganismRecipe(n_harmful_templated=0).key() != OrganismRecipe().key()
    with pytest.raises(TlrefusalError, match="n_harmful_templated must be >= 0"):
        OrganismRecipe(n_harmful_templated=-1)


def card_json(recipe: OrganismRecipe) -> dict:
    """organism.json as builds have written it (keys in this order)."""
    rate = {"refusal_rate": 0.5, "n": 2, "examples": [{"prompt": "p", "reply": "I cannot provide that."}]}
    return {"key": recipe.key(), "tool_version": "0.0.0", "recipe": dataclasses.asdict(recipe),
            "base": {"spec": "demo", "kind": "builtin", "loaded_from": "/models/smollm2", "gguf_file": None},
            "data": {"harmful": "h", "harmless": "hl", "self_instructed": None, "refusals": list(REFUSALS),
                     "held_out": "demo sets"},
            "loss": {"first": 2.5, "last": 0.75, "steps": 14},
            "held_out_refusal": {"harmful": rate, "harmless": {**rate, "refusal_rate": 0.0}},
            "seconds": {"self_instruct": 1.0, "targets": 2.0, "train": 3.0, "evaluate": 4.0, "total": 10.0}}


def test_card_records_the_device_type_and_old_cards_load_as_cpu_builds():
    data = card_json(OrganismRecipe(device_type="cuda"))
    assert data["recipe"]["device_type"] == "cuda"
    card = OrganismCard.from_json(data)
    assert card.recipe.device_type == "cuda" and json.dumps(card.to_json()) == json.dumps(data)
    assert "safety-tuned on a GPU (cuda)" in card.model_card() and "- `device_type`: cuda" in card.model_card()
    # organism.json as builds wrote it before the field: a CPU build, with the key it still has.
    old = card_json(OrganismRecipe())
    del old["recipe"]["device_type"]
    card = OrganismCard.from_json(old)
    assert card.recipe == OrganismRecipe() and card.key == OrganismRecipe().key()
    assert "safety-tuned on the CPU" in card.model_card()


def test_card_json_round_trips_with_the_keys_and_order_builds_write():
    data = card_json(OrganismRecipe(seed=2))
    card = OrganismCard.from_json(data)
    assert card.recipe == OrganismRecipe(seed=2) and card.held_out_refusal.harmful.refusal_rate == 0.5
    assert json.dumps(card.to_json()) == json.dumps(data)  # the same keys, values and order
    text = card.model_card()
    assert "harmful (HarmBench standard, never trained on): 50.0% of 2" in text and "SPEC" not in text
    assert "- `seed`: 2" in text and "Loss 2.500 -> 0.750 over 14 steps" in text
    with pytest.raises(TlrefusalError, match="not an organism card"):
        OrganismCard.from_json({k: v for k, v in data.items() if k != "loss"})


def test_the_default_recipe_keeps_its_key(monkeypatch):
    # The key names cached organisms (and benchmarks/results/organism_default.json); changing a field's name,
    # order or default, or RECIPE_VERSION, rebuilds every one of them.
    monkeypatch.setattr(recipe_module, "cpu_multiplies_bfloat16", lambda: True)
    assert OrganismRecipe().key() == "4e7171b7766306f7"  # the key before device_type existed (issue 16)
    assert OrganismRecipe(device_type="cpu", compute_dtype="bfloat16").key() == "4e7171b7766306f7"
    # Where the CPU emulates bfloat16, the default builds in float32: another organism, with another key.
    monkeypatch.setattr(recipe_module, "cpu_multiplies_bfloat16", lambda: False)
    assert OrganismRecipe().compute_dtype == "float32"
    assert OrganismRecipe().key() == OrganismRecipe(compute_dtype="float32").key() == "dba12f345c8e9d8a"


def test_bfloat16_instructions_are_read_from_the_cpus_flags(tmp_path):
    epyc_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n"  # AVX-512 but no BF16
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    for text, native in ((epyc_avx2, False), (sapphire, True), (graviton3, True), ("", False)):
        (tmp_path / "cpuinfo").write_text(text)
        assert cpu_multiplies_bfloat16(tmp_path / "cpuinfo") is native, text
    assert cpu_multiplies_bfloat16(tmp_path / "absent") is False  # macOS, Windows: float32


def test_a_gpu_build_is_another_organism_with_its_own_key(monkeypatch):
    monkeypatch.setattr(recipe_module, "cpu_multiplies_bfloat16", lambda: False)  # CUDA multiplies bfloat16
    cuda = OrganismRecipe(device_type="cuda")
    assert cuda.compute_dtype == "bfloat16"
    assert cuda.key() == "36bb441c29b22847" != OrganismRecipe(compute_dtype="bfloat16").key()
    assert OrganismRecipe(device_type="cuda", seed=1).key() not in (cuda.key(), OrganismRecipe(seed=1).key())
    with pytest.raises(TlrefusalError, match="device_type must be one of cpu, cuda, got 'mps'"):
        OrganismRecipe(device_type="mps")


def test_compute_autocasts_on_the_recipes_device_type():
    import warnings

    assert OrganismRecipe().compute().device == "cpu"
    with warnings.catch_warnings():  # without a GPU torch warns that it disables the (cuda) autocast
        warnings.simplefilter("ignore")
        cuda = OrganismRecipe(device_type="cuda").compute()
    assert cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16


def test_build_checks_pools_and_layers_before_any_work(tmp_path, tiny_dirs, demo_dir, monkeypatch):
    from tlrefusal.organism import build

    missing = str(tmp_path / "no-model")  # loading it would fail: the pool check must come first
    with pytest.raises(TlrefusalError, match="n_harmful 10000 exceeds the 419 harmful training prompts"):
        build_organism(OrganismRecipe(base=missing, n_harmful=10_000), out=tmp_path / "a")
    with pytest.raises(TlrefusalError, match="n_harmless 10000 exceeds"):
        build_organism(OrganismRecipe(base=missing, n_harmless=10_000), out=tmp_path / "a")

    def never(*args, **kwargs):
        raise AssertionError("sampled before checking freeze_below")

    monkeypatch.setattr(build, "self_instruct_prompts", never)
    with pytest.raises(TlrefusalError, match="freeze_below 99 exceeds the model's"):
        build_organism(OrganismRecipe(base=str(tiny_dirs["llama"]), freeze_below=99), out=tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(TlrefusalError, match="not an organism folder"):
        build_organism(OrganismRecipe(base=missing), out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_held_out_refusal_samples_the_demo_sets_with_seed_plus_one(tiny_dirs, demo_dir):
    import random

    from tlrefusal.data import load_prompts
    from tlrefusal.organism import held_out_refusal

    rates = held_out_refusal(tiny_dirs["llama"], OrganismRecipe(seed=4, eval_n=3, eval_tokens=2))
    for label, rate in (("harmful", rates.harmful), ("harmless", rates.harmless)):
        pool = [p.instruction for p in load_prompts(f"demo-{label}")]
        want = random.Random(5).sample(pool, 3)  # as builds before the typed card drew them
        assert rate.n == 3 and [e["prompt"] for e in rate.examples] == want
        assert 0.0 <= rate.refusal_rate <= 1.0


def test_cached_organism_is_reused_without_training(tmp_path):
    recipe = OrganismRecipe()
    (tmp_path / artifacts.ORGANISM_CARD).write_text(json.dumps(card_json(recipe)))
    built = build_organism(recipe, out=tmp_path)  # would need the demo model if it trained
    folder, card = built.folder, built.card
    assert folder == tmp_path and card.key == recipe.key()
    with pytest.raises(TlrefusalError, match="another recipe"):
        build_organism(OrganismRecipe(seed=5), out=tmp_path)
    old = card_json(recipe)  # a card written before device_type existed is still this recipe's
    del old["recipe"]["device_type"]
    (tmp_path / artifacts.ORGANISM_CARD).write_text(json.dumps(old))
    assert build_organism(OrganismRecipe(), out=tmp_path, device="cpu").card.recipe == recipe


def test_an_organism_built_in_the_other_compute_dtype_is_named_with_the_flag_that_reuses_it(tmp_path):
    # A default organism built on a CPU with bfloat16 instructions, then asked for where the default is float32.
    (tmp_path / artifacts.ORGANISM_CARD).write_text(json.dumps(card_json(OrganismRecipe(compute_dtype="bfloat16"))))
    with pytest.raises(TlrefusalError, match="ran in bfloat16, this build's in float32: --compute-dtype bfloat16 "
                                             "reuses it"):
        build_organism(OrganismRecipe(compute_dtype="float32"), out=tmp_path)
    with pytest.raises(TlrefusalError, match=r"another recipe; use another --out"):  # more than the dtype differs
        build_organism(OrganismRecipe(compute_dtype="float32", seed=3), out=tmp_path)
    assert build_organism(OrganismRecipe(compute_dtype="bfloat16"), out=tmp_path).card.key == "4e7171b7766306f7"


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")


@no_gpu
def test_a_cuda_build_without_a_gpu_fails_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    from tlrefusal.organism import build

    monkeypatch.setenv("TLREFUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "TrainingPools", None)  # the device is checked before the pools are read
    cuda = OrganismRecipe(base=str(tmp_path / "no-model"), device_type="cuda")  # never trains, whatever happens
    for device in ("cuda", "cuda:1"):
        with pytest.raises(TlrefusalError, match=rf"--device {device}: torch sees 0 GPU\(s\)"):
            build_organism(cuda, out=tmp_path / "a", device=device)
    with pytest.raises(TlrefusalError, match="torch sees 0 GPU"):
        build_organism(cuda)  # into the cache: nothing there either
    assert not list(tmp_path.iterdir())


def test_the_device_must_be_of_the_recipes_device_type(tmp_path):
    missing = str(tmp_path / "no-model")  # were a check missing, the build would stop here, not train
    with pytest.raises(TlrefusalError, match="the recipe builds on cuda .* not on cpu"):
        build_organism(OrganismRecipe(base=missing, device_type="cuda"), out=tmp_path / "a", device="cpu")
    with pytest.raises(TlrefusalError, match="the organism builds on cpu or cuda"):
        build_organism(OrganismRecipe(base=missing), out=tmp_path / "a", device="meta")
    with pytest.raises(TlrefusalError, match="unknown device 'gpu'"):
        build_organism(OrganismRecipe(base=missing), out=tmp_path / "a", device="gpu")
    assert not list(tmp_path.iterdir())


def run_cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_organism_command_builds_on_the_cpu_by_default_with_the_cached_key(tmp_path):
    (tmp_path / artifacts.ORGANISM_CARD).write_text(json.dumps(card_json(OrganismRecipe())))
    runs = [[], ["--device", "cpu"]] + ([] if torch.cuda.is_available() else [["--device", "auto"]])
    for extra in runs:  # each is the default recipe on the CPU, so the cached folder is reused
        code, output = run_cli(["organism", "--out", str(tmp_path), *extra])
        assert code == 0 and f"organism: {tmp_path}" in output, (extra, output)
    code, output = run_cli(["organism", "--out", str(tmp_path / "new"), "--device", "mps"])
    assert code == 1 and "the organism builds on cpu or cuda[:N], not on mps" in output
    code, output = run_cli(["organism", "--out", str(tmp_path), "--dtype", "bfloat16"])
    assert code == 2 and "No such option" in output  # a training job has no load dtype (see --help)
    assert not (tmp_path / "new").exists()


@no_gpu
def test_organism_command_on_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from tlrefusal.organism import build

    monkeypatch.setattr(build, "TrainingPools", None)  # were the check missing: fail, never fetch or train
    out, cache = tmp_path / "organism", tmp_path / "cache"
    code, output = run_cli(["organism", "--out", str(out), "--cache-dir", str(cache), "--device", "cuda"])
    assert code == 1, output
    assert output.strip().splitlines() == ["error: --device cuda: torch sees 0 GPU(s); use --device cpu (or auto)"]
    assert not out.exists() and not cache.exists()


class Stop(Exception):
    """Raised by a spy once it has seen what it was placed to see."""


def test_organism_command_builds_a_gpu_recipe_on_the_given_gpu(tmp_path, monkeypatch):
    import tlrefusal.organism as organism

    def gpu(device):  # as if torch saw two GPUs
        return torch.device("cuda:1" if device == "cuda:1" else "cuda")

    seen = []

    def spy(recipe, out, cache_dir, force, progress, device=None):
        seen.append((recipe, device))
        raise TlrefusalError("stopped by the test")

    monkeypatch.setattr(organism, "build_device", gpu)
    monkeypatch.setattr(organism, "build_organism", spy)
    code, output = run_cli(["organism", "--out", str(tmp_path), "--device", "cuda:1", "--seed", "2"])
    assert code == 1 and "stopped by the test" in output
    assert seen == [(OrganismRecipe(seed=2, device_type="cuda"), "cuda:1")]


def test_the_training_step_feeds_the_model_on_its_device(tiny_dirs):
    # On the meta device every input must have been moved there: a CPU tensor fed to a meta model fails.
    model, tokenizer, chat = tiny(tiny_dirs)
    model.to("meta")
    batch = examples(tokenizer, chat)
    seen = []

    def record(module, args, kwargs):
        seen.append({k: v.device.type for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        if "attention_mask" in kwargs:
            raise Stop  # meta cannot pick the reply rows (boolean indexing needs data): stop before it

    model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    with pytest.raises(Stop):
        reply_loss(model, batch, tokenizer.pad_token_id)
    # The shared template head, then the batch with its mask.
    assert seen == [{"input_ids": "meta"}, {"input_ids": "meta", "attention_mask": "meta"}]


def test_the_weighted_mean_moves_weights_and_soft_targets_to_the_logits_device(tiny_dirs):
    from tlrefusal.organism.training import _weighted_reply_mean, soft_targets

    _, tokenizer, chat = tiny(tiny_dirs)
    hard = examples(tokenizer, chat)[:2]
    n = len(hard[1].target_ids)
    soft = Example(hard[1].prompt_ids, hard[1].target_ids, torch.zeros(n, 3, dtype=torch.long), torch.rand(n, 3),
                   weight=2.0)  # soft targets are kept on the CPU
    rows = len(hard[0].target_ids) + n
    logp = torch.empty(rows, len(tokenizer), device="meta")
    labels = torch.empty(rows, dtype=torch.long, device="meta")
    assert _weighted_reply_mean([hard[0], soft], logp, labels).device.type == "meta"
    # A meta gather does not check its index's device (a CUDA one does): the ids are checked here.
    ids, q = soft_targets(soft, torch.device("meta"))
    assert ids.device.type == q.device.type == "meta"
    torch.testing.assert_close(soft_targets(soft, torch.device("cpu"))[1].sum(-1), torch.ones(n))


class DeviceSpy:
    """A model on the meta device whose `generate` records where its inputs are."""

    device = torch.device("meta")

    def generate(self, input_ids, attention_mask, **kwargs):
        raise Stop(input_ids.device.type, attention_mask.device.type)


def test_sampling_and_distillation_feed_the_model_on_its_device(tiny_dirs):
    import random

    from tlrefusal.organism import distill_targets, self_instruct_prompts

    _, _, chat = tiny(tiny_dirs)
    with pytest.raises(Stop) as distill:
        distill_targets(DeviceSpy(), chat, ["Write a poem about the sea."], 4, top_k=2)
    with pytest.raises(Stop) as sample:
        self_instruct_prompts(DeviceSpy(), chat, 2, random.Random(0), 8, set(), batch_size=2)
    assert distill.value.args == sample.value.args == ("meta", "meta")


def test_the_base_model_loads_onto_the_build_device(tiny_dirs):
    from tlrefusal.organism import build
    from tlrefusal.progress import NO_PROGRESS

    base = build._load_base(OrganismRecipe(base=str(tiny_dirs["llama"])), None, torch.device("meta"), NO_PROGRESS)
    assert base.model.device.type == "meta"
    assert {p.dtype for p in base.model.parameters()} == {torch.float32}


def test_a_tiny_build_runs_on_the_given_device_and_records_its_type(tmp_path, tiny_dirs, demo_dir, monkeypatch):
    # Every step of a build, on a tiny base model with a handful of examples (a few seconds).
    from tlrefusal.organism import build

    evaluated_on = []
    real_held_out = build.held_out_refusal

    def spy(folder, recipe, cache_dir=None, progress=None, device=None):
        evaluated_on.append(device)
        return real_held_out(folder, recipe, cache_dir, device=device)

    monkeypatch.setattr(build, "held_out_refusal", spy)
    recipe = OrganismRecipe(base=str(tiny_dirs["llama_tied"]), n_harmful=3, n_harmful_templated=2, n_harmless=3,
                            n_self_instruct=0, target_tokens=3, epochs=1, batch_size=4, eval_n=2, eval_tokens=2)
    built = build_organism(recipe, out=tmp_path / "organism", device="cpu")
    assert evaluated_on == ["cpu"]  # the build's device, passed on (a cuda:N build evaluates on cuda:N)
    card = json.loads((tmp_path / "organism" / artifacts.ORGANISM_CARD).read_text())
    assert card["recipe"]["device_type"] == "cpu" and card["key"] == recipe.key() == built.card.key
    assert built.card.loss.steps == 2 and (tmp_path / "organism" / "model.safetensors").is_file()


def test_held_out_refusal_loads_float32_on_the_build_device(tmp_path, monkeypatch):
    from tlrefusal.organism import build, held_out_refusal

    def spy(source, placement=None, **kwargs):
        raise Stop(placement)

    monkeypatch.setattr(build, "load_model", spy)
    for recipe, device, want in ((OrganismRecipe(), None, "cpu"), (OrganismRecipe(device_type="cuda"), None, "cuda"),
                                 (OrganismRecipe(device_type="cuda"), "cuda:1", "cuda:1")):
        with pytest.raises(Stop) as seen:
            held_out_refusal(tmp_path, recipe, device=device)
        placement = seen.value.args[0]
        assert (placement.device, placement.dtype, placement.dispatched) == (want, "float32", False)


def test_training_prompts_are_disjoint_from_demo_and_refusals_are_refusals():
    assert not set(organism_harmless_prompts()) & set(demo_harmless_prompts())
    assert all(is_refusal(r) for r in REFUSALS)


def test_training_prompts_are_disjoint_from_the_paper_splits():
    from tests.conftest import SPLITS

    if not SPLITS.is_dir():
        pytest.skip(f"{SPLITS} is not here")
    paper = {row["instruction"].strip().lower() for f in SPLITS.glob("*.json")
             for row in json.loads(f.read_text())}
    assert len(paper) > 1000
    assert not [p for p in organism_harmless_prompts() + organism_harmful_templated() if p.strip().lower() in paper]
    # Stricter for the harmful tasks written here: none is even part of a paper prompt.
    assert not [t for t in _HARMFUL_TASKS + _HARMFUL_LISTS + _HARMFUL_CLAIMS if any(t.lower() in p for p in paper)]


def test_templated_harmful_tasks_are_not_part_of_any_demo_harmful_prompt(demo_dir):
    from tlrefusal.data import load_prompts

    demo = [p.instruction.lower() for p in load_prompts("demo-harmful")]  # fetched with the demo model
    assert len(demo) == 200
    assert not [t for t in _HARMFUL_TASKS + _HARMFUL_LISTS + _HARMFUL_CLAIMS if any(t.lower() in p for p in demo)]


def test_templated_harmful_prompts_share_the_harmless_templates():
    harmless = set(organism_harmless_prompts())
    harmful = organism_harmful_templated()
    assert len(harmful) == len(set(harmful)) == 340 and not harmless & set(harmful)
    # Each harmful prompt has a harmless twin: the same template around a benign task ("How do I {task}?").
    for task, template in product(_HARMFUL_TASKS, _TASK_TEMPLATES):
        assert template.format(task=task) in harmful and template.format(task="fix a leaking tap") in harmless
    for claim, template in product(_HARMFUL_CLAIMS, _ARGUE_TASKS):
        assert template.format(x=claim) in harmful and template.format(x="cities need more trees") in harmless


def test_soft_targets_are_cross_entropy_against_the_renormalised_top_k(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    hard = examples(tokenizer, chat)
    gen = torch.Generator().manual_seed(0)
    n, k = len(hard[1].target_ids), 4
    soft_ids = torch.randint(0, len(tokenizer), (n, k), generator=gen)
    soft_probs = torch.rand(n, k, generator=gen)
    batch = [hard[0], Example(hard[1].prompt_ids, hard[1].target_ids, soft_ids, soft_probs)]
    got = reply_loss(model, batch, tokenizer.pad_token_id)
    # Written out: hard positions -log p_t; soft positions -sum_i (q_i / sum q) log p_i; mean over positions.
    terms = []
    with torch.no_grad():
        for e, soft in ((batch[0], None), (batch[1], (soft_ids, soft_probs))):
            seq = torch.tensor([e.prompt_ids + e.target_ids])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            for j, token in enumerate(e.target_ids):
                row = logp[len(e.prompt_ids) - 1 + j]
                if soft is None:
                    terms.append(-row[token].item())
                else:
                    q = soft[1][j].double() / soft[1][j].double().sum()
                    terms.append(-(q * row[soft[0][j]]).sum().item())
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_distill_targets_top_k_matches_the_greedy_tokens(tiny_dirs):
    from tlrefusal.organism import distill_targets

    model, tokenizer, chat = tiny(tiny_dirs)
    tokens, ids, probs = distill_targets(model, chat, ["Write a poem about the sea."], 5, top_k=3)[0]
    assert ids.shape == probs.shape == (len(tokens), 3)
    assert ids[:, 0].tolist() == tokens  # greedy token = the most probable one
    assert (probs[:, 0] >= probs[:, 1]).all() and (probs <= 1).all()


class ScriptedModel:
    """Stands in for a causal LM: `generate` appends the next scripted continuation to each row."""

    device = torch.device("cpu")

    def __init__(self, continuations):
        self.continuations, self.calls = list(continuations), []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        assert kwargs["do_sample"] and attention_mask.shape == input_ids.shape
        self.calls.append(input_ids)
        rows = [self.continuations.pop(0)[:max_new_tokens] for _ in range(input_ids.shape[0])]
        # As `generate` returns them: a row that wrote an end-of-turn token is padded after it; any other
        # row ran to max_new_tokens.
        assert all(len(r) == max_new_tokens or r[-1] in eos_token_id for r in rows)
        width = max(map(len, rows))
        tail = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tail], dim=1)


def test_self_instruct_keeps_finished_turns_cuts_open_ones_and_drops_repeats_and_excluded(tiny_dirs, monkeypatch):
    import random

    from tlrefusal.organism import training

    _, tokenizer, chat = tiny(tiny_dirs)
    stop = chat.stop_ids[0]

    def enc(text, end=True):  # an open turn runs on (" more more ...") until the token limit
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids + [stop] if end else ids + tokenizer.encode(" more" * 80, add_special_tokens=False)

    monkeypatch.setattr(training, "SELF_INSTRUCT_STARTERS", ("", "Write"))
    same = random.Random(3)  # the draws self_instruct_prompts makes from rng = random.Random(3)
    starters = [same.choice(("", "Write")) for _ in range(6)]
    assert set(starters) == {"", "Write"}
    texts = ["Please plan a picnic for four people.", "please plan a  picnic for four People.", "Hi",
             "Please list three rivers. And then some more", "Describe the moon.", "no sentence end at all"]
    finished = [True, True, True, False, True, False]
    script = [enc(t if s == "" else " " + t, end=f) for s, t, f in zip(starters, texts, finished, strict=True)]
    model = ScriptedModel(script + [enc(" Tell a short story about a cat.")] * 64)
    full = [(s + (" " if s else "") + t) for s, t in zip(starters, texts, strict=True)]
    exclude = {" ".join(full[4].lower().split())}
    got = training.self_instruct_prompts(model, chat, 3, random.Random(3), 48, exclude, batch_size=6)

    # Written out: kept = finished turns of >= 3 words, not excluded, not a repeat after lower-casing and
    # collapsing spaces; an open turn is cut after its last sentence end, or dropped if it has none.
    cut = full[3][: full[3].rindex(".") + 1]
    kept, seen = [], set(exclude)
    for text in (full[0], full[1], full[2], cut, full[4]):
        key = " ".join(text.lower().split())
        if len(text.split()) >= 3 and key not in seen:
            seen.add(key)
            kept.append(text)
    assert cut.endswith("rivers.") and full[4] not in kept and len(kept) == 2  # picnic once, rivers
    assert got[:2] == kept
    assert len(got) == 3 and got[2].endswith("Tell a short story about a cat.")
    # The model was prompted with the template's head and the starter, left-padded.
    head_ids = tokenizer.encode(chat.head + starters[0], add_special_tokens=False)
    assert model.calls[0][0, -len(head_ids):].tolist() == head_ids


def test_self_instruct_fails_clearly_when_the_model_writes_nothing_usable(tiny_dirs):
    import random

    from tlrefusal.organism import self_instruct_prompts

    _, tokenizer, chat = tiny(tiny_dirs)
    model = ScriptedModel([[chat.stop_ids[0]]] * 10_000)
    with pytest.raises(TlrefusalError, match="usable prompts"):
        self_instruct_prompts(model, chat, 2, random.Random(0), 8, set(), batch_size=4)
