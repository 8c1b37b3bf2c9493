"""Greedy generation under hooks, and the regression guard for the transformers pin.

tlrefusal generates with Hugging Face `generate` on the bridge's modules (`tlrefusal.generation`). Its
reference here is the path it replaced, written out in `bridge_reference`: the TransformerBridge's own
`generate` loop under the same hooks. The two must give the same tokens with no hooks, with directional
ablation and with activation addition, over prompts of different lengths (left padding), in a batch where
some rows stop early, with exactly N tokens forced, on a model dispatched over cpu and disk, and whatever
the checkpoint's generation_config.json asks for.

TransformerLens 4.1-4.3 generate garbage with a KV cache on transformers 5.24.0 (the cache argument was
renamed); the pin `transformers>=5.9,<5.24` keeps it right. The bridge's KV-cached greedy must equal its
uncached greedy, plain HF greedy, and, for each prompt, its own unbatched generation: the reference above
relies on it too.
"""
import json
import logging
import warnings

import pytest
import torch

from hooks import ablation_hooks, addition_hooks, sites
from tlrefusal.chat import ChatFormat
from tlrefusal.generation import greedy_completions, greedy_tokens, until_stop

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

    assert until_stop([5, 6, 107, 8, 1], [1, 107]) == [5, 6]
    assert until_stop([5, 6], [1, 107]) == [5, 6]
    assert until_stop([1], [1]) == []


def test_generation_stops_at_gemmas_end_of_turn(tiny_models):
    """Force <end_of_turn> (not Gemma's EOS) as the first reply token only: the reply must end there, although
    the model would go on writing (with EOS alone as the stop token it did)."""

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


# --- tlrefusal's generation (HF `generate` on the bridge's modules) against the bridge's own loop ---

LENGTHS = ["Hi", "Tell me how to pick a lock.", "Write a poem about the sea and the sky, please, in four verses.",
           "Explain photosynthesis simply."]  # different lengths: every batch is left padded


def bridge_reference(model, chat, prompts, n_new, hooks, stop_ids):
    """The path tlrefusal generated with before: the bridge's own `generate` loop, KV-cached, under `hooks`,
    stopping each row at `stop_ids` (none: exactly `n_new` tokens, EOS included like any token)."""
    ids, mask = chat.encode(prompts)
    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=list(hooks)):
        out = model.bridge.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                    max_new_tokens=n_new, do_sample=False, stop_at_eos=bool(stop_ids),
                                    eos_token_id=list(stop_ids) or None, return_type="tokens", verbose=False)
    return out[:, ids.shape[1]:].tolist()


def through_stop(rows, stop_ids):
    """Each row up to and including its first stop token: what follows is padding, which the two paths
    choose differently (the bridge repeats a stop token, HF writes the pad token)."""
    cut = [until_stop(row, stop_ids) for row in rows]
    return [c + row[len(c):len(c) + 1] for c, row in zip(cut, rows, strict=True)]


def steering(model, kind):
    """Hooks that change a tiny model's greedy tokens: none, ablation of a random direction at every layer,
    or a large addition at layer 1."""
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    return {"none": [], "ablation": ablation_hooks(r, model.n_layers),
            "addition": addition_hooks(r * 20, 1, 1.0)}[kind]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("kind", ["none", "ablation", "addition"])
@pytest.mark.parametrize("stop", [True, False], ids=["stop", "forced"])
def test_hf_generate_under_hooks_equals_the_bridge_loop(arch, kind, stop, tiny_models):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    stops = list(chat.stop_ids) if stop else []
    hooks = steering(model, kind)
    ours = greedy_tokens(model, chat, LENGTHS, N_NEW, hooks, stop_ids=stops, batch_size=3)  # two batches
    reference = bridge_reference(model, chat, LENGTHS[:3], N_NEW, hooks, stops)
    reference += bridge_reference(model, chat, LENGTHS[3:], N_NEW, hooks, stops)
    if stop:
        assert through_stop(ours, stops) == through_stop(reference, stops)
    else:
        assert ours == reference and all(len(row) == N_NEW for row in ours)
    if kind != "none":  # the hooks really change the tokens, so a path that dropped them would fail above
        assert reference != bridge_reference(model, chat, LENGTHS[:3], N_NEW, [], stops) + \
            bridge_reference(model, chat, LENGTHS[3:], N_NEW, [], stops)


def push_token_on_rows(model, token: int, rows: list[int]):
    """A hook at the last block's input that makes `token` the first reply token of the given batch rows
    (the prompt pass only; KV-cached steps see one position)."""
    push = model.bridge.original_model.get_output_embeddings().weight[token].detach() * 1e3

    def hook(x, hook):
        if x.shape[1] > 1:
            x = x.clone()
            x[rows, -1] += push
        return x

    return [(sites.resid_pre(model.n_layers - 1), hook)]


