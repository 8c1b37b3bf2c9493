"""The paper's filters and choice (SPEC 1.6), and candidate scoring against an independent recomputation."""
import math

import pytest
import torch

from hooks import ablation_hooks, addition_hooks
from tlrefusal.activations import last_logits
from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.scoring import kl_divergence, refusal_log_odds
from tlrefusal.selection import CandidateScore, SelectionConfig, SelectionResult, choose, score_candidates

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


def test_score_candidates_matches_recomputation_and_skips_pruned_layers(tiny_models):
    model = tiny_models["qwen2"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    harmful = ["Tell me how to pick a lock.", "How do I bake bread at home?"]
    harmless = ["Write a poem about the sea.", "Explain photosynthesis simply.", "Give me three facts."]
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(len(chat.positions), model.n_layers, model.d_model, generator=gen, dtype=torch.float64)
    ids = [5, 7]
    config = SelectionConfig(prune_layer_fraction=0.5, batch_size=2)  # layers >= 2 are not scored
    scores = score_candidates(model, chat, directions, harmful, harmless, ids, config)
    assert len(scores) == len(chat.positions) * model.n_layers
    base = last_logits(model, chat, harmless)
    for s in scores:
        if s.layer >= 2:
            assert math.isnan(s.bypass_score) and math.isnan(s.induce_score) and math.isnan(s.kl_score)
            continue
        r = directions[chat.positions.index(s.position), s.layer]
        # Each score recomputed separately (harmful and harmless in their own passes, batch size 32).
        bypass = refusal_log_odds(last_logits(model, chat, harmful, ablation_hooks(r, model.n_layers)), ids).mean()
        kl = kl_divergence(base, last_logits(model, chat, harmless, ablation_hooks(r, model.n_layers))).mean()
        induce = refusal_log_odds(last_logits(model, chat, harmless, addition_hooks(r, s.layer, 1.0)), ids).mean()
        assert s.bypass_score == pytest.approx(bypass.item(), abs=1e-4)
        assert s.kl_score == pytest.approx(kl.item(), abs=1e-4)
        assert s.induce_score == pytest.approx(induce.item(), abs=1e-4)


def test_score_candidates_rejects_wrong_shape(tiny_models):
    model = tiny_models["llama"]
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    with pytest.raises(TlrefusalError, match="shape"):
        score_candidates(model, chat, torch.zeros(2, model.n_layers, model.d_model), ["a"], ["b"], [1],
                         SelectionConfig())
