"""The agent protocol: what the training loop calls, nothing more.

An agent is any object with ``act``, ``update``, ``save`` and ``load``; no base class. It talks to a
natively batched :class:`align_env.env.AlignVectorEnv` through the loop in :mod:`benchmarks.loop`:

* ``act(observations)`` gets the vector env's batched observation ``{"prompt": tuple[str, ...],
  "messages": tuple[list[dict], ...]}`` and returns the batched action: ``(responses_a, responses_b)``
  for pairwise feedback, a sequence of strings for scalar feedback (``feedback`` says which).
* ``update(transitions)`` gets what ``step`` returned for those actions and returns metrics
  (``dict[str, float]``; names in :data:`METRIC_NAMES` where they apply) for the log.
* ``save(folder)`` / ``load(folder)`` write and read everything the agent needs to continue training
  (weights or adapters, optimizer and scheduler state, its RNG and step counters), in ``folder``.
  The loop checkpoints after ``update``, never between ``act`` and ``update``.

Optional, offered by the built-in agents (look them up with ``getattr``):

* ``annotator_spec``: the annotator spec the environment should judge with (the one given to
  ``make_agent``, with the agent's length-control instruction added where it has one);
* ``respond(observations, *, seed=0, temperature=None, top_p=None, max_new_tokens=None) -> list[str]``: one
  answer per prompt, for evaluation (``align-env eval`` asks for ``temperature=0``, greedy; ``None`` keeps the
  agent's own settings); it leaves the agent's training RNG alone.

Checkpoints of the built-in agents carry ``agent.json`` (:func:`save_meta`): the agent's name, its config and
its JSON-able state; loading a checkpoint of another agent or model is an error that says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from align_env.errors import AlignEnvError

Feedback = Literal["pairwise", "scalar"]

METRIC_NAMES = (
    "loss",  # the training loss of this update
    "reward_margin",  # mean implicit reward of chosen minus rejected: beta * h
    "implicit_kl",  # mean log pi_theta(y|x) - log pi_ref(y|x) over sampled responses (a KL estimate)
    "response_length",  # mean response length in tokens
    "pairs_used",  # preference pairs that entered the update
    "abstained",  # pairs dropped because the annotator abstained
    "tokens_per_second",  # generated tokens per second of sampling
    "generated_tokens",  # tokens the agent sampled in this step (all samples, all prompts)
    "trained_tokens",  # tokens run through the policy with gradient in this step (prompt + responses)
)


@dataclass(frozen=True)
class Transitions:
    """One vector-env step: the judged observations, the actions taken, and what ``step`` returned.

    ``observations`` are the prompts the actions answered (the vector env's ``info["final_obs"]``
    regathered in batched form), not the next prompts that ``step`` already drew.
    """

    observations: dict[str, tuple]
    actions: Any
    rewards: np.ndarray
    infos: dict[str, Any]

    @classmethod
    def from_vector_step(cls, actions: Any, rewards: np.ndarray, infos: dict[str, Any]) -> Transitions:
        """Build the transitions of one :class:`~align_env.env.AlignVectorEnv` step from what ``step`` returned.

        The judged prompts come from ``infos["final_obs"]`` (the vector env resets in the same step).
        """
        final = infos["final_obs"]
        observations = {"prompt": tuple(o["prompt"] for o in final), "messages": tuple(o["messages"] for o in final)}
        return cls(observations=observations, actions=actions, rewards=np.asarray(rewards), infos=infos)

    def __len__(self) -> int:
        return len(self.observations["prompt"])

    @property
    def preferences(self) -> np.ndarray:
        """P(a better than b) per pair; NaN where the annotator abstained."""
        return np.asarray(self.infos["preference"], dtype=np.float64)

    @property
    def abstained(self) -> np.ndarray:
        return np.asarray(self.infos["abstained"], dtype=bool)


@runtime_checkable
class Agent(Protocol):
    """What the loop needs from an agent (see the module docstring)."""

    feedback: Feedback

    def act(self, observations: dict[str, tuple]) -> Any: ...

    def update(self, transitions: Transitions) -> dict[str, float]: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


# -- checkpoint metadata (shared by the built-in agents) --------------------------------------------------
META_FILE = "agent.json"


def save_meta(folder: Path, agent: str, config: Any, state: dict[str, Any]) -> None:
    """Write ``agent.json``: the agent's registry name, its config (a dataclass) and its JSON-able state."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"agent": agent, "config": asdict(config), "state": state}
    (folder / META_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")


def load_meta(folder: Path, agent: str, config: Any, must_match: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Read ``agent.json`` and return its state; a checkpoint of another agent or model is a clear error."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise AlignEnvError(f"{folder} is not an agent checkpoint ({META_FILE} is missing)")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("agent") != agent:
        raise AlignEnvError(f"{folder} is a checkpoint of agent {payload.get('agent')!r}, not {agent!r}")
    saved, current = payload.get("config", {}), asdict(config)
    for key in must_match:
        if saved.get(key) != current.get(key):
            raise AlignEnvError(
                f"{folder}: checkpoint has {key}={saved.get(key)!r}, this agent has {key}={current.get(key)!r}")
    return payload["state"]


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as JSON-able data (PCG64 state is plain ints)."""
    return rng.bit_generator.state


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state
