import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from align_env.env import AlignVectorEnv
from align_env.errors import AlignEnvError
from align_env.feedback.rules import RulesAnnotator


class CountingRules(RulesAnnotator):
    """The real rules annotator, recording how it was called."""

    def __init__(self, track):
        super().__init__(track)
        self.batches = []

    def pairwise(self, prompts, a, b):
        self.batches.append(len(prompts))
        return super().pairwise(prompts, a, b)


def test_make_vec_uses_native_vector_env():
    envs = gym.make_vec("align_env/Summarize-v0", num_envs=4, vectorization_mode="vector_entry_point")
    assert isinstance(envs.unwrapped, AlignVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


def test_batch_round_trip_one_annotator_call_per_step():
    ann = CountingRules("summarize")
    envs = AlignVectorEnv(num_envs=6, track="summarize", annotator=ann)
    obs, info = envs.reset(seed=5)
    assert len(obs["prompt"]) == 6 and len(info["prompt_id"]) == 6
    assert envs.observation_space.contains(obs)
    items = {i.id: i for i in envs.track.train}
    refs = [items[pid].reference for pid in info["prompt_id"]]
    junk = ["banana " * 80 for _ in range(6)]
    next_obs, rewards, term, trunc, step_info = envs.step((refs, junk))
    assert ann.batches == [6]
    assert rewards.shape == (6,) and term.all() and not trunc.any()
    assert (step_info["preference"] > 0.9).all()  # the reference beats repetitive junk
    assert list(step_info["prompt_id"]) == list(info["prompt_id"])
    assert [o["prompt"] for o in step_info["final_obs"]] == list(obs["prompt"])
    assert envs.observation_space.contains(next_obs)
    assert set(next_obs["prompt"]).isdisjoint(obs["prompt"])  # same-step autoreset: next prompts already
    assert step_info["feedback_cost"].calls == 6


def test_vector_matches_single_env_verdicts():
    envs = AlignVectorEnv(num_envs=3, track="helpful")
    obs, info = envs.reset(seed=1)
    a = ["Here are the steps: first, second, third."] * 3
    b = ["I'm sorry, but I can't help with that."] * 3
    _, rewards, *_ , vinfo = envs.step((a, b))
    single = gym.make("align_env/Helpful-v0", disable_env_checker=True).unwrapped
    for i, pid in enumerate(info["prompt_id"]):
        single.reset(options={"prompt_id": pid})
        _, r, *_ = single.step((a[i], b[i]))
        assert r == pytest.approx(rewards[i])


def test_vector_seeding_and_bad_actions():
    e1, e2 = AlignVectorEnv(num_envs=4, track="harmless"), AlignVectorEnv(num_envs=4, track="harmless")
    assert e1.reset(seed=9)[1]["prompt_id"].tolist() == e2.reset(seed=9)[1]["prompt_id"].tolist()
    with pytest.raises(AlignEnvError, match="responses_a, responses_b"):
        e1.step((["a"] * 3, ["b"] * 3))
    with pytest.raises(AlignEnvError, match="responses_a, responses_b"):
        e1.step([("a", "b")] * 4)
    scalar = AlignVectorEnv(num_envs=2, track="harmless", feedback="scalar")
    scalar.reset(seed=0)
    with pytest.raises(AlignEnvError, match="2 strings"):
        scalar.step(["only one"])
    _, r, *_ = scalar.step(["I can't help with that.", "Sure."])
    assert r.shape == (2,) and np.isfinite(r).all()
