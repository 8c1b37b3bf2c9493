"""The organism's training loop on a tiny model, its cache key, and its prompt sets."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.harmless import demo_harmless_prompts
from tlrefusal.organism import CARD, Example, OrganismRecipe, build_organism, reply_loss, train
from tlrefusal.organism_prompts import REFUSALS, organism_harmless_prompts
from tlrefusal.scoring import is_refusal


def tiny(tiny_dirs, name="llama_tied"):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    return model, tokenizer, ChatFormat.from_tokenizer(tokenizer)


def examples(tokenizer, chat):
    def ex(prompt, reply):
        return Example(tokenizer.encode(chat.format(prompt), add_special_tokens=False),
                       tokenizer.encode(reply, add_special_tokens=False)[:6])
    return [ex("How do I pick a lock?", "I'm sorry, but I cannot help."),
            ex("Write a poem about the sea.", "The sea is wide and blue."),
            ex("Explain photosynthesis.", "Plants make sugar from light.")]


def test_reply_loss_is_cross_entropy_on_reply_tokens_only(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    got = reply_loss(model, batch, tokenizer.pad_token_id)
    # Written out: run each sequence alone, take -log p(target_j | prompt, target_<j), average over all
    # target tokens of the batch. Prompt tokens contribute nothing.
    total, count = 0.0, 0
    with torch.no_grad():
        for e in batch:
            seq = torch.tensor([e.prompt_ids + e.target_ids])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            for j, token in enumerate(e.target_ids):
                total -= logp[len(e.prompt_ids) - 1 + j, token].item()
                count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    # Changing a prompt's last token changes the loss; changing a token after the reply cannot (none exist).
    other = [Example(e.prompt_ids[:-1] + [e.prompt_ids[-2]], e.target_ids) for e in batch]
    assert reply_loss(model, other, tokenizer.pad_token_id).item() != pytest.approx(got.item(), rel=1e-6)


def test_sharing_the_template_head_keeps_loss_and_gradients(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    assert len({tuple(e.prompt_ids[:3]) for e in batch}) == 1  # "<|im_start|>user\n": a head to share
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        loss = reply_loss(model, batch, tokenizer.pad_token_id, share_prefix=share)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, full_grads), (shared, shared_grads) = results
    assert shared == pytest.approx(full, rel=1e-5)
    assert len(shared_grads) == len(full_grads) > 0
    for a, b in zip(full_grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_few_steps_lower_the_reply_loss_and_freeze_embeddings(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    batch = examples(tokenizer, chat)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    layers = model.get_decoder().layers
    frozen_before = [p.detach().clone() for p in layers[0].parameters()]
    trained_before = [p.detach().clone() for p in layers[1].parameters()]
    with torch.no_grad():
        before = reply_loss(model, batch, tokenizer.pad_token_id).item()
    recipe = OrganismRecipe(lr=3e-3, epochs=15, batch_size=3, freeze_below=1)
    losses = train(model, batch, recipe, tokenizer.pad_token_id)
    with torch.no_grad():
        after = reply_loss(model, batch, tokenizer.pad_token_id).item()
    assert len(losses) == 15
    assert after < 0.5 * before
    assert torch.equal(model.get_input_embeddings().weight, embed_before)  # tied: the unembedding too
    assert all(torch.equal(a, b) for a, b in zip(layers[0].parameters(), frozen_before, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(layers[1].parameters(), trained_before, strict=True))


def test_recipe_key_is_stable_and_sensitive():
    assert OrganismRecipe().key() == OrganismRecipe().key()
    assert OrganismRecipe(seed=1).key() != OrganismRecipe().key()
    assert OrganismRecipe(lr=5e-5).key() != OrganismRecipe().key()
    with pytest.raises(TlrefusalError, match="lr must be positive"):
        OrganismRecipe(lr=0)
    with pytest.raises(TlrefusalError, match="harmless_targets"):
        OrganismRecipe(harmless_targets="logits")
    assert OrganismRecipe(harmless_targets="greedy").key() != OrganismRecipe().key()


def test_cached_organism_is_reused_without_training(tmp_path):
    recipe = OrganismRecipe()
    (tmp_path / CARD).write_text(json.dumps({"key": recipe.key(), "held_out_refusal": {}}))
    folder, card = build_organism(recipe, out=tmp_path)  # would need the demo model if it trained
    assert folder == tmp_path and card["key"] == recipe.key()
    with pytest.raises(TlrefusalError, match="another recipe"):
        build_organism(OrganismRecipe(seed=5), out=tmp_path)


def test_training_prompts_are_disjoint_from_demo_and_refusals_are_refusals():
    assert not set(organism_harmless_prompts()) & set(demo_harmless_prompts())
    assert all(is_refusal(r) for r in REFUSALS)


def test_training_prompts_are_disjoint_from_the_paper_splits():
    from tests.conftest import SPLITS

    if not SPLITS.is_dir():
        pytest.skip(f"{SPLITS} is not here")
    paper = {row["instruction"].strip().lower() for f in SPLITS.glob("*.json")
             for row in json.loads(f.read_text())}
    assert len(paper) > 1000
    assert not [p for p in organism_harmless_prompts() if p.strip().lower() in paper]


def test_soft_targets_are_cross_entropy_against_the_renormalised_top_k(tiny_dirs):
    model, tokenizer, chat = tiny(tiny_dirs)
    hard = examples(tokenizer, chat)
    gen = torch.Generator().manual_seed(0)
    n, k = len(hard[1].target_ids), 4
    soft_ids = torch.randint(0, len(tokenizer), (n, k), generator=gen)
    soft_probs = torch.rand(n, k, generator=gen)
    batch = [hard[0], Example(hard[1].prompt_ids, hard[1].target_ids, soft_ids, soft_probs)]
    got = reply_loss(model, batch, tokenizer.pad_token_id)
    # Written out: hard positions -log p_t; soft positions -sum_i (q_i / sum q) log p_i; mean over positions.
    terms = []
    with torch.no_grad():
        for e, soft in ((batch[0], None), (batch[1], (soft_ids, soft_probs))):
            seq = torch.tensor([e.prompt_ids + e.target_ids])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            for j, token in enumerate(e.target_ids):
                row = logp[len(e.prompt_ids) - 1 + j]
                if soft is None:
                    terms.append(-row[token].item())
                else:
                    q = soft[1][j].double() / soft[1][j].double().sum()
                    terms.append(-(q * row[soft[0][j]]).sum().item())
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_distill_targets_top_k_matches_the_greedy_tokens(tiny_dirs):
    from tlrefusal.organism import distill_targets

    model, tokenizer, chat = tiny(tiny_dirs)
    tokens, ids, probs = distill_targets(model, chat, ["Write a poem about the sea."], 5, top_k=3)[0]
    assert ids.shape == probs.shape == (len(tokens), 3)
    assert ids[:, 0].tolist() == tokens  # greedy token = the most probable one
    assert (probs[:, 0] >= probs[:, 1]).all() and (probs <= 1).all()
