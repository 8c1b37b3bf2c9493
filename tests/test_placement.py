"""Where a model loads: checked placements, a model dispatched by accelerate over cpu and disk, quantized loads.

A map over one device installs no accelerate hooks (transformers #43019), so the dispatch test spreads the
tiny model over `cpu` and `disk`: offloaded weights live on disk and accelerate's hooks bring them in for
every forward. Everything tlrefusal computes on that model must equal a plain one-device load.
"""
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks import ablation_hooks, addition_hooks
from tests.tiny import save_tiny_model
from tlrefusal.activations import last_logits, mean_activations
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.generation import greedy_completions
from tlrefusal.model import ModelSource, load_model
from tlrefusal.placement import MIXED_MAP_ERROR, Placement, check_realized_map

PROMPTS = ["How do I bake bread at home?", "Write a poem about the sea.", "Tell me how to pick a lock."]


def write_map(path, n_layers: int, layer_targets) -> str:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": layer_targets[0]}
    device_map.update({f"model.layers.{i}": layer_targets[i % len(layer_targets)] for i in range(n_layers)})
    path.write_text(json.dumps(device_map))
    return str(path)


@pytest.fixture(scope="module")
def dispatched(tiny_dirs, tmp_path_factory):
    """The tiny llama over cpu and disk (layers alternate; lm_head on disk), beside a plain load."""
    root = tmp_path_factory.mktemp("dispatch")
    folder = tiny_dirs["llama"]
    device_map = write_map(root / "map.json", 4, ["disk", "cpu"])
    placement = Placement(device_map=device_map, offload_folder=str(root / "offload"))
    return load_model(ModelSource("x", "local", folder), placement), load_model(ModelSource("x", "local", folder))


def test_the_map_is_really_dispatched(dispatched):
    model, _ = dispatched
    hf = model.bridge.original_model
    assert set(hf.hf_device_map.values()) == {"cpu", "disk"}
    # Offloaded weights are meta placeholders that accelerate's hooks fill in for each forward.
    assert any(p.device.type == "meta" for p in hf.parameters())
    assert any(hasattr(m, "_hf_hook") for m in hf.modules())
    assert model.device == torch.device("cpu")  # the embedding's device: where inputs go


def test_dispatched_model_computes_what_a_plain_load_computes(dispatched):
    model, plain = dispatched
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    for hooks in ([], ablation_hooks(r, model.n_layers), addition_hooks(r, 1, 1.0)):
        torch.testing.assert_close(last_logits(model, chat, PROMPTS, hooks, batch_size=2),
                                   last_logits(plain, chat, PROMPTS, hooks, batch_size=2), rtol=0, atol=1e-5)
    torch.testing.assert_close(mean_activations(model, chat, PROMPTS, batch_size=2),
                               mean_activations(plain, chat, PROMPTS, batch_size=2), rtol=0, atol=1e-6)
    for hooks in ([], ablation_hooks(r, model.n_layers)):
        assert (greedy_completions(model, chat, PROMPTS, 8, hooks, batch_size=2)
                == greedy_completions(plain, chat, PROMPTS, 8, hooks, batch_size=2))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_memory": "0=10GiB"}, "give --device-map too"),
    ({"offload_folder": "x"}, "give --device-map too"),
    ({"device_map": "auto", "max_memory": "0=lots"}, "DEVICE=AMOUNT"),
    ({"device_map": "auto", "max_memory": "gpu0=10GiB"}, "unknown device"),
    ({"device_map": "auto", "max_memory": "0=10GiB,cpu=20GiB"}, "TransformerLens 4.3 refuses"),
    ({"device_map": "no/such/map.json"}, "no file is at"),
    ({"quantize": "int4"}, "unknown --quantize"),
    ({"dtype": "float8"}, "unknown dtype"),
    ({"gpus_per_replica": 0}, "at least 1"),
])
def test_bad_placements_are_refused(kwargs, message):
    with pytest.raises(TlrefusalError, match=message):
        Placement(**kwargs)


def test_map_files_are_checked(tmp_path):
    mixed = write_map(tmp_path / "mixed.json", 2, [0, "cpu"])
    with pytest.raises(TlrefusalError, match="TransformerLens 4.3 refuses"):
        Placement(device_map=mixed)
    on_disk = write_map(tmp_path / "disk.json", 2, ["disk"])
    with pytest.raises(TlrefusalError, match="--offload-folder"):
        Placement(device_map=on_disk)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TlrefusalError, match="module name -> device"):
        Placement(device_map=str(tmp_path / "list.json"))
    (tmp_path / "gpus.json").write_text(json.dumps({"model.layers.0": 0, "model.layers.1": 1}))
    assert Placement(device_map=str(tmp_path / "gpus.json")).map_targets() == {"cuda:0", "cuda:1"}


def test_a_realized_map_that_spills_off_the_gpus_is_refused():
    check_realized_map({"model.layers.0": 0, "model.layers.1": 1})
    check_realized_map({"model.layers.0": "cpu", "model.layers.1": "disk"})
    with pytest.raises(TlrefusalError, match="TransformerLens 4.3 refuses"):
        check_realized_map({"model.layers.0": 0, "model.layers.1": "cpu"})


