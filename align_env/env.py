"""AlignEnv: one prompt per episode, the agent answers, ``step`` returns the annotator's verdict.

Pairwise feedback: the action is a pair ``(a, b)``; ``info["preference"]`` is P(a better than b),
debiased over both orders by the annotator; ``reward = 2 * P - 1``. Scalar feedback: the action is one
string; ``reward`` is the annotator's score. When the annotator abstains, ``info["abstained"]`` is True,
``info["preference"]``/``info["score"]`` is None and the reward is 0.0: an abstention is never a
preference. Every episode is one step and ends with ``terminated=True``.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from align_env.errors import AlignEnvError, did_you_mean
from align_env.feedback import FeedbackCost, make_annotator, validate_verdicts
from align_env.spaces import ChatMessages, UnicodeText, check_pair, check_response
from align_env.text import check_texts
from align_env.tracks import PromptItem, get_track

FEEDBACK_KINDS = ("pairwise", "scalar")
MAX_RESPONSE_CHARS = 100_000
MAX_NUM_ENVS = 4096


@batch_space.register(UnicodeText)
@batch_space.register(ChatMessages)
def _batch_text_space(space, n: int = 1):
    return spaces.Tuple([space] * n)


def _spaces(feedback: str):
    if feedback not in FEEDBACK_KINDS:
        raise did_you_mean("feedback kind", feedback, FEEDBACK_KINDS)
    obs = spaces.Dict({"prompt": UnicodeText(), "messages": ChatMessages()})
    text = UnicodeText(max_length=MAX_RESPONSE_CHARS)
    act = spaces.Tuple((text, text)) if feedback == "pairwise" else text
    return obs, act


class PromptSampler:
    """Seeded order over a split: a fresh permutation from ``rng`` each pass (every prompt once per pass)."""

    def __init__(self, items: tuple[PromptItem, ...]):
        if not items:
            raise AlignEnvError("the track split has no prompts")
        self.items, self._order, self._pos = items, np.arange(0), 0
        self._by_id = {item.id: item for item in items}

    def next(self, rng: np.random.Generator) -> PromptItem:
        if self._pos >= len(self._order):
            self._order, self._pos = rng.permutation(len(self.items)), 0
        item = self.items[int(self._order[self._pos])]
        self._pos += 1
        return item

    def restart(self) -> None:
        self._order, self._pos = np.arange(0), 0

    def by_id(self, prompt_id: str) -> PromptItem:
        if prompt_id not in self._by_id:
            raise did_you_mean("prompt id", prompt_id, self._by_id)
        return self._by_id[prompt_id]

    def get_state(self) -> dict[str, Any]:
        """The pass order and position as plain JSON data (see :meth:`set_state`)."""
        return {"order": [int(i) for i in self._order], "pos": int(self._pos), "n_items": len(self.items),
                "first_id": self.items[0].id}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`get_state` was taken; refuses the state of a different split, and a
        corrupt one (order not a permutation of the split, position out of range, wrong types)."""
        if not isinstance(state, dict):
            raise AlignEnvError(f"corrupt sampler state: expected a dict, got {type(state).__name__}")
        if state.get("n_items") != len(self.items) or state.get("first_id") != self.items[0].id:
            raise AlignEnvError(f"sampler state is for a split of {state.get('n_items')!r:.40} prompts starting "
                                f"with {state.get('first_id')!r:.80}, not this one ({len(self.items)}, "
                                f"{self.items[0].id!r})")
        order, pos = state.get("order"), state.get("pos")
        if not isinstance(order, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in order):
            raise AlignEnvError("corrupt sampler state: order must be a list of ints")
        if isinstance(pos, bool) or not isinstance(pos, int):
            raise AlignEnvError(f"corrupt sampler state: pos must be an int, got {type(pos).__name__}")
        if order and sorted(order) != list(range(len(self.items))) or not 0 <= pos <= len(order):
            raise AlignEnvError("corrupt sampler state: order is not a permutation of the split or position out of "
                                "range")
        self._order, self._pos = np.asarray(order, dtype=np.int64), pos


