"""The sampling loop's pieces: the inverse-CDF draw samples the given distribution, top-p filters as
transformers does, and the loop stops where ``generate`` stops."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TopPLogitsWarper

from align_env.engines.sampling_loop import draw, is_plain_sampling, top_p_filter


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.0, 0.05])
    torch.manual_seed(0)
    tokens = draw(probs.expand(20000, -1).contiguous(), "inverse_cdf")
    counts = torch.bincount(tokens, minlength=6)
    assert counts[1] == 0 and counts[4] == 0  # zero probability: never drawn
    support = probs > 0
    assert chisquare(counts[support].numpy(), (probs[support] * 20000).numpy()).pvalue > 1e-3
    skewed = torch.tensor([0.2, 0.0, 0.5, 0.25, 0.0, 0.05])  # the test can fail: another distribution
    assert chisquare(counts[support].numpy(), (skewed[support] * 20000).numpy()).pvalue < 1e-6


def test_inverse_cdf_draws_are_seeded_and_unnormalised_rows_work():
    probs = torch.softmax(torch.randn(16, 1000), -1) * 3.0  # rows summing to 3: drawn by F / F(V)
    torch.manual_seed(7)
    a = draw(probs)
    torch.manual_seed(7)
    assert torch.equal(a, draw(probs))
    assert a.shape == (16,) and int(a.max()) < 1000
    with pytest.raises(ValueError, match="unknown draw"):
        draw(probs, "gumbel")


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_filter_equals_transformers(top_p):
    torch.manual_seed(1)
    scores = torch.randn(8, 500) * 3
    want = TopPLogitsWarper(top_p)(None, scores.clone())
    got = top_p_filter(scores, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])
    assert bool(torch.isinf(got).any()) and not bool(torch.isinf(got).all(-1).any())
    assert top_p_filter(scores, 1.0) is scores


def test_plain_sampling_is_told_from_configs_that_ask_for_more():
    from transformers import GenerationConfig

    assert is_plain_sampling(None) and is_plain_sampling(GenerationConfig(eos_token_id=2, temperature=0.7))
    assert not is_plain_sampling(GenerationConfig(repetition_penalty=1.3))
    assert not is_plain_sampling(GenerationConfig(min_new_tokens=4))
    assert not is_plain_sampling(GenerationConfig(bad_words_ids=[[5]]))
