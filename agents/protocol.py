"""The agent protocol (DESIGN.md, "Agents"): what the training loop calls, nothing more.

An agent is any object with ``act``, ``update``, ``save`` and ``load``; no base class. It talks to a
natively batched :class:`align_env.env.AlignVectorEnv` through the loop in :mod:`benchmarks.loop`:

* ``act(observations)`` gets the vector env's batched observation ``{"prompt": tuple[str, ...],
  "messages": tuple[list[dict], ...]}`` and returns the batched action: ``(responses_a, responses_b)``
  for pairwise feedback, a sequence of strings for scalar feedback (``feedback`` says which).
* ``update(transitions)`` gets what ``step`` returned for those actions and returns metrics
  (``dict[str, float]``; names in :data:`METRIC_NAMES` where they apply) for the log.
* ``save(folder)`` / ``load(folder)`` write and read everything the agent needs to continue training
  (weights or adapters, optimizer and scheduler state, its RNG and step counters), in ``folder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Feedback = Literal["pairwise", "scalar"]

METRIC_NAMES = (
    "loss",  # the training loss of this update
    "reward_margin",  # mean implicit reward of chosen minus rejected: beta * h
    "implicit_kl",  # mean log pi_theta(y|x) - log pi_ref(y|x) over sampled responses (a KL estimate)
    "response_length",  # mean response length in tokens
    "pairs_used",  # preference pairs that entered the update
    "abstained",  # pairs dropped because the annotator abstained
    "tokens_per_second",  # generated tokens per second of sampling
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