def _restore(sampler: PromptSampler, state: Any, items_key: str) -> tuple:
    """Check a whole ``get_state`` snapshot before anything changes: (rng, seed, prompt ids)."""
    if not isinstance(state, dict):
        raise AlignEnvError(f"corrupt env state: expected a dict, got {type(state).__name__}")
    missing = sorted({"np_random", "np_random_seed", "sampler", items_key} - set(state))
    if missing:
        raise AlignEnvError(f"corrupt env state: missing {missing}")
    PromptSampler(sampler.items).set_state(state["sampler"])  # validates without touching the live sampler
    seed = state["np_random_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AlignEnvError(f"corrupt env state: np_random_seed must be an int or None, got {seed!r:.40}")
    try:
        rng = _rng_from_state(state["np_random"])
    except AlignEnvError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise AlignEnvError(f"corrupt env state: np_random cannot be restored ({type(exc).__name__}: {exc})") from exc
    ids = state[items_key]
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    for i in ids:
        if not isinstance(i, str):
            raise AlignEnvError(f"corrupt env state: {items_key} must hold prompt ids (str), got {i!r:.40}")
        sampler.by_id(i)
    return rng, seed, ids


def _check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise AlignEnvError(f"seed must be None or an int >= 0, got {type(seed).__name__}: {seed!r:.40}")
    return None if seed is None else int(seed)


def _check_options(options: Any) -> dict:
    """``reset`` options: ``None`` or a dict; the only key read is ``prompt_id`` (a str)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise AlignEnvError(f"reset options must be a dict or None, got {type(options).__name__}: {options!r:.80}")
    if "prompt_id" in options and not isinstance(options["prompt_id"], str):
        raise AlignEnvError(f"reset option prompt_id must be a str, got {type(options['prompt_id']).__name__}")
    return options


def _num_envs(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise AlignEnvError(f"num_envs must be an int, got {type(n).__name__}: {n!r:.40}")
    if not 1 <= n <= MAX_NUM_ENVS:
        raise AlignEnvError(f"num_envs must be in [1, {MAX_NUM_ENVS}], got {n}")
    return int(n)


def _unbatch_pairs(actions: Any, n: int) -> list[tuple[str, str]]:
    """Pairwise vector actions: always the columns ``(responses_a, responses_b)``, never a list of pairs.

    With ``num_envs == 2`` a list of two pairs has the same shape as two columns; the columns reading wins
    (the batched form of Gymnasium's ``Tuple`` space). Two bare strings are refused as ambiguous.
    """
    form = f"(responses_a, responses_b), each a sequence of {n} strings"
    if isinstance(actions, np.ndarray):
        if actions.ndim != 2 or actions.shape != (2, n):
            raise AlignEnvError(f"pairwise vector actions must be {form}; got an array of shape {actions.shape}, "
                                f"need shape (2, {n})")
    elif isinstance(actions, (str, bytes)) or not isinstance(actions, (tuple, list)):
        raise AlignEnvError(f"pairwise vector actions must be {form}; got {type(actions).__name__}")
    elif len(actions) != 2:
        hint = " (a list of (a, b) pairs? pass tuple(zip(*pairs)))" if len(actions) == n else ""
        raise AlignEnvError(f"pairwise vector actions must be {form}; got a sequence of {len(actions)}{hint}")
    a, b = actions[0], actions[1]
    if isinstance(a, str) and isinstance(b, str):
        raise AlignEnvError(f"ambiguous pairwise vector action: two strings. The vector env needs {form}; "
                            f"for one pair with num_envs=1 write ([a], [b])")
    for name, col in (("responses_a", a), ("responses_b", b)):
        if hasattr(col, "__len__") and not isinstance(col, (str, bytes)) and len(col) != n:
            raise AlignEnvError(f"pairwise vector actions must be {form}; {name} has {len(col)}")
    return list(zip(check_texts(a, "responses_a", n, MAX_RESPONSE_CHARS),
                    check_texts(b, "responses_b", n, MAX_RESPONSE_CHARS)))


def _observation(item: PromptItem) -> dict[str, Any]:
    return {"prompt": item.prompt, "messages": item.messages}


def _rng_state(rng: np.random.Generator | None) -> dict[str, Any] | None:
    return None if rng is None else rng.bit_generator.state


def _rng_from_state(state: dict[str, Any] | None) -> np.random.Generator | None:
    if state is None:
        return None
    if not isinstance(state, dict):
        raise AlignEnvError(f"corrupt env state: np_random must be a dict, got {type(state).__name__}")
    kind = state.get("bit_generator")
    if kind not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
        raise AlignEnvError(f"unknown bit generator {kind!r} in the env state")
    rng = np.random.Generator(getattr(np.random, kind)())
    rng.bit_generator.state = state
    return rng


def _judge(annotator, feedback: str, items: list[PromptItem], actions: list) -> tuple[list, FeedbackCost]:
    """One batched annotator call; returns (verdicts, cost of this call)."""
    before = getattr(annotator, "cost", FeedbackCost()).copy()
    start = time.perf_counter()
    if feedback == "pairwise":
        a, b = [x[0] for x in actions], [x[1] for x in actions]
        verdicts = annotator.pairwise(items, a, b)
    else:
        verdicts = annotator.score(items, actions)
    verdicts = validate_verdicts(verdicts, len(items), getattr(annotator, "spec", repr(annotator)), feedback)
    cost = getattr(annotator, "cost", None)
    if cost is None:  # third-party annotator without accounting: count judgements and time
        return verdicts, FeedbackCost(calls=len(items), seconds=time.perf_counter() - start)
    return verdicts, cost - before


def _reward(feedback: str, verdict: float | None) -> float:
    if verdict is None:
        return 0.0
    return 2.0 * verdict - 1.0 if feedback == "pairwise" else float(verdict)


def _step_info(feedback: str, item: PromptItem, verdict: float | None) -> dict[str, Any]:
    key = "preference" if feedback == "pairwise" else "score"
    return {"prompt_id": item.id, key: verdict, "abstained": verdict is None}


class AlignEnv(gym.Env[dict, Any]):
    """Single-prompt episodes on a track, judged by an annotator (see the module docstring)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, track: str = "summarize", feedback: str = "pairwise", annotator: Any = "rules",
                 split: str = "train", source: str = "embedded", render_mode: str | None = None,
                 track_kwargs: dict | None = None):
        if render_mode not in (None, "ansi"):
            raise did_you_mean("render mode", str(render_mode), self.metadata["render_modes"])
        self.track = get_track(track, source, **(track_kwargs or {}))
        self.feedback, self.split, self.render_mode = feedback, split, render_mode
        self.observation_space, self.action_space = _spaces(feedback)
        self.annotator = make_annotator(annotator, track=self.track.name)
        self._sampler = PromptSampler(self.track.split(split))
        self._item: PromptItem | None = None
        self._last: str = ""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=_check_seed(seed))
        if seed is not None:
            self._sampler.restart()
        options = _check_options(options)
        if "prompt_id" in options:
            self._item = self._sampler.by_id(options["prompt_id"])
        else:
            self._item = self._sampler.next(self.np_random)
        return _observation(self._item), {"prompt_id": self._item.id}

    def step(self, action: Any):
        if self._item is None:
            raise AlignEnvError("step() called before reset() (or after the episode ended): call reset() first")
        if self.feedback == "pairwise":
            action = check_pair(action, max_chars=MAX_RESPONSE_CHARS)
        else:
            action = check_response(action, max_chars=MAX_RESPONSE_CHARS)
        item, self._item = self._item, None
        (verdict,), cost = _judge(self.annotator, self.feedback, [item], [action])
        info = _step_info(self.feedback, item, verdict) | {"feedback_cost": cost}
        self._last = f"{item.prompt}\n-> {action!r}\n= {verdict}"
        return _observation(item), _reward(self.feedback, verdict), True, False, info

    def get_state(self) -> dict[str, Any]:
        """RNG, prompt order and current prompt as plain JSON data; :meth:`set_state` continues from it."""
        return {"np_random": _rng_state(self._np_random), "np_random_seed": self._np_random_seed,
                "sampler": self._sampler.get_state(), "item": None if self._item is None else self._item.id}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`get_state` snapshot: the next ``reset``/``step`` behave as they would have then."""
        rng, seed, ids = _restore(self._sampler, state, "item")
        self._sampler.set_state(state["sampler"])
        self._np_random, self._np_random_seed = rng, seed
        self._item = self._sampler.by_id(ids[0]) if ids else None

    def render(self):
        if self.render_mode == "ansi":
            return self._last
        return None


class AlignVectorEnv(VectorEnv):
    """Natively batched AlignEnv: one annotator call per ``step`` for the whole batch.

    Observations are ``{"prompt": tuple[str], "messages": tuple[list]}``; pairwise actions are
    ``(responses_a, responses_b)`` (the batched form of the single action space), scalar actions a
    sequence of strings. Every sub-env terminates each step and resets in the same step
    (``AutoresetMode.SAME_STEP``): the returned observation is already the next prompt, and the judged
    prompt is in ``info["final_obs"]``.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 8, track: str = "summarize", feedback: str = "pairwise",
                 annotator: Any = "rules", split: str = "train", source: str = "embedded",
                 track_kwargs: dict | None = None, render_mode: str | None = None):
        if render_mode is not None:
            raise AlignEnvError(f"AlignVectorEnv has no render modes, got render_mode={render_mode!r}")
        self.num_envs = _num_envs(num_envs)
        self.track = get_track(track, source, **(track_kwargs or {}))
        self.feedback, self.split, self.render_mode = feedback, split, render_mode
        self.single_observation_space, self.single_action_space = _spaces(feedback)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.annotator = make_annotator(annotator, track=self.track.name)
        self._sampler = PromptSampler(self.track.split(split))
        self._items: list[PromptItem] = []

    def _draw(self) -> dict[str, tuple]:
        self._items = [self._sampler.next(self.np_random) for _ in range(self.num_envs)]
        return {"prompt": tuple(i.prompt for i in self._items), "messages": tuple(i.messages for i in self._items)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=_check_seed(seed))
        if seed is not None:
            self._sampler.restart()
        _check_options(options)
        obs = self._draw()
        return obs, {"prompt_id": np.array([i.id for i in self._items], dtype=object)}

    def _unbatch(self, actions: Any) -> list:
        if self.feedback == "pairwise":
            return _unbatch_pairs(actions, self.num_envs)
        if isinstance(actions, str):
            raise AlignEnvError(f"scalar vector actions must be a sequence of {self.num_envs} strings, not one string")
        if hasattr(actions, "__len__") and len(actions) != self.num_envs:
            raise AlignEnvError(f"scalar vector actions must be a sequence of {self.num_envs} strings, "
                                f"got {len(actions)}")
        return check_texts(actions, "scalar vector actions", self.num_envs, MAX_RESPONSE_CHARS)

    def step(self, actions: Any):
        if not self._items:
            raise AlignEnvError("step() called before reset(): call reset() first")
        judged = self._unbatch(actions)
        items = self._items
        verdicts, cost = _judge(self.annotator, self.feedback, items, judged)
        rewards = np.array([_reward(self.feedback, v) for v in verdicts], dtype=np.float64)
        key = "preference" if self.feedback == "pairwise" else "score"
        final_obs = np.array([_observation(i) for i in items], dtype=object)
        info = {
            "prompt_id": np.array([i.id for i in items], dtype=object),
            key: np.array([np.nan if v is None else v for v in verdicts], dtype=np.float64),
            "abstained": np.array([v is None for v in verdicts]),
            "final_obs": final_obs,
            "_final_obs": np.ones(self.num_envs, dtype=bool),
            "feedback_cost": cost,
        }
        obs = self._draw()
        terminated = np.ones(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        return obs, rewards, terminated, truncated, info

    def get_state(self) -> dict[str, Any]:
        """RNG, prompt order and the current batch of prompts as plain JSON data (see :meth:`set_state`)."""
        return {"np_random": _rng_state(self._np_random), "np_random_seed": self._np_random_seed,
                "sampler": self._sampler.get_state(), "items": [i.id for i in self._items],
                "num_envs": self.num_envs}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`get_state` snapshot; :meth:`current_observation` then gives the pending batch."""
        if not isinstance(state, dict) or state.get("num_envs") != self.num_envs:
            got = state.get("num_envs") if isinstance(state, dict) else type(state).__name__
            raise AlignEnvError(f"env state is for num_envs={got!r:.40}, this env has {self.num_envs}")
        rng, seed, ids = _restore(self._sampler, state, "items")
        if ids and len(ids) != self.num_envs:
            raise AlignEnvError(f"corrupt env state: {len(ids)} pending prompts for num_envs={self.num_envs}")
        self._sampler.set_state(state["sampler"])
        self._np_random, self._np_random_seed = rng, seed
        self._items = [self._sampler.by_id(i) for i in ids]

    def current_observation(self) -> tuple[dict[str, tuple], dict[str, Any]]:
        """The pending batch (what the last ``reset``/``step`` returned) as ``(obs, info)``."""
        if not self._items:
            raise AlignEnvError("no pending batch: call reset() first")
        obs = {"prompt": tuple(i.prompt for i in self._items), "messages": tuple(i.messages for i in self._items)}
        return obs, {"prompt_id": np.array([i.id for i in self._items], dtype=object)}
