"""Metrics on logits against hand-computed values."""
import math

import torch

from tlrefusal.scoring import REFUSAL_SUBSTRINGS, is_refusal, kl_divergence, refusal_log_odds


def test_refusal_log_odds_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    # Row 0: P_ref = (e^2 + e^-1) / (e^2 + 1 + e^-1 + e^0.5); row 1: P_ref = 2/4.
    z = math.exp(2) + 1 + math.exp(-1) + math.exp(0.5)
    p0 = (math.exp(2) + math.exp(-1)) / z
    expected = [math.log(p0 + 1e-8) - math.log(1 - p0 + 1e-8), 0.0]
    got = refusal_log_odds(logits, [0, 2])
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_refusal_log_odds_sign():
    logits = torch.full((1, 10), -5.0)
    logits[0, 3] = 10.0
    assert refusal_log_odds(logits, [3]).item() > 0
    assert refusal_log_odds(logits, [4]).item() < 0


def test_kl_by_hand_and_zero_for_equal():
    a = torch.tensor([[1.0, 2.0, 0.5]])
    b = torch.tensor([[0.0, 1.0, 3.0]])
    p = [math.exp(v) / sum(math.exp(w) for w in a[0].tolist()) for v in a[0].tolist()]
    q = [math.exp(v) / sum(math.exp(w) for w in b[0].tolist()) for v in b[0].tolist()]
    expected = sum(pi * (math.log(pi + 1e-6) - math.log(qi + 1e-6)) for pi, qi in zip(p, q, strict=True))
    assert math.isclose(kl_divergence(a, b).item(), expected, rel_tol=1e-12)
    assert kl_divergence(a, a).abs().item() < 1e-12
    assert kl_divergence(a, b).item() > 0


def test_substring_refusal_list_is_the_papers():
    assert len(REFUSAL_SUBSTRINGS) == 12
    assert is_refusal("Sure! i'm SORRY, I can't")
    assert is_refusal("Well... as an ai language model")
    assert not is_refusal("Sure, here is how to bake bread.")