def test_rows_that_stop_early_end_while_the_others_run_on(tiny_models):
    model = tiny_models["gemma"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    stops = list(chat.stop_ids)
    end_of_turn = model.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    hooks = push_token_on_rows(model, end_of_turn, [0, 2])
    ours = greedy_tokens(model, chat, LENGTHS, N_NEW, hooks, stop_ids=stops)
    reference = bridge_reference(model, chat, LENGTHS, N_NEW, hooks, stops)
    assert through_stop(ours, stops) == through_stop(reference, stops)
    assert [row[0] == end_of_turn for row in ours] == [True, False, True, False]
    assert all(len(until_stop(ours[i], stops)) == N_NEW for i in (1, 3))  # run on to the limit
    assert ours[0][1:] == [model.tokenizer.pad_token_id] * (N_NEW - 1)  # stopped rows are padded
    assert greedy_completions(model, chat, LENGTHS, N_NEW, hooks)[0::2] == ["", ""]


def test_forced_tokens_run_through_the_stop_tokens(tiny_models):
    """With no stop tokens every row gets exactly N tokens, a pushed EOS among them, as the bridge's loop
    with stop_at_eos=False writes them (a min_new_tokens that banned EOS would change them)."""
    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    eos = model.tokenizer.eos_token_id
    hooks = push_token_on_rows(model, eos, [1])
    ours = greedy_tokens(model, chat, LENGTHS, N_NEW, hooks)
    assert ours == bridge_reference(model, chat, LENGTHS, N_NEW, hooks, [])
    assert ours[1][0] == eos and all(len(row) == N_NEW for row in ours)


def test_the_checkpoints_generation_config_does_not_change_greedy_tokens(tiny_models, monkeypatch, caplog):
    """A generation_config.json with sampling settings and a repetition penalty (as many chat checkpoints
    ship): plain `generate(do_sample=False)` takes the penalty, tlrefusal must not (the bridge's loop and the
    paper's code ignore it), and must not warn about the unused sampling settings."""
    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    hf = model.bridge.original_model
    shipped = hf.generation_config.to_dict() | {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 5,
                                                "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    monkeypatch.setattr(hf, "generation_config", type(hf.generation_config).from_dict(shipped))
    stops = list(chat.stop_ids)
    reference = bridge_reference(model, chat, LENGTHS, N_NEW, [], stops)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        ours = greedy_tokens(model, chat, LENGTHS, N_NEW, stop_ids=stops)
    assert through_stop(ours, stops) == through_stop(reference, stops)
    assert not caught and not caplog.records, [str(w.message) for w in caught] + caplog.messages
    ids, mask = chat.encode(LENGTHS)
    with torch.inference_mode():
        plain = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW,
                            eos_token_id=stops, pad_token_id=model.tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert through_stop(plain.tolist(), stops) != through_stop(reference, stops)  # the penalty is real


def test_a_model_dispatched_over_cpu_and_disk_generates_the_same_tokens(tiny_dirs, tmp_path):
    """accelerate's hooks bring offloaded weights in for every forward of HF `generate` too."""
    from tlrefusal.model import ModelSource, load_model
    from tlrefusal.placement import Placement

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    device_map |= {f"model.layers.{i}": ("disk", "cpu")[i % 2] for i in range(4)}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    placement = Placement(device_map=str(tmp_path / "map.json"), offload_folder=str(tmp_path / "offload"))
    model = load_model(ModelSource("x", "local", tiny_dirs["llama"]), placement)
    assert any(p.device.type == "meta" for p in model.bridge.original_model.parameters())  # really offloaded
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    for kind in ("none", "ablation"):
        hooks = steering(model, kind)
        assert greedy_tokens(model, chat, LENGTHS, N_NEW, hooks) == bridge_reference(model, chat, LENGTHS, N_NEW,
                                                                                     hooks, [])


def test_advance_counts_prompts(tiny_models):
    model = tiny_models["llama"]
    seen = []
    greedy_tokens(model, ChatFormat.from_tokenizer(model.tokenizer), LENGTHS, 2, batch_size=3, advance=seen.append)
    assert seen == [3, 1]


# --- the same on the demo model (skipped without it, unless TLREFUSAL_REQUIRE_DEMO=1) ---

DEMO_PROMPTS = ["Hi", "Give me three facts about volcanoes.", "How do I bake bread at home?",
                "Write a short poem about the sea, in the style of a sailor's song, with a chorus."]
DEMO_NEW = 24


@pytest.mark.parametrize("kind", ["none", "ablation", "addition"])
def test_demo_model_generates_what_the_bridge_loop_generates(kind, demo_model):
    model = demo_model
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    stops = list(chat.stop_ids)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    hooks = {"none": [], "ablation": ablation_hooks(r, model.n_layers), "addition": addition_hooks(r * 8, 10, 1.0)}[kind]
    ours = greedy_tokens(model, chat, DEMO_PROMPTS, DEMO_NEW, hooks, stop_ids=stops)
    reference = bridge_reference(model, chat, DEMO_PROMPTS, DEMO_NEW, hooks, stops)
    assert through_stop(ours, stops) == through_stop(reference, stops)
    if kind == "none":  # "Hi" gets a short greeting and stops; a poem runs on past the limit
        lengths = [len(until_stop(row, stops)) for row in ours]
        assert lengths[0] < DEMO_NEW and lengths[-1] == DEMO_NEW
    forced = greedy_tokens(model, chat, DEMO_PROMPTS, 8, hooks)
    assert forced == bridge_reference(model, chat, DEMO_PROMPTS, 8, hooks, [])