def test_each_torchrun_rank_gets_its_own_replica(monkeypatch):
    assert Placement().for_local_rank(3) == Placement()  # the CPU: shared by every rank
    assert Placement(device="auto").for_local_rank(1).device == "cpu"  # no GPU here
    with pytest.raises(TlrefusalError, match="torch sees 0 GPU"):
        Placement(device="cuda").for_local_rank(0)
    monkeypatch.setattr("tlrefusal.model.gpu_count", lambda: 4)
    assert [Placement(device="cuda").for_local_rank(k).device for k in range(6)] == \
        ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]  # more ranks than GPUs: shared in turn
    assert Placement(device="cuda:3").for_local_rank(1).device == "cuda:3"  # one GPU named: every rank on it
    assert Placement(device="cuda").for_local_rank(2).first_gpu() == 2
    assert Placement().first_gpu() is None
    split = Placement(device_map="balanced", max_memory="0=10GiB,1=20GiB", gpus_per_replica=2)
    assert split.for_local_rank(1).memory_budget() == {2: "10GiB", 3: "20GiB"}
    assert split.for_local_rank(0).memory_budget() == {0: "10GiB", 1: "20GiB"}
    assert split.for_local_rank(1).first_gpu() == 2
    with pytest.raises(TlrefusalError, match="device map"):
        Placement(device="cuda", gpus_per_replica=2).for_local_rank(0)
    for budget in ("0=10GiB,2=10GiB", "5=1GiB"):  # not the replica's own GPUs 0..K-1
        with pytest.raises(TlrefusalError, match="each replica's own GPUs"):
            Placement(device_map="balanced", max_memory=budget, gpus_per_replica=2).for_local_rank(1)


def test_placement_record_names_only_what_differs_from_a_plain_load():
    assert Placement().to_json() == {"device": "cpu", "dtype": "float32"}
    assert Placement(quantize="nf4").to_json() == {"device": "cpu", "dtype": "float32", "quantize": "nf4"}
    assert Placement(device_map="auto").to_json() == {"dtype": "float32", "device_map": "auto"}  # no unused device


def test_cli_refuses_a_mixed_map_before_making_the_run_folder(tmp_path, tiny_dirs):
    from typer.testing import CliRunner

    from tlrefusal.cli import app

    mixed = write_map(tmp_path / "mixed.json", 4, [0, "cpu"])
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["extract", str(tiny_dirs["llama"]), "--out", str(out), "--device-map", mixed])
    assert result.exit_code == 1
    assert "TransformerLens 4.3 refuses" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert MIXED_MAP_ERROR.split(";")[0] in " ".join(result.output.split())


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install 'tlrefusal[quantize]')")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    # bitsandbytes quantizes in blocks of 64 inputs: the default tiny width (32) is below one block.
    return save_tiny_model(tmp_path_factory.mktemp("wide") / "m", "llama", False, "qwen", width=128)


def dequantized_reference(folder, quantized_hf):
    """A plain float32 transformers model whose linear weights are the quantized model's, dequantized by
    bitsandbytes' own functions (the independent statement of what a 4-bit load computes)."""
    import bitsandbytes as bnb

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    weights = {}
    for name, module in quantized_hf.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            weights[name.replace("._original_component", "") + ".weight"] = w.float()
    loaded = reference.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys and len(weights) == 4 * 7  # q k v o gate up down in every layer
    return reference


@needs_bnb
def test_nf4_load_computes_with_the_dequantized_weights(wide_dir):
    model = load_model(ModelSource("x", "local", wide_dir), Placement(quantize="nf4"))
    reference = dequantized_reference(wide_dir, model.bridge.original_model)  # before any forward repacks them
    ids = torch.tensor([model.tokenizer.encode("How do I bake bread at home?")])
    # With gradients on, bitsandbytes multiplies by its dequantized weights in float32 (exact); under
    # inference_mode its CPU kernel repacks them for a bfloat16 AVX512 path, which rounds differently.
    torch.testing.assert_close(model.bridge(ids), reference(ids).logits, rtol=0, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(wide_dir, dtype=torch.float32).eval()
    assert (model.bridge(ids) - plain(ids).logits).abs().max() > 1e-3  # really quantized


@needs_bnb
def test_int8_load_quantizes_every_linear_and_stays_close(wide_dir):
    import bitsandbytes as bnb

    model = load_model(ModelSource("x", "local", wide_dir), Placement(quantize="int8"))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.bridge.original_model.modules()) == 4 * 7
    plain = AutoModelForCausalLM.from_pretrained(wide_dir, dtype=torch.float32).eval()
    ids = torch.tensor([model.tokenizer.encode("Write a poem about the sea.")])
    with torch.inference_mode():
        a, b = model.bridge(ids).flatten(), plain(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


@needs_bnb
def test_extract_with_quantize_records_it(tmp_path, wide_dir):
    from tlrefusal import artifacts
    from tlrefusal.pipeline import ExtractConfig, run_extract
    from tlrefusal.selection import SelectionConfig

    config = ExtractConfig(model=str(wide_dir), quantize="nf4", n_train=4, n_val=2, filter=False,
                           refusal_token_ids=(5,), selection=SelectionConfig(batch_size=4, kl_threshold=1e9,
                                                                              induce_threshold=-1e9))
    run_extract(config, tmp_path / "run")
    assert artifacts.read_json(tmp_path / "run" / artifacts.CONFIG)["config"]["quantize"] == "nf4"
    assert artifacts.read_json(tmp_path / "run" / artifacts.MANIFEST)["model"]["placement"]["quantize"] == "nf4"
