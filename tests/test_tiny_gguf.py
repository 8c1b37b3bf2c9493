"""The tiny GGUF fixtures of tests/tiny_gguf.py: what transformers (and tlrefusal) load from them."""
import numpy as np
import pytest
import torch

from tests.tiny import byte_bpe_tokenizer
from tests.tiny_gguf import TINY_QTYPES, read_gguf_tensors, read_gguf_types, tiny_dims, write_tiny_gguf

# (arch, qtype, tied): llama in every type, both archs tied and untied, both archs in a block type and Q4_K
CASES = ([("llama", q, True) for q in TINY_QTYPES]
         + [("llama", "Q8_0", False), ("llama", "Q4_K", False), ("gpt2", "F32", True), ("gpt2", "Q8_0", True),
            ("gpt2", "Q8_0", False), ("gpt2", "Q4_K", False)])
IDS = [f"{a}-{q}-{'tied' if t else 'untied'}" for a, q, t in CASES]
MESSAGES = [{"role": "user", "content": "How do I bake bread at home?"}]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(path, model, tokenizer) per case, each written and loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, cache = tmp_path_factory.mktemp("tiny_gguf"), {}

    def load(arch, qtype, tied):
        key = (arch, qtype, tied)
        if key not in cache:
            path = write_tiny_gguf(root / f"{arch}-{qtype}-{int(tied)}.gguf", arch, qtype, tied)
            tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name).eval()
            cache[key] = path, model, tokenizer
        return cache[key]

    return load


def hf_param(model, arch: str, gguf_name: str) -> torch.Tensor:
    """The loaded parameter a GGUF tensor became, in the file's (torch Linear) layout."""
    if gguf_name == "output.weight":
        return model.lm_head.weight
    if arch == "llama":
        names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "attn_output.weight": "self_attn.o_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
                 "attn_norm.weight": "input_layernorm.weight",
                 "ffn_norm.weight": "post_attention_layernorm.weight"}
        prefix = "model.layers.{}."
    else:
        names = {"token_embd.weight": "transformer.wte.weight",
                 "position_embd.weight": "transformer.wpe.weight",
                 "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
                 "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
                 "attn_qkv.weight": "attn.c_attn.weight", "attn_norm.weight": "ln_1.weight",
                 "attn_norm.bias": "ln_1.bias", "output_norm.weight": "transformer.ln_f.weight"}
        prefix = "transformer.h.{}."
    if gguf_name.startswith("blk."):
        _, layer, leaf = gguf_name.split(".", 2)
        param = model.get_parameter(prefix.format(layer) + names[leaf])
        # GPT-2's Conv1D holds (in, out); the file and transformers' loader use nn.Linear's (out, in)
        return param.T if arch == "gpt2" and leaf.endswith(".weight") and "norm" not in leaf else param
    return model.get_parameter(names[gguf_name])


@pytest.mark.parametrize("arch,qtype,tied", CASES, ids=IDS)
def test_transformers_loads_the_gguf_and_its_weights_are_the_dequantized_tensors(loaded, arch, qtype, tied):
    path, model, tokenizer = loaded(arch, qtype, tied)
    tensors, types = read_gguf_tensors(path), read_gguf_types(path)
    d_model, d_ff = tiny_dims(arch, qtype)
    assert model.config.model_type == arch and model.config.num_hidden_layers == 2
    assert model.dtype == torch.float32
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), d_model)
    assert tensors["blk.0.ffn_down.weight"].shape == (d_model, d_ff)
    # every matrix in the asked type, every norm and bias F32
    assert {types[n] for n, t in tensors.items() if t.ndim == 2} == {qtype}
    assert {types[n] for n, t in tensors.items() if t.ndim == 1} == {"F32"}
    checked = ["token_embd.weight", "blk.0.attn_output.weight", "blk.1.ffn_down.weight",
               "blk.0.attn_norm.weight", "output_norm.weight"]
    if arch == "gpt2":
        checked += ["position_embd.weight", "blk.0.attn_output.bias", "blk.1.ffn_down.bias",
                    "blk.0.attn_qkv.weight", "blk.0.attn_norm.bias"]
    for name in checked:
        loaded_value = hf_param(model, arch, name).detach().numpy()
        np.testing.assert_array_equal(loaded_value, tensors[name], err_msg=name)
    if arch == "llama":  # llama.cpp interleaves q/k rotary halves; transformers undoes it per head on load
        q = tensors["blk.0.attn_q.weight"]
        head_dim = q.shape[0] // 4
        unpermuted = q.reshape(4, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
        q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(q_proj, unpermuted)
    # realistic magnitudes, Q4_K's hand-made blocks included, and gains away from 1
    for name, values in tensors.items():
        assert np.isfinite(values).all(), name
        if values.ndim == 2:
            assert 0.01 < values.std() < 0.2, (name, values.std())
        elif "norm.weight" in name:
            assert values.min() >= 0.5 and values.max() <= 1.5 and np.abs(values - 1).mean() > 0.1, name
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    assert logits.std() > 0.05  # not a degenerate model


@pytest.mark.parametrize("arch,qtype,tied", CASES, ids=IDS)
def test_tying_follows_the_presence_of_output_weight(loaded, arch, qtype, tied):
    path, model, _ = loaded(arch, qtype, tied)
    tensors = read_gguf_tensors(path)
    embedding, lm_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert model.config.tie_word_embeddings is tied
    assert ("output.weight" not in tensors) is tied
    if tied:
        assert lm_head is embedding or lm_head.data_ptr() == embedding.data_ptr()
    else:
        np.testing.assert_array_equal(lm_head.detach().numpy(), tensors["output.weight"])
        assert not torch.equal(lm_head, embedding)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_gguf_tokenizer_is_the_tiny_tokenizer_with_its_chat_template(loaded, arch):
    _, _, tokenizer = loaded(arch, "Q8_0", True)
    reference = byte_bpe_tokenizer("qwen")
    assert len(tokenizer) == len(reference)
    assert tokenizer.chat_template == reference.chat_template
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_id == reference.eos_token_id
    text = "Tell me how to pick a lock. I'm sorry, but as an assistant I can't.\n<|im_end|>"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    chat = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (tokenizer.apply_chat_template(MESSAGES, **chat)["input_ids"]
            == reference.apply_chat_template(MESSAGES, **chat)["input_ids"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tlrefusal_loads_the_gguf_into_a_bridge_with_the_same_logits(loaded, arch):
    from tlrefusal.model import ModelSource, load_model

    path, model, tokenizer = loaded(arch, "Q8_0", True)
    lm = load_model(ModelSource(str(path), "gguf", path.parent, gguf_file=path.name))
    assert lm.model_type == arch and lm.n_layers == 2 and lm.dtype == torch.float32
    ids = tokenizer("How do I bake bread at home?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        bridged, reference = lm.bridge(ids), model(ids).logits
    assert torch.isfinite(bridged).all()
    torch.testing.assert_close(bridged, reference, atol=1e-4, rtol=1e-4)


def test_q4_k_rows_must_hold_whole_super_blocks(tmp_path):
    from tests.tiny_gguf import random_q4_k

    with pytest.raises(ValueError, match="multiple of 256"):
        random_q4_k((4, 64), np.random.default_rng(0))
