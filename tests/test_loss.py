"""CE loss (issue 15, item 7; SPEC 1.10): the original's loss mask and the token-weighted mean, checked
against masks written out here by hand and plain Hugging Face forward passes.

The original code tokenizes template + reply as ONE string and scores the tokens after the first run of
post-instruction (eoi) tokens, found exactly or, for a 6-token eoi, with at least 4 of 6 matching.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_paper_templates import real_chat
from tlrefusal.chat import ChatFormat
from tlrefusal.evaluation.loss import LossSequence, ce_loss, eoi_end, reply_sequence, text_sequence


def test_eoi_end_follows_the_originals_scan():
    assert eoi_end([9, 1, 2, 3, 7, 8], (1, 2, 3)) == 4  # exact: the first target is right after the run
    assert eoi_end([9, 1, 2, 3, 7, 8], (1, 2, 4)) is None  # no fuzzy match below 6 tokens
    assert eoi_end([9, 1, 2, 3, 4, 0, 7], (1, 2, 3, 4, 5)) is None  # 4 of 5: still not for a 5-token eoi
    six = (1, 2, 3, 4, 5, 6)
    assert eoi_end([9, 9, 1, 2, 3, 4, 8, 8, 7], six) == 8  # 4 of 6 match: accepted
    assert eoi_end([9, 9, 1, 2, 3, 8, 8, 8, 7], six) is None  # 3 of 6: not
    # Scanning from the start: a fuzzy run before an exact one wins, as in the original.
    assert eoi_end([0, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7], six) == 6
    assert eoi_end([1, 2], six) is None  # shorter than the eoi


def test_llama2_reply_is_tokenized_with_its_template_and_masked_like_the_original():
    """The real Llama-2-chat template ('<s>[INST] {x} [/INST]', plus the appended ' ') on the real vocabulary."""
    chat = real_chat("llama2")
    tok = chat.tokenizer
    # SPEC 2: the six post-instruction tokens of ' [/INST] ' tokenized alone.
    assert tok.convert_ids_to_tokens(list(chat.eoi_ids)) == ["▁", "▁[", "/", "INST", "]", "▁"]
    seq = reply_sequence(chat, "Hi", "Sure, here")
    # '<s>[INST] Hi [/INST] Sure, here' as one string: ']' and '▁Sure' meet, no lone '▁' between them.
    assert tok.convert_ids_to_tokens(seq.ids) == ["<s>", "▁[", "INST", "]", "▁Hi", "▁[", "/", "INST", "]", "▁Sure",
                                                  ",", "▁here"]
    # The eoi run is found only fuzzily at index 4 ('▁Hi' '▁[' '/' 'INST' ']' '▁Sure': 4 of 6 match), so the
    # original scores from index 4 + 6 = 10: ',' and '▁here'. '▁Sure' is not scored.
    assert seq.first_target == 10
    assert tok.convert_ids_to_tokens(seq.ids[seq.first_target:]) == [",", "▁here"]
    # Apart, prompt and reply give another sequence: the prompt's lone '▁', then '▁Sure'.
    apart = chat.prompt_ids("Hi") + tok.encode("Sure, here", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(apart[8:]) == ["]", "▁", "▁Sure", ",", "▁here"]
    assert reply_sequence(chat, "Hi", "") is None  # nothing to score


def plain_nll(hf, ids: list[int]) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) for t = 1 .. len - 1, from one unpadded plain forward pass."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def test_ce_loss_equals_a_plain_forward_pass_with_the_mask_built_by_hand(tiny_models, tiny_dirs):
    """ChatML (the tiny model's template): the instruction's tokens end with '<|im_end|>' '\\n' '<|im_start|>'
    'assistant' '\\n', and the reply's tokens follow them unchanged; the scored targets are the reply's
    tokens, and for raw text every token after the first."""
    model = tiny_models["llama"]
    tok = model.tokenizer
    chat = ChatFormat.from_tokenizer(tok)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    cases = [("Write a poem about the sea.", "The sea is wide and blue."), ("Hi", "Sure, here is a recipe.")]
    expected_sum, expected_n, seqs = 0.0, 0, []
    for instruction, reply in cases:
        text = f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tok.encode(text, add_special_tokens=False)
        reply_ids = tok.encode(reply, add_special_tokens=False)
        ids = tok.encode(text + reply, add_special_tokens=False)
        assert ids == prompt_ids + reply_ids  # so the reply's tokens are ids[len(prompt_ids):]
        assert tok.convert_ids_to_tokens(prompt_ids[-5:]) == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
        nll = plain_nll(hf, ids)[len(prompt_ids) - 1:]  # nll[t - 1] scores token t
        expected_sum, expected_n = expected_sum + nll.sum().item(), expected_n + len(reply_ids)
        seqs.append(reply_sequence(chat, instruction, reply))
        assert seqs[-1].ids == ids
    pile = tok.encode("The quick brown fox.", add_special_tokens=True)
    expected_sum += plain_nll(hf, pile).sum().item()
    expected_n += len(pile) - 1
    seqs.append(text_sequence(tok, "The quick brown fox."))
    result = ce_loss(model, seqs, batch_size=2)  # left padding across sequences of different lengths
    assert (result.tokens, result.sequences) == (expected_n, 3)
    assert result.loss == pytest.approx(expected_sum / expected_n, abs=1e-4)
    assert result.perplexity == pytest.approx(torch.exp(torch.tensor(expected_sum / expected_n)).item(), rel=1e-4)
    with pytest.raises(ValueError):
        LossSequence([1, 2], 2)
