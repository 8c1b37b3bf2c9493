"""The paper's filters and choice (SPEC 1.6) on hand-made score tables, and candidate scoring against plain HF
forwards with torch hooks and the formulas written out."""
import math

import pytest
import torch

from tests.test_hooks_tiny import eoi_count, reference_logits, reference_model
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.selection import (
    CandidateScore,
    SelectionConfig,
    SelectionResult,
    candidate_groups,
    candidate_table,
    choose,
    score_candidates,
    score_groups,
    scored_keys,
)

NAN = float("nan")


@pytest.mark.parametrize("n_layers,last_kept", [(18, 13), (24, 18), (28, 21), (32, 24), (40, 31)])
def test_layer_filter_matches_spec_table(n_layers, last_kept):
    assert SelectionConfig().first_pruned_layer(n_layers) == last_kept + 1


def test_filters_in_order_and_min_bypass_wins():
    cands = [
        CandidateScore(-1, 0, -5.0, 1.0, 0.05),   # kept
        CandidateScore(-1, 1, -9.0, 1.0, 0.20),   # kl too high
        CandidateScore(-1, 2, -8.0, -0.5, 0.01),  # induce < 0
        CandidateScore(-2, 0, -6.0, 0.1, 0.09),   # kept, best bypass
        CandidateScore(-2, 1, NAN, 1.0, 0.01),    # nan
        CandidateScore(-2, 9, -99.0, 5.0, 0.0),   # layer 9 >= int(10 * 0.8) = 8
    ]
    result = choose(cands, n_layers=10, config=SelectionConfig())
    reasons = [c.filtered for c in result.candidates]
    assert reasons == [None, "kl > 0.1", "induce < 0.0", None, "nan score", "layer >= 8"]
    assert (result.chosen.position, result.chosen.layer) == (-2, 0)
    assert result.filter_counts() == {"kept": 2, "kl > 0.1": 1, "induce < 0.0": 1, "nan score": 1,
                                      "layer >= 8": 1}
    assert [c.layer for c in result.survivors()] == [0, 0]


def test_filter_boundaries_follow_the_spec_comparisons():
    """SPEC 1.6: discard l >= int(L * 0.8), kl > 0.1, induce < 0.0; so l = int(L * 0.8) - 1, kl == 0.1 and
    induce == 0.0 survive. Ties in bypass keep the table's order."""
    n_layers = 10  # int(10 * 0.8) = 8
    cands = [
        CandidateScore(-1, 7, -3.0, 0.0, 0.1),   # every boundary, kept
        CandidateScore(-1, 8, -9.0, 1.0, 0.0),   # first pruned layer
        CandidateScore(-2, 7, -3.0, 1.0, 0.0),   # same bypass as the first: kept, ranked after it
        CandidateScore(-2, 6, -2.0, 1.0, 0.1000001),
        CandidateScore(-2, 5, -2.5, -1e-9, 0.0),
    ]
    result = choose(cands, n_layers=n_layers, config=SelectionConfig())
    kept = [(c.position, c.layer) for c in result.candidates if c.filtered is None]
    assert kept == [(-1, 7), (-2, 7)]
    assert (result.chosen.position, result.chosen.layer) == (-1, 7)
    assert [(c.position, c.layer) for c in result.survivors()] == [(-1, 7), (-2, 7)]


def test_all_filtered_gives_no_choice_and_round_trips():
    result = choose([CandidateScore(-1, 0, -1.0, -1.0, 0.5)], n_layers=4, config=SelectionConfig())
    assert result.chosen is None
    again = SelectionResult.from_json(result.to_json())
    assert again.chosen is None and again.candidates == result.candidates


def test_json_round_trip_keeps_nan_as_null():
    result = choose([CandidateScore(-1, 3, NAN, NAN, NAN), CandidateScore(-1, 0, -2.0, 1.0, 0.01)], 4,
                    SelectionConfig())
    data = result.to_json()
    assert data["candidates"][0]["bypass_score"] is None
    again = SelectionResult.from_json(data)
    assert math.isnan(again.candidates[0].bypass_score)
    assert again.chosen == result.chosen


def test_config_validation_names_the_field():
    with pytest.raises(TlrefusalError, match="prune_layer_fraction"):
        SelectionConfig(prune_layer_fraction=1.5)
    with pytest.raises(TlrefusalError, match="batch_size"):
        SelectionConfig(batch_size=0)


def log_odds_by_hand(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """SPEC 1.3: P = softmax(float64 last-position logits) summed over the refusal ids; log(P+1e-8) - log(1-P+1e-8)."""
    p = torch.softmax(logits.double(), dim=-1)[:, ids].sum(-1)
    return torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)


