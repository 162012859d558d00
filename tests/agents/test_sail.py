"""SAIL (agents/sail.py): the gradient by enumeration, routing and annotator calls, conformance, resume, learning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents import Transitions, make_agent
from agents.sail import DP, OFFLINE, PP, PR, sail_losses
from align_env.env import AlignVectorEnv
from align_env.errors import AlignEnvError
from align_env.testing import check_agent
from tests.agents.test_agents import TRACK, _agent, _env, _mean_chars, _run, _snapshot

BETA = 0.7  # larger than the paper's 0.1 so that every term is far from zero in the enumerated case
ONES = dict(gamma=1.0, pp_coef=1.0, rho=1.0)  # with coefficients 1 the expected update is exactly grad J


# -- the gradient, by enumeration ------------------------------------------------------------------------------
class TabularPolicy:
    """Responses over tokens {a, b, EOS}, at most 2 tokens: EOS, aEOS, bEOS, aa, ab, ba, bb (7 sequences).

    ``theta`` holds the first-token logits (3) and the second-token logits after a and after b (2 x 3)."""

    TOKENS = 3

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(3, self.TOKENS, generator=g, dtype=torch.float64, requires_grad=True)
        self.sequences = [(2,)] + [(t, u) for t in (0, 1) for u in (0, 1, 2)]

    def logprob(self, seq: tuple[int, ...], theta: torch.Tensor | None = None) -> torch.Tensor:
        theta = self.theta if theta is None else theta
        lp = F.log_softmax(theta[0], -1)[seq[0]]
        if len(seq) > 1:
            lp = lp + F.log_softmax(theta[1 + seq[0]], -1)[seq[1]]
        return lp


def _annotator_label(y1: tuple, y2: tuple) -> float:
    """A fixed oracle: the shorter response wins, ties broken by the smaller first token."""
    return 1.0 if (len(y1), y1) < (len(y2), y2) else -1.0


def _agent_loss(pol: TabularPolicy, ref: TabularPolicy, y1, y2, sign: float, route: int,
                baseline: float = 0.0) -> torch.Tensor:
    logp = torch.stack([pol.logprob(y1), pol.logprob(y2)]).unsqueeze(0)
    ref_lp = torch.stack([ref.logprob(y1), ref.logprob(y2)]).unsqueeze(0).detach()
    losses, _ = sail_losses(logp, ref_lp, torch.tensor([sign], dtype=torch.float64), torch.tensor([route]),
                            beta=BETA, baseline=baseline, **ONES)
    return losses[0]


def _h(pol, ref, y1, y2) -> torch.Tensor:
    return (pol.logprob(y1) - ref.logprob(y1).detach()) - (pol.logprob(y2) - ref.logprob(y2).detach())


def _expected_update(pol, ref, pairs_and_weights, baseline: float = 0.0) -> torch.Tensor:
    """sum_k w_k * (-grad loss_k): the agent's applied gradient in expectation over its draws."""
    total = torch.zeros_like(pol.theta)
    for (y1, y2, sign, route), weight in pairs_and_weights:
        (grad,) = torch.autograd.grad(-_agent_loss(pol, ref, y1, y2, sign, route, baseline), pol.theta)
        total += weight.detach() * grad
    return total


@pytest.mark.parametrize("baseline", [0.0, math.log(0.5)])
def test_sail_pr_gradient_is_the_exact_gradient_of_j(baseline):
    """J(theta) = sum_{y1,y2} pi(y1) pi(y2) log sigma(beta h) with the oracle's label; the expected agent update
    (the DPO gradient plus the score-function term) equals its exact gradient; DPO alone does not. A constant
    baseline (``baseline='half'``) leaves the expectation exact."""
    pol, ref = TabularPolicy(0), TabularPolicy(1)
    pairs = list(itertools.product(pol.sequences, repeat=2))
    theta = pol.theta

    def j(th):
        total = 0.0
        for y1, y2 in pairs:
            h = (pol.logprob(y1, th) - ref.logprob(y1).detach()) - (pol.logprob(y2, th) - ref.logprob(y2).detach())
            pi = torch.exp(pol.logprob(y1, th) + pol.logprob(y2, th))
            total = total + pi * F.logsigmoid(BETA * _annotator_label(y1, y2) * h)
        return total

    (exact,) = torch.autograd.grad(j(theta), theta)
    weights = [((y1, y2, _annotator_label(y1, y2), PR), torch.exp(pol.logprob(y1) + pol.logprob(y2)))
               for y1, y2 in pairs]
    applied = _expected_update(pol, ref, weights, baseline)
    torch.testing.assert_close(applied, exact, rtol=1e-10, atol=1e-12)
    dpo_only = _expected_update(pol, ref, [((y1, y2, s, OFFLINE), w) for (y1, y2, s, _), w in weights])
    assert (dpo_only - exact).abs().max() > 1e-3  # the score-function term matters


