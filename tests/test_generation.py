"""Regression guard for the transformers pin: TransformerBridge's KV-cached greedy generation.

TransformerLens 4.1-4.3 generate garbage with a KV cache on transformers 5.24.0 (the cache argument was
renamed); the pin `transformers>=5.9,<5.24` keeps it right. KV-cached greedy must equal uncached greedy,
plain HF greedy, and, for each prompt, its own unbatched generation.
"""
import pytest
import torch

from tlrefusal.chat import ChatFormat

PROMPTS = ["Hi", "Write a poem about the sea and the sky, please.", "Explain photosynthesis simply."]
N_NEW = 8


def bridge_greedy(model, ids, mask, use_cache):
    out = model.bridge.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False,
                                use_past_kv_cache=use_cache, return_type="tokens", verbose=False)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kv_cached_greedy_equals_uncached_hf_and_unbatched(arch, tiny_models):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    ids, mask = chat.encode(PROMPTS)
    with torch.no_grad():
        cached = bridge_greedy(model, ids, mask, use_cache=True)
        uncached = bridge_greedy(model, ids, mask, use_cache=False)
        hf = model.bridge.original_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW,
                                                   do_sample=False, min_new_tokens=N_NEW)[:, ids.shape[1]:]
        singles = [bridge_greedy(model, *chat.encode([p]), use_cache=True)[0] for p in PROMPTS]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, hf)
    assert torch.equal(cached, torch.stack(singles))
    assert len(set(map(tuple, cached.tolist()))) > 1  # not one degenerate continuation for every prompt


def test_transformers_version_is_in_the_verified_range():
    import transformers
    from packaging.version import Version

    assert Version("5.9") <= Version(transformers.__version__) < Version("5.24")


def test_greedy_completions_match_hf_and_apply_hooks(tiny_models):
    from hooks import addition_hooks
    from tlrefusal.generation import greedy_completions

    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    ours = greedy_completions(model, chat, PROMPTS, N_NEW)
    ids, mask = chat.encode(PROMPTS)
    with torch.no_grad():
        hf = model.bridge.original_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW,
                                                   do_sample=False)[:, ids.shape[1]:]
    eos = model.tokenizer.eos_token_id
    expected = [model.tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
                for row in hf.tolist()]
    assert ours == expected
    push = torch.randn(model.d_model, generator=torch.Generator().manual_seed(9)) * 20
    steered = greedy_completions(model, chat, PROMPTS, N_NEW, addition_hooks(push, 1, 1.0))
    assert steered != ours


def test_until_stop_cuts_at_the_first_stop_token():
    from tlrefusal.generation import until_stop

    assert until_stop([5, 6, 107, 8, 1], [1, 107]) == [5, 6]
    assert until_stop([5, 6], [1, 107]) == [5, 6]
    assert until_stop([1], [1]) == []


def test_generation_stops_at_gemmas_end_of_turn(tiny_models):
    """Force <end_of_turn> (not Gemma's EOS) as the first reply token only: the reply must end there, although
    the model would go on writing (with EOS alone as the stop token it did)."""
    from hooks import sites
    from tlrefusal.generation import greedy_completions

    model = tiny_models["gemma"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    end_of_turn = model.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != model.tokenizer.eos_token_id and end_of_turn in chat.stop_ids
    push = model.bridge.original_model.get_output_embeddings().weight[end_of_turn].detach() * 1e3

    def first_step_only(x, hook):
        if x.shape[1] > 1:  # the prompt pass; later KV-cached steps see one position
            x = x.clone()
            x[:, -1] += push
        return x

    hooks = [(sites.resid_pre(model.n_layers - 1), first_step_only)]
    assert greedy_completions(model, chat, PROMPTS, N_NEW, hooks) == [""] * len(PROMPTS)
    ids = chat.encode(PROMPTS[:1])[0]
    with model.bridge.hooks(fwd_hooks=hooks):
        unstopped = model.bridge.generate(ids, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False,
                                          return_type="tokens", verbose=False)[0, ids.shape[1]:].tolist()
    assert unstopped[0] == end_of_turn  # the push works, and without the stop the model writes on:
    assert model.tokenizer.decode(unstopped[1:], skip_special_tokens=True).strip()


def test_stop_at_eos_only_runs_past_gemmas_end_of_turn_like_plain_hf_generate(tiny_models):
    """`stop="eos"` (the original code): the same push makes <end_of_turn> the first reply token, and the reply
    goes on to EOS or the length limit. Reference: plain HF `generate` on the Hugging Face modules, greedy,
    stopping at the tokenizer's EOS, the push added by a torch pre-hook written here."""
    from tlrefusal.generation import greedy_completions

    model = tiny_models["gemma"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    tok = model.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    hf = model.bridge.original_model
    push = hf.get_output_embeddings().weight[end_of_turn].detach() * 1e3

    def first_step_only(x, hook):  # at the last block's input, as the pre-hook below
        if x.shape[1] > 1:
            x = x.clone()
            x[:, -1] += push
        return x

    def plain_pre_hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.shape[1] > 1:
            hidden = hidden.clone()
            hidden[:, -1] += push
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    from hooks import sites

    ours = greedy_completions(model, chat, PROMPTS, N_NEW, [(sites.resid_pre(model.n_layers - 1), first_step_only)],
                              stop="eos")
    ids, mask = chat.encode(PROMPTS)
    handle = hf.model.layers[model.n_layers - 1].register_forward_pre_hook(plain_pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    finally:
        handle.remove()
    rows = out.tolist()
    assert all(row[0] == end_of_turn for row in rows)  # the push works in the reference too
    eos = tok.eos_token_id
    expected = [tok.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
                for row in rows]
    assert ours == expected
    assert any(expected)  # replies run on past <end_of_turn> (with stop="turn" they are all empty)
