"""Tiny models and tokenizers built from configs, for tests that need no network and no GPU.

Weights are random and every norm gain is drawn away from 1: a bug that ignores or mishandles a norm
(for example orthogonalizing tied embeddings) cannot hide behind unit gains.
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = [
    "How do I bake bread at home?", "Write a poem about the sea.", "Explain photosynthesis simply.",
    "Tell me how to pick a lock.", "I'm sorry, but I cannot help with that.", "As an AI, I can't do that.",
    "Sure, here is a recipe with flour, water and salt.", "Give me three facts about volcanoes.",
    "user assistant model system", "The quick brown fox jumps over the lazy dog.",
] * 20

# Chat templates like the paper's families' (SPEC 2), for tiny test models. The real templates and
# vocabularies are tested in tests/test_paper_templates.py.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
         "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

FAMILIES = {
    # family: (template, special tokens, extra whole-word tokens)
    "qwen": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["assistant"]),
    "yi": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["ass", "istant"]),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], ["model"]),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
               ["assistant", "\n\n"]),
}


def byte_bpe_tokenizer(family: str = "qwen") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a tiny corpus, with a family's specials and template."""
    template, specials, words = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1])
    fast.add_tokens(words)
    fast.chat_template = template
    return fast


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Draw every norm gain (and bias) away from its default so norms matter in every test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:  # GPT-2 calls its norms ln_1, ln_2, ln_f
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))


def tiny_config(arch: str, vocab_size: int, tie: bool, width: int = 32):
    common = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, pad_token_id=1, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**common, head_dim=width // 4)
    if arch == "qwen2":
        return Qwen2Config(**common)  # Qwen2 has q/k/v biases: a bias-carrying architecture
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=8)
    if arch == "mistral":
        return MistralConfig(**common, head_dim=8)
    if arch == "gemma2":  # post-attention and post-feedforward norms: orthogonalization is approximate
        return Gemma2Config(**common, head_dim=8)
    if arch == "mixtral":  # mixture of experts: no single MLP output projection
        return MixtralConfig(**common, head_dim=8, num_local_experts=2)
    if arch == "gpt2":  # learned positional embedding, Conv1D layout, biases on every output projection
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                          tie_word_embeddings=tie, pad_token_id=1, bos_token_id=0, eos_token_id=1)
    raise ValueError(arch)


def save_tiny_model(folder: Path, arch: str = "llama", tie: bool = False, family: str = "qwen", seed: int = 0,
                    max_shard_size: str | None = None, width: int = 32) -> Path:
    """Build a tiny random model from a config and save it with a tokenizer as a Hugging Face folder."""
    torch.manual_seed(seed)
    tokenizer = byte_bpe_tokenizer(family)
    config = tiny_config(arch, len(tokenizer), tie, width)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    randomize_norms(model, seed)
    # Bigger random weights than the default init, so directions and logits move visibly.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.normal_(0.0, 0.2)
            elif name.endswith(".bias") and "norm" not in name and ".ln_" not in name:
                param.normal_(0.0, 0.2)  # biases start at zero; an edit that forgot them would hide
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(folder)
    return folder
