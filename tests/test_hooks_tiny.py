"""Hook interventions on tiny bridges equal the same math done with plain torch hooks on plain HF models.

The reference side never touches TransformerLens: it registers ORIG-style torch hooks (pre-hook on each
decoder block, forward hooks on each attention and MLP module) on an independently loaded HF model.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks import MeanRecorder, ablation_hooks, addition_hooks, sites
from tlrefusal.activations import last_logits, mean_activations
from tlrefusal.chat import ChatFormat

PROMPTS = ["How do I bake bread at home?", "Write a poem about the sea.", "Explain photosynthesis simply please."]
ARCHS = ["llama", "llama_tied", "qwen2", "gemma"]


def reference_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def reference_logits(hf, chat, prompts, ablate_dir=None, add_dir=None, add_layer=None, coeff=1.0):
    """Plain HF forward with torch hooks: x - (x.r_hat) r_hat at every writer, or x + c r at one layer."""
    handles = []
    layers = hf.model.layers
    if ablate_dir is not None:
        r_hat = ablate_dir / ablate_dir.norm()

        def ablate(x):
            return x - (x @ r_hat).unsqueeze(-1) * r_hat

        for layer in layers:
            handles.append(layer.register_forward_pre_hook(lambda m, args: (ablate(args[0]), *args[1:])))
            handles.append(layer.self_attn.register_forward_hook(lambda m, a, out: (ablate(out[0]), *out[1:])))
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out: ablate(out)))
    if add_dir is not None:
        handles.append(layers[add_layer].register_forward_pre_hook(
            lambda m, args: (args[0] + coeff * add_dir, *args[1:])))
    try:
        ids, mask = chat.encode(prompts)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_baseline_last_logits_match_plain_hf(arch, tiny_models, tiny_dirs):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    ours = last_logits(model, chat, PROMPTS)
    ref = reference_logits(reference_model(tiny_dirs[arch]), chat, PROMPTS)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_hooks_equal_reference_ablation(arch, tiny_models, tiny_dirs):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)) * 3
    ours = last_logits(model, chat, PROMPTS, ablation_hooks(r, model.n_layers))
    ref = reference_logits(reference_model(tiny_dirs[arch]), chat, PROMPTS, ablate_dir=r)
    base = last_logits(model, chat, PROMPTS)
    assert (ours - base).abs().max() > 1e-2  # the intervention does something
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_addition_hook_equals_reference_addition(arch, tiny_models, tiny_dirs):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))
    for layer, coeff in [(0, 1.0), (2, -1.0)]:
        ours = last_logits(model, chat, PROMPTS, addition_hooks(r, layer, coeff))
        ref = reference_logits(reference_model(tiny_dirs[arch]), chat, PROMPTS, add_dir=r, add_layer=layer,
                               coeff=coeff)
        assert torch.allclose(ours, ref, atol=1e-4), (layer, (ours - ref).abs().max())


def test_ablation_leaves_every_residual_orthogonal(tiny_models):
    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    r_hat = r / r.norm()
    seen = {}

    def record(name):
        def hook(x, hook):
            seen[name] = (x.double() @ r_hat.double()).abs().max().item() / x.norm(dim=-1).max().item()
        return hook

    probes = [(f"blocks.{layer}.hook_{s}", record(f"{layer}.{s}")) for layer in range(model.n_layers)
              for s in ("resid_mid", "resid_post")]
    ids, mask = chat.encode(PROMPTS)
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=ablation_hooks(r, model.n_layers) + probes):
        model.bridge(ids, attention_mask=mask)
    assert len(seen) == 2 * model.n_layers
    assert max(seen.values()) < 1e-5, seen


def test_hook_sites_are_the_legacy_aliases():
    assert sites.resid_pre(3) == "blocks.3.hook_resid_pre"
    assert sites.attn_out(0) == "blocks.0.hook_attn_out"
    assert sites.mlp_out(7) == "blocks.7.hook_mlp_out"
    assert len(sites.residual_writers(4)) == 12


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_mean_activations_equal_mean_of_hf_hidden_states(arch, tiny_models, tiny_dirs):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    means = mean_activations(model, chat, PROMPTS, batch_size=2)  # batches of 2 and 1: padding differs
    hf = reference_model(tiny_dirs[arch])
    n = len(chat.positions)
    expected = torch.zeros_like(means)
    for prompt in PROMPTS:  # one prompt at a time: no padding at all
        ids, mask = chat.encode([prompt])
        with torch.no_grad():
            hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in range(model.n_layers):  # hidden_states[l] is the input of block l
            expected[:, layer] += hidden[layer][0, -n:].double() / len(PROMPTS)
    assert means.dtype == torch.float64 and means.shape == (n, model.n_layers, model.d_model)
    assert torch.allclose(means, expected, atol=1e-4), (means - expected).abs().max()


def test_mean_recorder_counts_and_rejects_bad_positions():
    rec = MeanRecorder([-2, -1], [0], 4)
    (name, hook), = rec.hooks()
    hook(torch.arange(24.0).reshape(2, 3, 4), None)
    assert rec.count == 2
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.allclose(rec.mean()[:, 0], x[:, 1:].double().mean(0))
    with pytest.raises(ValueError):
        MeanRecorder([0], [0], 4)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_shared_template_head_gives_the_same_logits(arch, tiny_models):
    from tlrefusal.activations import shared_prefix_length

    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    assert shared_prefix_length(chat.tokenize(PROMPTS)) >= 2  # the template's head, e.g. '<|im_start|>user\n'
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(4))
    for hooks in ([], ablation_hooks(r, model.n_layers), addition_hooks(r, 1, 1.0)):
        shared = last_logits(model, chat, PROMPTS, hooks, batch_size=2)
        plain = last_logits(model, chat, PROMPTS, hooks, batch_size=2, share_prefix=False)
        assert torch.allclose(shared, plain, atol=1e-4), (shared - plain).abs().max()


def test_shared_prefix_length_leaves_a_token():
    from tlrefusal.activations import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[7, 8, 9]]) == 2


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_mean_activations_with_a_shared_head_equal_full_passes(arch, tiny_models):
    """The template head runs once; the means equal full passes, also when prompts share most of their words
    (the head must stop before the recorded post-instruction positions; identical prompts share all but one)."""
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    for prompts in (PROMPTS, ["Tell me how to pick a lock.", "Tell me how to pick a lock!"], ["Hi", "Hi", "Hi"]):
        shared = mean_activations(model, chat, prompts, batch_size=2)
        full = mean_activations(model, chat, prompts, batch_size=2, share_prefix=False)
        assert torch.allclose(shared, full, atol=1e-4), (shared - full).abs().max()