def test_sail_pp_gradient_is_the_exact_gradient_of_j_with_self_labels():
    """Self-labels: (y1, y2) kept w.p. sigma(beta h12). J = sum pi pi sum_label P_theta(label) log sigma(beta h_label),
    differentiated through the samples and through the label distribution (the squared term)."""
    pol, ref = TabularPolicy(2), TabularPolicy(3)
    pairs = list(itertools.product(pol.sequences, repeat=2))

    def j(th):
        total = 0.0
        for y1, y2 in pairs:
            h = (pol.logprob(y1, th) - ref.logprob(y1).detach()) - (pol.logprob(y2, th) - ref.logprob(y2).detach())
            p_keep = torch.sigmoid(BETA * h)
            total = total + torch.exp(pol.logprob(y1, th) + pol.logprob(y2, th)) * (
                p_keep * F.logsigmoid(BETA * h) + (1 - p_keep) * F.logsigmoid(-BETA * h))
        return total

    (exact,) = torch.autograd.grad(j(pol.theta), pol.theta)
    weights = []
    for y1, y2 in pairs:
        pi = torch.exp(pol.logprob(y1) + pol.logprob(y2))
        p_keep = torch.sigmoid(BETA * _h(pol, ref, y1, y2))
        weights += [((y1, y2, 1.0, PP), pi * p_keep), ((y1, y2, -1.0, PP), pi * (1 - p_keep))]
    torch.testing.assert_close(_expected_update(pol, ref, weights), exact, rtol=1e-10, atol=1e-12)


def test_sail_dp_gradient_is_the_exact_gradient_on_fixed_responses():
    """Offline responses (fixed, not sampled): only the label depends on theta; no score-function term."""
    pol, ref = TabularPolicy(4), TabularPolicy(5)
    offline = [((0, 1), (2,)), ((1, 2), (0, 0)), ((2,), (1, 1))]

    def j(th):
        total = 0.0
        for y1, y2 in offline:
            h = (pol.logprob(y1, th) - ref.logprob(y1).detach()) - (pol.logprob(y2, th) - ref.logprob(y2).detach())
            p = torch.sigmoid(BETA * h)
            total = total + p * F.logsigmoid(BETA * h) + (1 - p) * F.logsigmoid(-BETA * h)
        return total

    (exact,) = torch.autograd.grad(j(pol.theta), pol.theta)
    weights = []
    for y1, y2 in offline:
        p = torch.sigmoid(BETA * _h(pol, ref, y1, y2))
        weights += [((y1, y2, 1.0, DP), p), ((y1, y2, -1.0, DP), 1 - p)]
    torch.testing.assert_close(_expected_update(pol, ref, weights), exact, rtol=1e-10, atol=1e-12)


