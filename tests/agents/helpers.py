"""Test helpers: a deterministic annotator family that prefers shorter answers, and a model-free plug-in agent."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align_env.feedback import FeedbackCost, register_family


class ShorterAnnotator:
    """P(a better) = sigmoid((len(b) - len(a)) / temperature), lengths in characters; equal lengths give 0.5.

    ``abstain_on_ties=True`` abstains (None) instead; ``abstain_every=k`` abstains on every k-th pair of a
    batch (0, k, 2k, ...), to exercise the abstention path.
    """

    deterministic = True
    cacheable = False

    def __init__(self, temperature: float = 4.0, abstain_on_ties: bool = False, abstain_every: int = 0,
                 spec: str = "shorter"):
        self.temperature, self.abstain_on_ties, self.spec = float(temperature), bool(abstain_on_ties), spec
        self.abstain_every = int(abstain_every)
        self.cost = FeedbackCost()

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        self.cost = self.cost + FeedbackCost(calls=len(responses))
        return [-float(len(r)) for r in responses]

    def pairwise(self, prompts: Sequence, a: Sequence[str], b: Sequence[str]) -> list[float | None]:
        self.cost = self.cost + FeedbackCost(calls=len(a))
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            if (len(x) == len(y) and self.abstain_on_ties) or (self.abstain_every and i % self.abstain_every == 0):
                out.append(None)
            else:
                out.append(1.0 / (1.0 + math.exp(-(len(y) - len(x)) / self.temperature)))
        return out


def shorter(spec, track):
    return ShorterAnnotator(spec=str(spec), **spec.params)


register_family("shorter", "tests.agents.helpers:shorter")


# -- a model-free plug-in agent (registry and check_agent tests) ----------------------------------------------


@dataclass
class WordsConfig:
    words: int = field(default=3, metadata={"help": "most words per answer"})
    forget_rng_on_load: bool = field(default=False, metadata={"help": "a deliberate bug for check_agent tests"})
    wrong_size: bool = field(default=False, metadata={"help": "a deliberate bug: one answer too few"})


class WordsAgent:
    """Answers with a seeded random number (1..words) of the prompt's first words; scalar feedback."""

    Config = WordsConfig
    feedback = "scalar"

    def __init__(self, config: WordsConfig, *, track: str, annotator=None, seed: int = 0):
        self.config, self.track, self.annotator, self.seed = config, track, annotator, seed
        self.rng = np.random.default_rng(seed)

    def act(self, observations):
        out = [" ".join(p.split()[: int(self.rng.integers(1, self.config.words + 1))]) for p in observations["prompt"]]
        return out[:-1] if self.config.wrong_size else out

    def update(self, transitions):
        return {"reward": float(np.mean(transitions.rewards))}

    def save(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "rng.json").write_text(json.dumps(self.rng.bit_generator.state))

    def load(self, folder):
        if not self.config.forget_rng_on_load:
            self.rng.bit_generator.state = json.loads((Path(folder) / "rng.json").read_text())

