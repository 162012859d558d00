"""The built-in agents on a tiny random Llama (``eos_lm_dir``) with the deterministic ``shorter`` annotator.

Everything is seeded: the env (reset seed), the agents (seed=0), the annotator (deterministic).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import Transitions, make_agent
from agents.online_dpo import NonFiniteLossError
from align_env.env import AlignVectorEnv
from align_env.errors import AlignEnvError
from align_env.testing import check_agent
from align_env.tracks import get_track

TRACK = "helpful"
NEW_TOKENS = 24


def _agent(name: str, model: str, annotator: str = "shorter", **config):
    config.setdefault("max_new_tokens", NEW_TOKENS)
    return make_agent(name, track=TRACK, annotator=annotator, seed=0, model=model, **config)


def _env(feedback: str, annotator: str = "shorter", num_envs: int = 4) -> AlignVectorEnv:
    return AlignVectorEnv(num_envs=num_envs, track=TRACK, feedback=feedback, annotator=annotator)


def _run(agent, env, steps: int, seed: int = 0, obs=None) -> tuple[list[dict], dict]:
    if obs is None:
        obs, _ = env.reset(seed=seed)
    log = []
    for _ in range(steps):
        action = agent.act(obs)
        obs, rewards, _, _, infos = env.step(action)
        log.append(agent.update(Transitions.from_vector_step(action, rewards, infos)))
    return log, obs


def _eval_observations(n: int = 8) -> dict:
    items = get_track(TRACK).split("eval")[:n]
    return {"prompt": tuple(i.prompt for i in items), "messages": tuple(i.messages for i in items)}


def _mean_chars(agent, seeds=(0, 1, 2, 3)) -> float:
    obs = _eval_observations()
    return float(np.mean([len(t) for s in seeds for t in agent.respond(obs, seed=s)]))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- conformance ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,config", [
    ("initial", {}), ("initial", {"feedback": "pairwise"}), ("online-dpo", {}), ("online-dpo", {"lora": False}),
    ("offline-dpo", {}), ("offline-dpo", {"pairs": "annotator", "num_pairs": 6}), ("best-of-n", {}),
    ("best-of-n", {"select": "score", "n": 3}),
])
def test_check_agent_passes_on_builtin_agents(eos_lm_dir, name, config):
    agent = _agent(name, eos_lm_dir, max_new_tokens=12, **config)
    check_agent(agent, _env(agent.feedback, num_envs=3))


def test_check_agent_catches_broken_agents():
    wrong_size = make_agent("tests.agents.helpers:WordsAgent", track=TRACK, wrong_size=True)
    with pytest.raises(AssertionError, match="the scalar action has 3 responses for 4 prompts"):
        check_agent(wrong_size, _env("scalar"))
    forgetful = make_agent("tests.agents.helpers:WordsAgent", track=TRACK, forget_rng_on_load=True)
    with pytest.raises(AssertionError, match="after load\\(\\), act\\(\\) on the same observations gave different"):
        check_agent(forgetful, _env("scalar"))
    with pytest.raises(AssertionError, match="build the env with feedback='scalar'"):
        check_agent(make_agent("tests.agents.helpers:WordsAgent", track=TRACK), _env("pairwise"))
    check_agent(make_agent("tests.agents.helpers:WordsAgent", track=TRACK), _env("scalar"))  # the sound one passes


# -- training changes parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,config", [
    ("online-dpo", {}), ("online-dpo", {"lora": False, "lr": 1e-4}), ("online-dpo", {"loss": "ipo"}),
    ("online-dpo", {"loss": "slic", "beta": 0.5, "optimizer": "adafactor"}),
    ("offline-dpo", {}), ("offline-dpo", {"pairs": "annotator", "num_pairs": 8}),
])
def test_training_agents_change_their_parameters(eos_lm_dir, name, config):
    agent = _agent(name, eos_lm_dir, warmup_steps=0, **config)
    before = _snapshot(agent.policy.model)
    trainable = {n for n, p in agent.policy.model.named_parameters() if p.requires_grad}
    log, _ = _run(agent, _env("pairwise"), steps=2)
    assert sum(m["pairs_used"] for m in log) > 0
    after = _snapshot(agent.policy.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    if config.get("lora", True):
        assert all("lora_" in n for n in changed)  # the base weights (the reference) stay frozen
    else:
        ref = dict(agent.policy.reference.named_parameters())
        assert all(torch.equal(ref[n], before[n]) for n in before)  # the frozen copy is the initial policy


# -- the policy moves toward the annotator's preference; the initial policy does not ----------------------------
def test_online_dpo_shortens_answers_and_initial_does_not_move(eos_lm_dir):
    """50 steps x 4 prompts of online DPO (defaults: LoRA r=16, lr 5e-5, warm-up 10) against an annotator that
    prefers shorter answers cut the mean answer length on held-out prompts by more than 40%
    (measured: 20.7 -> 3.3 characters, 12.1 -> 2.6 tokens per sample); the initial agent run through the same
    loop answers identically."""
    online, initial = _agent("online-dpo", eos_lm_dir), _agent("initial", eos_lm_dir, feedback="pairwise")
    start_online, start_initial = _mean_chars(online), _mean_chars(initial)
    assert start_online == start_initial  # same weights, same seeds: same answers before training
    obs = _eval_observations()
    initial_answers = [initial.respond(obs, seed=s) for s in (0, 1)]

    online_log, _ = _run(online, _env("pairwise"), steps=50)
    _run(initial, _env("pairwise"), steps=50)

    end_online, end_initial = _mean_chars(online), _mean_chars(initial)
    assert end_online < 0.6 * start_online, (start_online, end_online)
    assert end_initial == start_initial and [initial.respond(obs, seed=s) for s in (0, 1)] == initial_answers
    margins = [m["reward_margin"] for m in online_log if "reward_margin" in m]
    assert np.mean(margins[-20:]) > np.mean(margins[:5])  # the logged reward margin rises
    assert all(np.isfinite(v) for m in online_log for v in m.values())


# -- abstentions, non-finite losses, bad input ------------------------------------------------------------------
def test_abstained_pairs_are_dropped_and_counted(eos_lm_dir):
    agent = _agent("online-dpo", eos_lm_dir, warmup_steps=0)
    (metrics,), _ = _run(agent, _env("pairwise", annotator="shorter?abstain_every=2"), steps=1)
    assert metrics["abstained"] == 2 and metrics["pairs_used"] + metrics["ties"] == 2

    before = _snapshot(agent.policy.model)
    log, _ = _run(agent, _env("pairwise", annotator="shorter?abstain_every=1"), steps=2)
    assert [m["abstained"] for m in log] == [4, 4] and [m["pairs_used"] for m in log] == [0, 0]
    assert "loss" not in log[0]  # no pair, no loss: nothing is made up
    after = _snapshot(agent.policy.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # an abstention never becomes a preference


def test_nonfinite_loss_is_skipped_counted_then_stops(eos_lm_dir):
    """A NaN put into one adapter weight between act (clean sampling) and update makes the loss NaN."""
    agent, env = _agent("online-dpo", eos_lm_dir, max_nonfinite=2, warmup_steps=0), _env("pairwise")
    name, param = next((n, p) for n, p in agent.policy.model.named_parameters() if "lora_B" in n)
    obs, _ = env.reset(seed=0)

    def poisoned_step(obs):
        action = agent.act(obs)
        next_obs, rewards, _, _, infos = env.step(action)
        clean = param[0, 0].item()
        with torch.no_grad():
            param[0, 0] = float("nan")
        try:
            return agent.update(Transitions.from_vector_step(action, rewards, infos)), next_obs
        finally:
            with torch.no_grad():
                param[0, 0] = clean

    before = _snapshot(agent.policy.model)
    metrics, obs = poisoned_step(obs)
    assert metrics["nonfinite_skipped"] == 1 and metrics["pairs_used"] > 0 and "loss" not in metrics
    after = _snapshot(agent.policy.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # skipped: no step, no NaN spread
    with pytest.raises(NonFiniteLossError, match="2 non-finite updates in a row"):
        poisoned_step(obs)


def test_update_needs_its_own_act(eos_lm_dir):
    agent, env = _agent("online-dpo", eos_lm_dir), _env("pairwise")
    obs, _ = env.reset(seed=0)
    action = agent.act(obs)
    _, rewards, _, _, infos = env.step(action)
    forged = (list(action[1]), list(action[0]))
    with pytest.raises(AlignEnvError, match="not the ones this agent's last act"):
        agent.update(Transitions.from_vector_step(forged, rewards, infos))
    with pytest.raises(AlignEnvError, match="without a preceding act"):
        agent.update(Transitions.from_vector_step(action, rewards, infos))


def test_checkpoint_of_another_agent_or_model_is_refused(eos_lm_dir, tiny_lm_dir, tmp_path):
    online = _agent("online-dpo", eos_lm_dir)
    online.save(tmp_path / "online")
    with pytest.raises(AlignEnvError, match="checkpoint of agent 'online-dpo', not 'offline-dpo'"):
        _agent("offline-dpo", eos_lm_dir).load(tmp_path / "online")
    with pytest.raises(AlignEnvError, match="checkpoint has model="):
        _agent("online-dpo", tiny_lm_dir).load(tmp_path / "online")
    with pytest.raises(AlignEnvError, match="checkpoint has lora=True"):
        _agent("online-dpo", eos_lm_dir, lora=False).load(tmp_path / "online")
    with pytest.raises(AlignEnvError, match="is not an agent checkpoint"):
        online.load(tmp_path)


# -- resume --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resumed_online_dpo_ends_with_the_same_parameters(eos_lm_dir, tmp_path, optimizer):
    """4 steps straight vs 3 steps, save (mid accumulation: grad_accum=2), a fresh agent loads, 1 more step."""
    config = dict(grad_accum=2, warmup_steps=2, lr=1e-3, optimizer=optimizer)
    straight = _agent("online-dpo", eos_lm_dir, **config)
    _run(straight, _env("pairwise"), steps=4)

    first = _agent("online-dpo", eos_lm_dir, **config)
    env = _env("pairwise")
    _, obs = _run(first, env, steps=3)
    first.save(tmp_path / "ckpt")
    resumed = _agent("online-dpo", eos_lm_dir, **config)
    resumed.load(tmp_path / "ckpt")
    _run(resumed, env, steps=1, obs=obs)

    a, b = _snapshot(straight.policy.model), _snapshot(resumed.policy.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.trainer.optimizer_steps == straight.trainer.optimizer_steps == 2
    initial = _snapshot(_agent("online-dpo", eos_lm_dir, **config).policy.model)
    assert any(not torch.equal(a[n], initial[n]) for n in a)  # it did train


def test_resumed_offline_dpo_continues_the_same_data_order(eos_lm_dir, tmp_path):
    config = dict(pairs="annotator", num_pairs=6, warmup_steps=0, lr=1e-3)
    straight = _agent("offline-dpo", eos_lm_dir, **config)
    _run(straight, _env("pairwise"), steps=3)
    first = _agent("offline-dpo", eos_lm_dir, **config)
    env = _env("pairwise")
    _, obs = _run(first, env, steps=2)
    first.save(tmp_path / "ckpt")
    resumed = _agent("offline-dpo", eos_lm_dir, **config)
    resumed.load(tmp_path / "ckpt")
    (metrics,), _ = _run(resumed, env, steps=1, obs=obs)
    assert "annotator_calls" not in metrics  # the labelled set came from the checkpoint, not a second labelling
    a, b = _snapshot(straight.policy.model), _snapshot(resumed.policy.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


# -- baselines ---------------------------------------------------------------------------------------------------
def test_offline_dpo_labels_once_and_trains_on_the_fixed_set(eos_lm_dir):
    agent = _agent("offline-dpo", eos_lm_dir, pairs="annotator", num_pairs=8)
    log, _ = _run(agent, _env("pairwise"), steps=3)
    assert log[0]["annotator_calls"] == 8 and all("annotator_calls" not in m for m in log[1:])
    assert log[0]["set_size"] == 8 - log[0]["label_ties"] - log[0]["label_abstained"]
    assert [m["pairs_used"] for m in log] == [4, 4, 4] and log[2]["epochs"] >= 1  # 12 pairs drawn from <= 8
    track_agent = _agent("offline-dpo", eos_lm_dir)
    (metrics,), _ = _run(track_agent, _env("pairwise"), steps=1)
    assert metrics["set_size"] == len(get_track(TRACK).pairs)


@pytest.mark.parametrize("select,calls", [("pairwise", 4 * 3), ("score", 4 * 4)])
def test_best_of_n_returns_the_annotators_pick(eos_lm_dir, select, calls):
    agent = _agent("best-of-n", eos_lm_dir, n=4, select=select)
    env = _env("scalar")
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)  # replays the agent's first sampling seed
    candidates = agent.engine.generate(list(obs["messages"]), n=4, temperature=0.9, max_new_tokens=NEW_TOKENS,
                                       seed=int(rng.integers(2**31)))
    picks = agent.act(obs)
    assert [len(p) for p in picks] == [min(len(c.text) for c in group) for group in candidates]
    _, rewards, _, _, infos = env.step(picks)
    metrics = agent.update(Transitions.from_vector_step(picks, rewards, infos))
    assert metrics["annotator_calls"] == calls and metrics["selection_abstained"] == 0
