"""Conformance checks for plugged-in agents, importable the PettingZoo way (``pettingzoo/test/api_test.py``).

>>> from align_env.testing import check_agent            # doctest: +SKIP
>>> check_agent(my_agent, AlignVectorEnv(num_envs=2, annotator="rules", feedback=my_agent.feedback))

:func:`check_agent` runs a few real steps of the agent in a batched environment and checks:

1. the :class:`agents.Agent` protocol: a ``feedback`` attribute ("pairwise" or "scalar") that matches the
   environment's, and callable ``act``, ``update``, ``save``, ``load``;
2. ``act`` returns a valid batched action for that feedback kind and the env's ``num_envs``:
   ``(responses_a, responses_b)`` of ``num_envs`` strings each (pairwise) or ``num_envs`` strings (scalar);
3. ``update`` returns a ``dict[str, float]`` of finite numbers;
4. ``save`` writes into the folder it is given, and ``load`` restores behaviour: ``save``, then ``act`` ->
   ``update`` (training may change the weights), then ``load`` and ``act`` on the same observations must
   give the same actions, and ``update`` on the same transitions the same metrics (timings aside).

Failures raise ``AssertionError`` with a message naming the problem. The environment is reset with ``seed``.
"""

from __future__ import annotations

import math
import tempfile
from numbers import Real
from pathlib import Path
from typing import Any

FEEDBACK_KINDS = ("pairwise", "scalar")
TIMING_WORDS = ("second", "per_second", "time")  # metrics that measure wall time are not compared


def _fail(message: str) -> None:
    raise AssertionError(f"check_agent: {message}")


def _check_protocol(agent: Any, env: Any) -> str:
    for method in ("act", "update", "save", "load"):
        if not callable(getattr(agent, method, None)):
            _fail(f"{type(agent).__name__} has no callable {method}() (the agents.Agent protocol needs "
                  "act, update, save, load and a feedback attribute)")
    feedback = getattr(agent, "feedback", None)
    if feedback not in FEEDBACK_KINDS:
        _fail(f"{type(agent).__name__}.feedback must be 'pairwise' or 'scalar', got {feedback!r}")
    env_feedback = getattr(getattr(env, "unwrapped", env), "feedback", None)
    if env_feedback is not None and env_feedback != feedback:
        _fail(f"the agent gives {feedback!r} actions but the env asks for {env_feedback!r} feedback; "
              f"build the env with feedback={feedback!r}")
    return feedback


def _check_strings(values: Any, n: int, what: str) -> None:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        _fail(f"{what} must be a sequence of {n} strings, got {type(values).__name__}")
    if len(values) != n:
        _fail(f"{what} has {len(values)} responses for {n} prompts")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            _fail(f"{what}[{i}] must be str, got {type(value).__name__}: {value!r:.60}")


def check_action(action: Any, feedback: str, num_envs: int) -> None:
    """A valid batched action for ``feedback`` and ``num_envs`` prompts, or AssertionError."""
    if feedback == "pairwise":
        if not isinstance(action, (tuple, list)) or len(action) != 2:
            _fail(f"a pairwise action must be (responses_a, responses_b), got {type(action).__name__}"
                  + (f" of length {len(action)}" if hasattr(action, "__len__") else ""))
        _check_strings(action[0], num_envs, "responses_a")
        _check_strings(action[1], num_envs, "responses_b")
    else:
        _check_strings(action, num_envs, "the scalar action")


def check_metrics(metrics: Any) -> None:
    """A ``dict[str, float]`` of finite numbers, or AssertionError."""
    if not isinstance(metrics, dict):
        _fail(f"update() must return a dict of metrics, got {type(metrics).__name__}")
    for key, value in metrics.items():
        if not isinstance(key, str):
            _fail(f"metric names must be str, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, Real):
            _fail(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r:.60}")
        if not math.isfinite(float(value)):
            _fail(f"metric {key!r} is not finite: {value}")


def _comparable(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if not any(w in k for w in TIMING_WORDS)}


def check_agent(agent: Any, env: Any, *, seed: int = 0, steps: int = 2, folder: str | Path | None = None) -> None:
    """Run the conformance checks of the module docstring on ``agent`` in the batched ``env``."""
    from agents.protocol import Transitions

    feedback = _check_protocol(agent, env)
    num_envs = int(getattr(env, "num_envs", 1))
    obs, _ = env.reset(seed=seed)
    for _ in range(max(1, steps)):
        action = agent.act(obs)
        check_action(action, feedback, num_envs)
        next_obs, rewards, _, _, infos = env.step(action)
        check_metrics(agent.update(Transitions.from_vector_step(action, rewards, infos)))
        obs = next_obs

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(folder) if folder is not None else Path(tmp) / "checkpoint"
        agent.save(where)
        if not where.is_dir() or not any(where.iterdir()):
            _fail(f"save({where}) wrote nothing into the folder")
        first = agent.act(obs)
        next_obs, rewards, _, _, infos = env.step(first)
        transitions = Transitions.from_vector_step(first, rewards, infos)
        first_metrics = agent.update(transitions)
        check_metrics(first_metrics)
        agent.load(where)
        again = agent.act(obs)
        if _as_lists(again) != _as_lists(first):
            _fail("after load(), act() on the same observations gave different actions than right after save(): "
                  "save/load must restore the weights and the RNG state")
        again_metrics = agent.update(transitions)
        check_metrics(again_metrics)
        a, b = _comparable(first_metrics), _comparable(again_metrics)
        if a.keys() != b.keys() or any(not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7) for k in a):
            diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
            _fail(f"after load(), update() on the same transitions gave different metrics: {diff}")


def _as_lists(action: Any) -> Any:
    if isinstance(action, (tuple, list)) and action and not isinstance(action[0], str):
        return [list(x) for x in action]
    return list(action)
