"""Post-instruction tokens and refusal tokens from chat templates (SPEC 1.2, 2), with test-built tokenizers."""
import pytest

from tests.tiny import FAMILIES, byte_bpe_tokenizer, sentencepiece_like_llama2_tokenizer
from tlrefusal.chat import ChatFormat, refusal_phrases_for
from tlrefusal.errors import TlrefusalError


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eoi_token_counts_match_spec(family):
    chat = ChatFormat.from_tokenizer(byte_bpe_tokenizer(family))
    expected = FAMILIES[family][3]
    assert len(chat.eoi_ids) == expected
    assert chat.positions == list(range(-expected, 0))
    # In context the prompt ends with exactly these tokens, so positions -n..-1 are the eoi tokens.
    ids, _ = chat.encode(["Write a poem about the sea."])
    assert tuple(ids[0, -expected:].tolist()) == chat.eoi_ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_instruction_and_suffix_make_the_whole_prompt(family):
    chat = ChatFormat.from_tokenizer(byte_bpe_tokenizer(family))
    assert chat.head + "Write a poem." + chat.suffix == chat.format("Write a poem.")
    assert "Write" not in chat.head


def test_spec_eoi_tokens_read_as_in_the_paper():
    assert ChatFormat.from_tokenizer(byte_bpe_tokenizer("yi")).eoi_tokens[3:5] == ["ass", "istant"]
    assert ChatFormat.from_tokenizer(byte_bpe_tokenizer("llama3")).eoi_tokens == [
        "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"]
    assert ChatFormat.from_tokenizer(byte_bpe_tokenizer("gemma")).eoi_tokens == [
        "<end_of_turn>", "Ċ", "<start_of_turn>", "model", "Ċ"]


def test_llama2_template_gives_six_tokens_and_space_merged_refusal_token():
    tok = sentencepiece_like_llama2_tokenizer()
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.eoi_tokens == ["▁", "▁[", "/", "INST", "]", "▁"]
    # ORIG's Llama-2 refusal id is '▁I' (306): the template's trailing space merges into the 'I'.
    assert tok.convert_ids_to_tokens(chat.refusal_token_ids(("I",))) == ["▁I"]


def test_refusal_tokens_are_first_tokens_of_phrases():
    tok = byte_bpe_tokenizer("qwen")
    chat = ChatFormat.from_tokenizer(tok)
    ids = chat.refusal_token_ids(("I", "As", "I"))
    assert tok.convert_ids_to_tokens(ids) == ["I", "As"]


def test_paper_phrases_by_model_type():
    assert refusal_phrases_for("qwen") == ("I", "As")
    assert refusal_phrases_for("llama") == ("I",)
    assert refusal_phrases_for("gemma") == ("I",)
    assert refusal_phrases_for("mistral") == ("I", "As")


def test_no_template_is_an_error():
    tok = byte_bpe_tokenizer("qwen")
    tok.chat_template = None
    with pytest.raises(TlrefusalError, match="no chat template"):
        ChatFormat.from_tokenizer(tok)


def test_template_with_nothing_after_instruction_is_an_error():
    tok = byte_bpe_tokenizer("qwen")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TlrefusalError, match="nothing after the instruction"):
        ChatFormat.from_tokenizer(tok)


def test_left_padding_and_explicit_mask(tiny_models):
    chat = ChatFormat.from_tokenizer(tiny_models["llama"].tokenizer)
    ids, mask = chat.encode(["Hi", "Write a much longer poem about the sea and the sky."])
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert tuple(ids[0, -len(chat.eoi_ids):].tolist()) == chat.eoi_ids


@pytest.mark.parametrize(("family", "marker"), [("qwen", "<|im_end|>"), ("yi", "<|im_end|>"),
                                                ("gemma", "<end_of_turn>"), ("llama3", "<|eot_id|>")])
def test_stop_ids_hold_eos_and_the_templates_end_of_turn(family, marker):
    tok = byte_bpe_tokenizer(family)
    chat = ChatFormat.from_tokenizer(tok)
    assert tok.eos_token_id in chat.stop_ids
    assert tok.convert_tokens_to_ids(marker) in chat.stop_ids  # Gemma and Llama-3 end turns with a non-EOS token


def test_stop_ids_without_a_special_end_of_turn_are_eos_only():
    tok = sentencepiece_like_llama2_tokenizer()
    assert ChatFormat.from_tokenizer(tok).stop_ids == (tok.eos_token_id,)