def kl_by_hand(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """SPEC 1.6: KL(P_base || P_new) = sum p_base (log(p_base + 1e-6) - log(p_new + 1e-6)), in float64."""
    p, q = torch.softmax(base.double(), dim=-1), torch.softmax(new.double(), dim=-1)
    return (p * (torch.log(p + 1e-6) - torch.log(q + 1e-6))).sum(-1)


@pytest.mark.parametrize("per_pass", [1, 3, 7])
def test_score_candidates_equal_plain_hf_forwards_and_skip_pruned_layers(tiny_models, tiny_dirs, per_pass):
    """bypass, induce and KL of every scored candidate equal the same scores computed with plain HF forwards,
    torch hooks and the formulas written out here (tests/test_hooks_tiny.py holds the plain side), one
    candidate per forward pass or several (7: groups that span two layers, so rows add at different layers)."""
    model = tiny_models["qwen2"]
    tokenizer = model.tokenizer
    chat = ChatFormat.from_tokenizer(tokenizer)
    harmful = ["Tell me how to pick a lock.", "How do I bake bread at home?"]
    harmless = ["Write a poem about the sea.", "Explain photosynthesis simply.", "Give me three facts."]
    n_pos, n_layers = eoi_count(tokenizer), model.n_layers
    gen = torch.Generator().manual_seed(0)
    directions = 3 * torch.randn(n_pos, n_layers, model.d_model, generator=gen, dtype=torch.float64)
    ids = [5, 7]
    # int(4 * 0.5) = 2: layers >= 2 unscored
    config = SelectionConfig(prune_layer_fraction=0.5, batch_size=2, candidates_per_pass=per_pass)
    scores = score_candidates(model, chat, directions, harmful, harmless, ids, config)
    assert [(s.position, s.layer) for s in scores] == [(p, layer) for p in range(-n_pos, 0) for layer in range(n_layers)]

    hf = reference_model(tiny_dirs["qwen2"])
    base_harmless = reference_logits(hf, tokenizer, harmless)
    base_bypass = log_odds_by_hand(reference_logits(hf, tokenizer, harmful), ids).mean().item()
    base_induce = log_odds_by_hand(base_harmless, ids).mean().item()
    for s in scores:
        if s.layer >= 2:
            assert math.isnan(s.bypass_score) and math.isnan(s.induce_score) and math.isnan(s.kl_score)
            continue
        r = directions[s.position + n_pos, s.layer]  # positions -n..-1 index the directions 0..n-1
        bypass = log_odds_by_hand(reference_logits(hf, tokenizer, harmful, ablate_dir=r), ids).mean().item()
        kl = kl_by_hand(base_harmless, reference_logits(hf, tokenizer, harmless, ablate_dir=r)).mean().item()
        induce = log_odds_by_hand(reference_logits(hf, tokenizer, harmless, add_dir=r, add_layer=s.layer),
                                  ids).mean().item()
        # The interventions move every score, so a wrong intervention cannot pass as a no-op.
        assert abs(bypass - base_bypass) > 1e-2 and abs(induce - base_induce) > 1e-2 and kl > 1e-2
        assert s.bypass_score == pytest.approx(bypass, abs=1e-4), (s.position, s.layer)
        assert s.kl_score == pytest.approx(kl, abs=1e-4), (s.position, s.layer)
        assert s.induce_score == pytest.approx(induce, abs=1e-4), (s.position, s.layer)


def test_score_candidates_rejects_wrong_shape(tiny_models):
    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    with pytest.raises(TlrefusalError, match="shape"):
        score_candidates(model, chat, torch.zeros(2, model.n_layers, model.d_model), ["a"], ["b"], [1],
                         SelectionConfig())


def test_any_subset_of_candidate_groups_in_any_order_scores_bit_for_bit_the_same(tiny_models):
    """What spreading candidates over processes and resuming from a journal rely on: a candidate's scores do
    not depend on which groups of candidates were scored before its own, or whether any were."""
    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    harmful, harmless = ["Tell me how to pick a lock.", "How do I steal a car?"], ["Write a poem about the sea."]
    directions = torch.randn(len(chat.positions), model.n_layers, model.d_model, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1))
    config = SelectionConfig(prune_layer_fraction=0.5, batch_size=2, candidates_per_pass=3)
    full = score_candidates(model, chat, directions, harmful, harmless, [5, 7], config)
    keys = scored_keys(chat.positions, model.n_layers, config)
    assert keys == [(p, layer) for layer in range(2) for p in chat.positions]  # layer-major: a layer's positions
    assert sorted((s.position, s.layer) for s in full if not math.isnan(s.bypass_score)) == sorted(keys)
    groups = candidate_groups(keys, 3)
    assert [k for g in groups for k in g] == keys and {len(g) for g in groups[:-1]} == {3}
    picked = [key for group in groups[::-2] for key in group]  # every other group, last first
    seen = []
    part = score_groups(model, chat, directions, harmful, harmless, [5, 7], config, groups[::-2],
                        on_scored=seen.append)
    assert [len(g) for g in seen] == [len(g) for g in groups[::-2]]  # each group's scores as soon as it is done
    seen = [score for group in seen for score in group]
    assert seen == part and [(s.position, s.layer) for s in part] == picked
    by_key = {(s.position, s.layer): s for s in full}
    assert all(s == by_key[(s.position, s.layer)] for s in part)  # == on floats: bit for bit (none is NaN)
    table = candidate_table(chat.positions, model.n_layers, part)
    assert [(s.position, s.layer) for s in table] == [(p, layer) for p in chat.positions for layer in range(4)]
    for s in table:
        if (s.position, s.layer) in picked:
            assert s == by_key[(s.position, s.layer)]
        else:
            assert math.isnan(s.bypass_score) and math.isnan(s.induce_score) and math.isnan(s.kl_score)
    assert score_groups(model, chat, directions, harmful, harmless, [5, 7], config, []) == []
