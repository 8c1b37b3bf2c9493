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


def render_ids(tokenizer, prompts) -> list[list[int]]:
    """Each prompt as one user message through the tokenizer's own chat template (with the generation
    prompt), encoded without special tokens: the template writes any BOS itself."""
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False)
            for p in prompts]


def eoi_count(tokenizer) -> int:
    """SPEC 1.2: the template text after the instruction, tokenized alone."""
    marker = "MARKERTEXT"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    return len(tokenizer.encode(rendered.split(marker)[-1], add_special_tokens=False))


def left_padded(token_lists, pad_id):
    """ids, attention mask and position ids of left-padded rows (positions count real tokens only)."""
    width = max(map(len, token_lists))
    ids = torch.tensor([[pad_id] * (width - len(t)) + list(t) for t in token_lists])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in token_lists])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _on_first(fn):
    """Apply fn to a module's output, or to the first item of a tuple output (HF attention returns a tuple)."""
    def hook(module, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    return hook


def _on_input(fn):
    """A forward pre-hook that applies fn to a decoder layer's hidden-states input, positional or keyword."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def plain_hooks(hf, ablate_dir=None, add_dir=None, add_layer=None, coeff=1.0) -> list:
    """ORIG-style torch hooks on the HF modules: x - (x.r_hat) r_hat with r_hat = r / (||r|| + 1e-8) on every
    decoder layer's input and every attention and MLP output, or x + c r (raw r) on one layer's input."""
    handles = []
    layers = hf.model.layers
    if ablate_dir is not None:
        r = ablate_dir.float()
        r_hat = r / (r.norm() + 1e-8)

        def ablate(x):
            return x - (x @ r_hat).unsqueeze(-1) * r_hat

        for layer in layers:
            handles.append(layer.register_forward_pre_hook(_on_input(ablate), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(_on_first(ablate)))
            handles.append(layer.mlp.register_forward_hook(_on_first(ablate)))
    if add_dir is not None:
        vec = add_dir.float()
        handles.append(layers[add_layer].register_forward_pre_hook(_on_input(lambda x: x + coeff * vec),
                                                                   with_kwargs=True))
    return handles


def reference_logits(hf, tokenizer, prompts, ablate_dir=None, add_dir=None, add_layer=None, coeff=1.0):
    """Last-position logits of one plain, left-padded HF forward over all prompts, under `plain_hooks`."""
    handles = plain_hooks(hf, ablate_dir, add_dir, add_layer, coeff)
    try:
        ids, mask, position_ids = left_padded(render_ids(tokenizer, prompts), tokenizer.pad_token_id)
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()


def reference_means(hf, tokenizer, prompts) -> torch.Tensor:
    """Mean resid_pre (HF hidden_states[l] is the input of layer l) at the last eoi_count positions, one
    unpadded prompt at a time, in float64: [n_pos, n_layer, d_model]."""
    n = eoi_count(tokenizer)
    total = None
    for tokens in render_ids(tokenizer, prompts):
        with torch.no_grad():
            hidden = hf(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states
        acts = torch.stack([h[0, -n:].double() for h in hidden[:-1]], dim=1)  # [n_pos, n_layer, d_model]
        total = acts if total is None else total + acts
    return total / len(prompts)


@pytest.mark.parametrize("arch", ARCHS)
def test_baseline_last_logits_match_plain_hf(arch, tiny_models, tiny_dirs):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    ours = last_logits(model, chat, PROMPTS)
    ref = reference_logits(reference_model(tiny_dirs[arch]), model.tokenizer, PROMPTS)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_hooks_equal_reference_ablation(arch, tiny_models, tiny_dirs):
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)) * 3
    ours = last_logits(model, chat, PROMPTS, ablation_hooks(r, model.n_layers))
    ref = reference_logits(reference_model(tiny_dirs[arch]), model.tokenizer, PROMPTS, ablate_dir=r)
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
        ref = reference_logits(reference_model(tiny_dirs[arch]), model.tokenizer, PROMPTS, add_dir=r, add_layer=layer,
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


def test_mean_recorder_counts_and_rejects_bad_positions():
    rec = MeanRecorder([-2, -1], [0], 4)
    (name, hook), = rec.hooks()
    hook(torch.arange(24.0).reshape(2, 3, 4), None)
    assert rec.count == 2
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.allclose(rec.mean()[:, 0], x[:, 1:].double().mean(0))
    with pytest.raises(ValueError):
        MeanRecorder([0], [0], 4)


# Prompt sets for the shared template head: different lengths (batches of 2 and 1 pad differently), prompts
# that share most of their words (the head runs past the template into the instruction), identical prompts
# (all but the last token shared).
PROMPT_SETS = (PROMPTS, ["Tell me how to pick a lock.", "Tell me how to pick a lock!"], ["Hi", "Hi", "Hi"])


def common_prefix(token_lists) -> int:
    n = 0
    while all(len(t) > n for t in token_lists) and len({t[n] for t in token_lists}) == 1:
        n += 1
    return n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_last_logits_with_a_shared_template_head_equal_plain_hf(arch, tiny_models, tiny_dirs):
    """last_logits runs the head every prompt shares once and reuses its cache (under the same hooks) across
    batches of 2: the logits equal one plain padded HF forward with torch hooks, with no hook, with the
    all-layer ablation and with activation addition."""
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    hf = reference_model(tiny_dirs[arch])
    r = 3 * torch.randn(model.d_model, generator=torch.Generator().manual_seed(4))
    for prompts in PROMPT_SETS:
        assert common_prefix(render_ids(model.tokenizer, prompts)) >= 2  # there is a head to share
        for hooks, ref_kwargs in (([], {}), (ablation_hooks(r, model.n_layers), {"ablate_dir": r}),
                                  (addition_hooks(r, 1, 1.0), {"add_dir": r, "add_layer": 1})):
            ours = last_logits(model, chat, prompts, hooks, batch_size=2)
            ref = reference_logits(hf, model.tokenizer, prompts, **ref_kwargs)
            assert torch.allclose(ours, ref, atol=1e-4), (prompts, ref_kwargs.keys(), (ours - ref).abs().max())


def test_shared_prefix_length_leaves_a_token():
    from tlrefusal.activations import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[7, 8, 9]]) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_mean_activations_equal_mean_of_hf_hidden_states(arch, tiny_models, tiny_dirs):
    """The means (shared head run once, batches of 2 and 1) equal HF hidden states averaged one unpadded prompt
    at a time, also when the prompts share most of their words: the shared head must stop before the recorded
    post-instruction positions."""
    model = tiny_models[arch]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    hf = reference_model(tiny_dirs[arch])
    n = eoi_count(model.tokenizer)
    for prompts in PROMPT_SETS:
        means = mean_activations(model, chat, prompts, batch_size=2)
        expected = reference_means(hf, model.tokenizer, prompts)
        assert means.dtype == torch.float64 and means.shape == (n, model.n_layers, model.d_model)
        assert torch.allclose(means, expected, atol=1e-4), (prompts, (means - expected).abs().max())