def test_agent_applies_the_sail_loss_to_its_routed_pairs(eos_lm_dir):
    """The gradient the agent accumulates in one update equals autograd of ``sail_losses`` on the same pairs,
    routes and labels, recomputed here from the policy's log-probabilities."""
    agent = _agent("sail", eos_lm_dir, mix_pr=0.4, mix_pp=0.3, mix_dp=0.2, grad_accum=2, beta=0.5)
    env = _env("pairwise")
    obs, _ = env.reset(seed=0)
    action = agent.act(obs)
    routed = agent._last
    _, rewards, _, _, infos = env.step(action)
    transitions = Transitions.from_vector_step(action, rewards, infos)
    rng_copy = np.random.default_rng()
    rng_copy.bit_generator.state = agent.rng.bit_generator.state
    metrics = agent.update(transitions)  # grad_accum=2: the gradient stays in .grad, no optimizer step yet
    applied = {n: p.grad.clone() for n, p in agent.policy.model.named_parameters() if p.grad is not None}
    assert applied and metrics["pairs_used"] == 4 - metrics["abstained"] - metrics["ties"]
    assert set(routed.route) >= {PR, PP}  # this seed routes to several variants

    for p in agent.policy.trainable_parameters():
        p.grad = None
    uniform = rng_copy.random(4)
    prefs = transitions.preferences
    keep = [i for i in range(4) if routed.route[i] != PR or (np.isfinite(prefs[i]) and prefs[i] != 0.5)]
    pol = agent.policy
    prompts = [pol.prompt_ids(routed.messages[i]) for i in keep]
    responses = [[pol.response_ids(routed.a[i], routed.ended[i][0]), pol.response_ids(routed.b[i], routed.ended[i][1])]
                 for i in keep]
    ref, _ = pol.logprobs(prompts, responses, reference=True)
    logp, _ = pol.logprobs(prompts, responses)
    h12 = ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])).detach()
    signs = []
    for k, i in enumerate(keep):
        r = routed.route[i]
        if r in (PP, DP):
            signs.append(1.0 if uniform[i] < torch.sigmoid(0.5 * h12[k].double()).item() else -1.0)
        else:
            signs.append(1.0 if r == OFFLINE or prefs[i] > 0.5 else -1.0)
    losses, _ = sail_losses(logp, ref, torch.tensor(signs), torch.as_tensor(routed.route[keep]), beta=0.5,
                            gamma=0.3, pp_coef=0.2, rho=0.2)
    (losses.mean() / 2).backward()
    for n, p in agent.policy.model.named_parameters():
        if n in applied:
            torch.testing.assert_close(p.grad, applied[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("micro_pairs", [1, 3])
def test_sail_micro_pairs_give_the_full_batch_update(eos_lm_dir, micro_pairs):
    """``micro_pairs`` bounds SAIL's update memory as it does DPO's: the same metrics and gradients."""
    def update(**settings):
        agent = _agent("sail", eos_lm_dir, mix_pr=0.4, mix_pp=0.3, mix_dp=0.2, grad_accum=2, beta=0.5, **settings)
        env = _env("pairwise")
        obs, _ = env.reset(seed=0)
        action = agent.act(obs)
        _, rewards, _, _, infos = env.step(action)
        metrics = agent.update(Transitions.from_vector_step(action, rewards, infos))
        grads = {n: p.grad.clone() for n, p in agent.policy.model.named_parameters() if p.grad is not None}
        timing = {"update_seconds", "tokens_per_second", "sample_seconds"}
        return {k: v for k, v in metrics.items() if k not in timing}, grads

    full, full_grads = update()
    chunked, chunked_grads = update(micro_pairs=micro_pairs)
    assert full["pairs_used"] > micro_pairs and set(full) == set(chunked)
    for key in full:
        assert chunked[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


# -- routing, annotator calls and self-labels --------------------------------------------------------------------
def test_sail_pp_makes_no_annotator_calls_for_its_self_labelled_share(eos_lm_dir):
    """The env judges through the agent's RequestedLabels: calls == PR-routed pairs; PP pairs cost nothing."""
    mixed = _agent("sail", eos_lm_dir, mix_pr=0.5, mix_pp=0.5)
    env = AlignVectorEnv(num_envs=4, track=TRACK, feedback="pairwise", annotator=mixed.annotator_spec)
    log, _ = _run(mixed, env, steps=4)
    requested = sum(m["annotator_requested"] for m in log)
    self_labelled = sum(m["self_labelled_online"] for m in log)
    assert 0 < requested < 16 and self_labelled > 0
    assert env.annotator.cost.calls == requested == mixed.labels.requested  # one call per PR pair, none for PP
    assert mixed.labels.skipped == 16 - requested
    assert log[-1]["total_self_labelled"] == self_labelled

    pp = _agent("sail", eos_lm_dir, variant="pp", mix_pp=1.0)
    env = AlignVectorEnv(num_envs=4, track=TRACK, feedback="pairwise", annotator=pp.annotator_spec)
    log, _ = _run(pp, env, steps=2)
    assert env.annotator.cost.calls == 0 and sum(m["self_labelled_online"] for m in log) == 8
    assert all(m["annotator_requested"] == 0 for m in log)
    assert sum(m["self_label_swaps"] for m in log) > 0  # the Bernoulli labels swap some pairs


def test_routing_follows_the_mix_and_defaults_follow_the_paper(eos_lm_dir):
    for variant, mix in (("pr", (0.3, 0, 0, 0.7)), ("pp", (0, 0.3, 0, 0.7)), ("dp", (0, 0, 0.4, 0.6))):
        agent = _agent("sail", eos_lm_dir, variant=variant)
        np.testing.assert_allclose(agent.config.weights, mix)
        assert (agent.config.beta, agent.config.gamma, agent.config.pp_coef, agent.config.rho) == (0.1, 0.3, 0.2, 0.2)
    agent = _agent("sail", eos_lm_dir, mix_pr=0.25, mix_pp=0.25, mix_dp=0.25)
    obs = {"prompt": ("x",) * 400, "messages": tuple([{"role": "user", "content": "x"}] for _ in range(400))}
    agent.policy.sample = lambda msgs, n, **_: [[_Gen(), _Gen()] for _ in msgs]  # routing only: skip the model
    agent.act(obs)
    counts = np.bincount(agent._last.route, minlength=4) / 400
    np.testing.assert_allclose(counts, [0.25] * 4, atol=0.06)


class _Gen:
    text, finish_reason, tokens = "y", "stop", 1


def test_bad_sail_configs_are_clear_errors(eos_lm_dir):
    with pytest.raises(AlignEnvError, match=r"mix_pr \+ mix_pp \+ mix_dp <= 1 \(got 1.1\)"):
        _agent("sail", eos_lm_dir, mix_pr=0.5, mix_pp=0.6)
    with pytest.raises(AlignEnvError, match="0 <= mix_dp <= 1"):
        _agent("sail", eos_lm_dir, mix_dp=-0.1)
    with pytest.raises(AlignEnvError, match="loss='dpo'"):
        _agent("sail", eos_lm_dir, loss="ipo")
    with pytest.raises(AlignEnvError, match="SAIL variant"):
        _agent("sail", eos_lm_dir, variant="ppp")
    with pytest.raises(AlignEnvError, match="gamma >= 0"):
        _agent("sail", eos_lm_dir, gamma=-1)


# -- conformance, training, resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{"variant": "pr"}, {"variant": "pp", "mix_pp": 0.6},
                                    {"variant": "dp"}, {"mix_pr": 0.3, "mix_pp": 0.3, "mix_dp": 0.4, "lora": False}])
def test_check_agent_passes_on_sail(eos_lm_dir, config):
    agent = _agent("sail", eos_lm_dir, max_new_tokens=12, **config)
    check_agent(agent, _env("pairwise", num_envs=3))


def test_sail_changes_only_its_adapters(eos_lm_dir):
    agent = _agent("sail", eos_lm_dir, mix_pr=0.3, mix_pp=0.3, mix_dp=0.4, warmup_steps=0)
    before = _snapshot(agent.policy.model)
    log, _ = _run(agent, _env("pairwise"), steps=2)
    assert sum(m["pairs_used"] for m in log) > 0
    changed = {n for n, p in _snapshot(agent.policy.model).items() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)


def test_resumed_sail_ends_with_the_same_parameters(eos_lm_dir, tmp_path):
    config = dict(mix_pr=0.3, mix_pp=0.3, mix_dp=0.2, grad_accum=2, warmup_steps=2, lr=1e-3)
    straight = _agent("sail", eos_lm_dir, **config)
    straight_log, _ = _run(straight, _env("pairwise"), steps=4)
    first = _agent("sail", eos_lm_dir, **config)
    env = _env("pairwise")
    _, obs = _run(first, env, steps=3)
    first.save(tmp_path / "ckpt")
    del first  # the "killed" process
    resumed = _agent("sail", eos_lm_dir, **config)
    resumed.load(tmp_path / "ckpt")
    (last,), _ = _run(resumed, env, steps=1, obs=obs)
    a, b = _snapshot(straight.policy.model), _snapshot(resumed.policy.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert last["total_self_labelled"] == straight_log[-1]["total_self_labelled"]
    assert last["loss"] == straight_log[-1]["loss"]


def test_sail_pr_shortens_answers_with_a_shorter_preferring_annotator(eos_lm_dir):
    """40 steps x 4 prompts of SAIL-PR on every example (mix_pr 1, gamma 0.3, baseline 'half') against the
    `shorter` annotator cut the mean held-out answer length by more than 40% (measured 20.7 -> 7.2 characters;
    gamma 0, plain online DPO: -> 7.7). With the literal term (baseline 'none') the same run got longer
    (-> 27.5): with sg(log sigma) always below 0 the sampled responses' log-probabilities are pushed down,
    which raises the entropy of this tiny policy faster than the preference shortens it."""
    agent = _agent("sail", eos_lm_dir, variant="pr", mix_pr=1.0, baseline="half")
    start = _mean_chars(agent)
    env = AlignVectorEnv(num_envs=4, track=TRACK, feedback="pairwise", annotator=agent.annotator_spec)
    log, _ = _run(agent, env, steps=40)
    end = _mean_chars(agent)
    assert end < 0.6 * start, (start, end)
    assert env.annotator.cost.calls == 160 == log[-1]["total_annotator_requested"]
    assert all(np.isfinite(v) for m in log for v in m.values())
