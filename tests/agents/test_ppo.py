"""PPO machinery (agents/ppo.py): the equations on hand-computed tensors, and PPO on a tiny random Llama."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.policy import LoraSettings, Policy
from agents.ppo import (KLController, PPOSettings, PPOTrainer, gae, masked_whiten, policy_loss, token_rewards,
                        value_loss)
from align_env.errors import AlignEnvError
from align_env.tracks import get_track


def test_gae_equals_a_hand_computed_example():
    # row 0: three tokens; row 1: one token then padding (whose rewards/values must be ignored)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # by hand: delta_2 = 1 - 0.1 = 0.9;  A_2 = 0.9
    #          delta_1 = 0.9*0.1 - 0.2 = -0.11;  A_1 = -0.11 + 0.45*0.9 = 0.295
    #          delta_0 = 0.9*0.2 - 0.5 = -0.32;  A_0 = -0.32 + 0.45*0.295 = -0.18725
    #          row 1: A_0 = 2 - 0.3 = 1.7 (V after the last token is 0)
    assert torch.allclose(adv, torch.tensor([[-0.18725, 0.295, 0.9], [1.7, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.31275, 0.495, 1.0], [2.0, 0.0, 0.0]]), atol=1e-6)
    # gamma = lam = 1: A_t = sum of future rewards - V_t (Monte-Carlo)
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1[0], torch.tensor([1 - 0.5, 1 - 0.2, 1 - 0.1]), atol=1e-6)


def test_clipped_surrogate_equals_its_equation_on_fixed_tensors():
    logp = torch.tensor([[-1.0, -0.5, -2.0, -0.1]])
    old = torch.tensor([[-1.5, -0.5, -1.0, -0.4]])
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    eps = 0.2
    loss, clipfrac = policy_loss(logp, old, adv, mask, eps)
    terms, clipped = [], 0
    for lp, o, a in zip([-1.0, -0.5, -2.0], [-1.5, -0.5, -1.0], [1.0, -2.0, 0.5]):
        rho = math.exp(lp - o)
        plain, clip = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
        terms.append(max(plain, clip))
        clipped += clip > plain
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    # token 0: rho = e^0.5 = 1.65 > 1.2 with A > 0 -> clipped; token 1: rho = 1; token 2: rho = e^-1, A > 0 -> not
    assert clipfrac.item() == pytest.approx(clipped / 3) and clipped == 1


def test_value_clipping_equals_its_equation():
    values, old = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.1, 2.1]])
    returns, mask = torch.tensor([[0.0, 1.0, 2.0]]), torch.ones(1, 3)
    loss, frac = value_loss(values, old, returns, mask, clip=0.2)
    # v_clip = [0.7, 0.0, 2.0]; max sq errors = [max(1, .49), max(1, 1), max(0, 0)] = [1, 1, 0]
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 0) / 3)
    assert frac.item() == pytest.approx(0.0)
    loss2, frac2 = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1),
                              clip=0.2)
    assert loss2.item() == pytest.approx(0.5 * 4.0) and frac2.item() == 0.0  # unclipped error (2) is larger
    loss3, frac3 = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1),
                              clip=0.2)
    assert loss3.item() == pytest.approx(0.5 * 1.8 ** 2) and frac3.item() == 1.0  # clipped at 0.2: error 1.8


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [-0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [0.05 - 1.0, 0.0, 0.0]]))


def test_whitening_and_kl_controller():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3].item() == 0.0
    fixed = KLController(0.1)
    fixed.update(50.0, 8)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(5.4, 10)  # error -0.1: 0.102 * (1 - 0.1 * 0.1)
    assert adaptive.value == pytest.approx(0.102 * 0.99)


def test_settings_report_every_bad_value():
    bad = PPOSettings(ppo_epochs=0, clip_range=0.0, kl_target=-1.0).check_ppo()
    assert bad == ["ppo_epochs >= 1", "clip_range > 0", "kl_target > 0 or None"]


# -- PPO on a tiny random model ---------------------------------------------------------------------------
def _prompts(n: int):
    return [i.messages for i in get_track("helpful").split("train")[:n]]


def _mean_length(policy: Policy, prompts, seeds=(11, 12)) -> float:
    return float(np.mean([g[0].tokens for s in seeds for g in policy.sample(prompts, n=1, temperature=1.0, seed=s)]))


def test_ppo_moves_the_policy_toward_a_rewarded_property_with_bounded_kl(eos_lm_dir):
    """Reward = shortness (score -tokens/8): PPO shortens the answers; the KL to the reference stays small."""
    torch.manual_seed(0)
    policy = Policy(eos_lm_dir, lora=LoraSettings(r=8, alpha=16), seed=0, max_new_tokens=16)
    settings = PPOSettings(ppo_epochs=2, minibatch_size=4, kl_coef=0.05, ppo_lr=3e-3)
    trainer = PPOTrainer(policy, settings, seed=0)
    prompts = _prompts(8)
    before = _mean_length(policy, prompts)
    kls, scores = [], []
    for step in range(12):
        gens = policy.sample(prompts, n=1, temperature=1.0, seed=100 + step)
        p_ids = [policy.prompt_ids(m) for m in prompts]
        r_ids = [policy.response_ids(g[0].text, g[0].finish_reason == "stop") for g in gens]
        score = [-len(r) / 8.0 for r in r_ids]
        metrics = trainer.step(p_ids, r_ids, score)
        kls.append(metrics["kl"])
        scores.append(metrics["score"])
        for key in ("policy_loss", "value_loss", "clip_fraction", "entropy", "kl", "reward", "kl_coef"):
            assert math.isfinite(metrics[key]), key
    after = _mean_length(policy, prompts)
    assert after < 0.7 * before, (before, after)
    assert np.mean(scores[-3:]) > np.mean(scores[:3])
    assert max(abs(k) for k in kls) < 10.0, kls  # summed per-sequence KL in nats, to the initial policy
    assert trainer.optimizer_steps == 12 * 2 * 2
    tokens = sum(len(policy.prompt_ids(m)) for m in prompts) + metrics["response_tokens"]
    assert metrics["trained_tokens"] == 2 * tokens  # every sequence once per epoch


def test_ppo_state_round_trips_and_rejects_broken_scores(eos_lm_dir, tmp_path):
    def run(trainer, policy, steps, start):
        out = []
        prompts = _prompts(4)
        for step in range(start, start + steps):
            gens = policy.sample(prompts, n=1, temperature=1.0, seed=step)
            p_ids = [policy.prompt_ids(m) for m in prompts]
            r_ids = [policy.response_ids(g[0].text, g[0].finish_reason == "stop") for g in gens]
            out.append(trainer.step(p_ids, r_ids, [-len(r) / 8.0 for r in r_ids]))
        return out

    def fresh():
        policy = Policy(eos_lm_dir, lora=LoraSettings(r=4, alpha=8), seed=0, max_new_tokens=8)
        return policy, PPOTrainer(policy, PPOSettings(ppo_epochs=1, minibatch_size=2, kl_target=1.0, ppo_lr=1e-3))

    policy, trainer = fresh()
    straight = run(trainer, policy, 4, 0)
    policy, trainer = fresh()
    run(trainer, policy, 2, 0)
    policy.save(tmp_path)
    trainer.save(tmp_path)
    policy, trainer = fresh()
    policy.load(tmp_path)
    trainer.load(tmp_path)
    resumed = run(trainer, policy, 2, 2)
    for a, b in zip(straight[2:], resumed):
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-5, abs=1e-7)
        assert a["kl_coef"] == pytest.approx(b["kl_coef"])
    with pytest.raises(AlignEnvError, match="non-finite reward scores"):
        trainer.step([[1, 2]], [[3]], [float("nan")])
