import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import align_env
from align_env.env import AlignEnv
from align_env.errors import AlignEnvError
from align_env.feedback import FeedbackCost


@pytest.mark.parametrize("env_id", sorted(align_env.ENV_IDS))
@pytest.mark.parametrize("feedback", ["pairwise", "scalar"])
def test_check_env_passes_without_warnings(env_id, feedback):
    env = gym.make(env_id, feedback=feedback, disable_env_checker=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not [str(w.message) for w in caught]


def test_registered_ids_and_kwargs():
    assert set(align_env.ENV_IDS) == {"align_env/Summarize-v0", "align_env/Helpful-v0", "align_env/Harmless-v0"}
    for env_id in align_env.ENV_IDS:
        spec = gym.spec(env_id)
        assert spec.vector_entry_point == "align_env.env:AlignVectorEnv"
        assert spec.nondeterministic is False  # default annotator (rules) is deterministic


def test_unknown_env_id_suggests():
    with pytest.raises(gym.error.Error, match="Summarize"):
        gym.make("align_env/Sumarize-v0")


def test_episode_contract_pairwise():
    env = gym.make("align_env/Harmless-v0")
    obs, info = env.reset(seed=3)
    assert set(obs) == {"prompt", "messages"} and obs["messages"][-1]["content"] == obs["prompt"]
    item = env.unwrapped.track.split("train")
    by_id = {i.id: i for i in item}[info["prompt_id"]]
    refusal = "I'm sorry, but I can't help with that. If you are worried about safety, a local support line can help."
    helpful = "Sure, here is a detailed answer covering every part of your question with practical steps you can take."
    obs2, reward, terminated, truncated, info = env.step((refusal, helpful))
    assert terminated is True and truncated is False
    assert info["abstained"] is False and 0.0 <= info["preference"] <= 1.0
    assert reward == pytest.approx(2 * info["preference"] - 1)
    if by_id.meta["refusal_expected"]:
        assert info["preference"] > 0.5
    else:
        assert info["preference"] < 0.5
    cost = info["feedback_cost"]
    assert isinstance(cost, FeedbackCost) and cost.calls == 1 and cost.seconds >= 0
    with pytest.raises(AlignEnvError, match="reset"):
        env.step(("a", "b"))


def test_scalar_feedback_and_seeding_only_through_reset():
    env = gym.make("align_env/Summarize-v0", feedback="scalar")
    ids = []
    for _ in range(2):
        _, info = env.reset(seed=11)
        seq = [info["prompt_id"]]
        for _ in range(4):
            env.step("A short summary.")
            seq.append(env.reset()[1]["prompt_id"])
        ids.append(seq)
    assert ids[0] == ids[1] and len(set(ids[0])) == 5
    _, info = env.reset(seed=12)
    assert info["prompt_id"] != ids[0][0] or env.reset()[1]["prompt_id"] != ids[0][1]
    _, r, *_ = env.step("")
    assert r == 0.0


@pytest.mark.parametrize("bad, err", [("one string", TypeError), (("a", "b", "c"), ValueError),
                                      ((b"a", "b"), TypeError), (("a", None), TypeError), (3, TypeError)])
def test_wrong_action_type_or_arity(bad, err):
    env = gym.make("align_env/Helpful-v0", disable_env_checker=True)
    env.reset(seed=0)
    with pytest.raises(err):
        env.step(bad)


def test_scalar_rejects_pairs():
    env = gym.make("align_env/Helpful-v0", feedback="scalar", disable_env_checker=True)
    env.reset(seed=0)
    with pytest.raises(TypeError, match="must be str"):
        env.step(("a", "b"))


def test_bad_constructor_arguments_name_the_problem():
    with pytest.raises(AlignEnvError, match="Did you mean 'pairwise'"):
        AlignEnv(feedback="pairwize")
    with pytest.raises(AlignEnvError, match="Did you mean 'summarize'"):
        AlignEnv(track="sumarize")
    with pytest.raises(AlignEnvError, match="Did you mean 'rules'"):
        AlignEnv(annotator="rulez")
    with pytest.raises(AlignEnvError, match="split"):
        AlignEnv(split="test")


class Abstainer:
    """A real annotator object that abstains on every other item (as a judge with unparseable output would)."""

    spec = "abstainer"
    deterministic = True

    def __init__(self):
        self.cost = FeedbackCost()

    def pairwise(self, prompts, a, b):
        self.cost.calls += len(prompts)
        return [None if i % 2 == 0 else 0.9 for i in range(len(prompts))]

    def score(self, prompts, responses):
        self.cost.calls += len(prompts)
        return [None if i % 2 == 0 else float("nan") for i in range(len(prompts))]


def test_abstention_is_never_a_preference():
    env = AlignEnv(track="helpful", annotator=Abstainer())
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(("a", "b"))
    assert info["abstained"] is True and info["preference"] is None and reward == 0.0 and terminated
    env = AlignEnv(track="helpful", feedback="scalar", annotator=Abstainer())
    env.reset(seed=0)
    _, reward, _, _, info = env.step("a")
    assert info["abstained"] is True and info["score"] is None and reward == 0.0


def test_prompt_id_option_and_render():
    env = AlignEnv(track="summarize", render_mode="ansi")
    first = env.track.train[5]
    obs, info = env.reset(seed=0, options={"prompt_id": first.id})
    assert info["prompt_id"] == first.id and obs["prompt"] == first.prompt
    env.step(("x", "y"))
    assert first.prompt[:20] in env.render()
    with pytest.raises(AlignEnvError, match="Did you mean"):
        env.reset(options={"prompt_id": first.id + "x"})


def test_non_finite_or_out_of_range_verdicts_become_abstentions():
    class Broken(Abstainer):
        def pairwise(self, prompts, a, b):
            return [1.7 for _ in prompts]

    env = AlignEnv(track="helpful", annotator=Broken())
    env.reset(seed=0)
    _, reward, _, _, info = env.step(("a", "b"))
    assert info["abstained"] and reward == 0.0
    assert np.isfinite(reward)
