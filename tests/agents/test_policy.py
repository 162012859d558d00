"""The trainable policy: merged-adapter sampling and shared-prompt log-probabilities equal their plain forms."""

from __future__ import annotations

import pytest
import torch

from agents.policy import LoraSettings, Policy
from align_env.tracks import get_track


def _perturb_adapters(policy: Policy, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def prompts():
    return [item.messages for item in get_track("helpful").split("train")[:3]]


def test_merged_sampler_follows_the_trained_adapters(eos_lm_dir, prompts):
    merged = Policy(eos_lm_dir, lora=LoraSettings(r=4, alpha=8), seed=0, max_new_tokens=16)
    plain = Policy(eos_lm_dir, lora=LoraSettings(r=4, alpha=8), seed=0, max_new_tokens=16, merged_sampler=False)
    before = [g[0].text for g in merged.sample(prompts, n=1, temperature=0, seed=0)]
    for policy in (merged, plain):
        _perturb_adapters(policy)
    merged.sync_sampler()
    ids = torch.tensor([merged.prompt_ids(prompts[0])])
    with torch.no_grad():
        adapters_logits = merged.model(input_ids=ids).logits
        merged_logits = merged._sampler(input_ids=ids).logits
    assert adapters_logits.abs().max() > 0
    torch.testing.assert_close(merged_logits, adapters_logits, rtol=1e-4, atol=1e-4)
    after = [g[0].text for g in merged.sample(prompts, n=1, temperature=0, seed=0)]
    assert after == [g[0].text for g in plain.sample(prompts, n=1, temperature=0, seed=0)]
    assert after != before  # the sampler saw the new adapters, not the weights it was built with


def test_reference_samples_ignore_the_adapters(eos_lm_dir, prompts):
    policy = Policy(eos_lm_dir, lora=LoraSettings(r=4, alpha=8), seed=0, max_new_tokens=16)
    start = [g[0].text for g in policy.sample(prompts, n=1, temperature=0, seed=0, from_reference=True)]
    _perturb_adapters(policy)
    assert [g[0].text for g in policy.sample(prompts, n=1, temperature=0, seed=0, from_reference=True)] == start


def test_shared_prompt_logprobs_equal_full_rows(eos_lm_dir, prompts):
    shared = Policy(eos_lm_dir, lora=None, max_new_tokens=16)
    full = Policy(eos_lm_dir, lora=None, max_new_tokens=16, shared_prompt=False)
    ids = [shared.prompt_ids(p) for p in prompts]
    responses = [[shared.response_ids("Boil it."), shared.response_ids("No", ended=False)],
                 [shared.response_ids("Yes, of course."), shared.response_ids("")],
                 [shared.response_ids("a b c d e f"), shared.response_ids("short")]]
    a, tokens_a = shared.logprobs(ids, responses)
    b, tokens_b = full.logprobs(ids, responses)
    assert a.shape == (3, 2) and tokens_a < tokens_b  # each prompt ran once instead of twice
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    a.sum().backward()
    assert all(p.grad is not None for p in shared.trainable_parameters())
