"""``initial``: the untrained policy, the reference every evaluation compares against.

It samples answers from the initial weights and never trains: ``update`` only reports what was sampled
(response length, tokens per second). With ``feedback="scalar"`` (default) ``act`` returns one sample per
prompt; with ``feedback="pairwise"`` two, so it runs in either kind of environment at the same cost as the
agent it is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError, did_you_mean


@dataclass
class InitialConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "policy: catalogue name, local folder or hub id"})
    feedback: str = field(default="scalar", metadata={
        "help": "'scalar': one sample per prompt, scored; 'pairwise': two samples per prompt, compared"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (OAIF samples at 0.9)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens per response"})
    bf16: bool = field(default=False, metadata={"help": "sample under bf16 autocast on CPU"})

    def __post_init__(self):
        if self.feedback not in ("scalar", "pairwise"):
            raise did_you_mean("feedback kind", self.feedback, ("scalar", "pairwise"))
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise AlignEnvError(f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1: {self}")


class InitialPolicy:
    """The untrained policy (see the module docstring)."""

    name = "initial"
    trains = False  # evaluated by name (align-env eval); nothing to train
    Config = InitialConfig

    def __init__(self, config: InitialConfig, *, track: str, annotator=None, seed: int = 0):
        from align_env.engines.transformers_engine import TransformersEngine
        from align_env.models import load_causal_lm

        self.config, self.track, self.annotator_spec, self.seed = config, track, annotator, int(seed)
        self.feedback = config.feedback
        model, tokenizer = load_causal_lm(config.model)
        model.eval().requires_grad_(False)
        self.engine = TransformersEngine(model, tokenizer)
        self.rng = np.random.default_rng(self.seed)
        self._lengths: list[int] = []
        self._tokens, self._seconds = 0, 0.0

    def _generate(self, observations: dict, n: int, seed: int, temperature: float | None = None,
                  top_p: float | None = None, max_new_tokens: int | None = None) -> list[list]:
        from agents.policy import autocast

        with autocast(self.config.bf16):
            return self.engine.generate(list(observations["messages"]), n=n,
                                        temperature=self.config.temperature if temperature is None else temperature,
                                        top_p=self.config.top_p if top_p is None else top_p,
                                        max_new_tokens=max_new_tokens or self.config.max_new_tokens, seed=seed)

    def _sample(self, observations: dict, n: int) -> list[list]:
        start = time.perf_counter()
        gens = self._generate(observations, n, int(self.rng.integers(2**31)))
        self._seconds += time.perf_counter() - start
        for group in gens:
            self._lengths += [g.tokens for g in group]
            self._tokens += sum(g.tokens for g in group)
        return gens

    def act(self, observations: dict):
        if self.feedback == "scalar":
            return [g[0].text for g in self._sample(observations, 1)]
        gens = self._sample(observations, 2)
        return [g[0].text for g in gens], [g[1].text for g in gens]

    def respond(self, observations: dict, *, seed: int = 0, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """One answer per prompt (what an evaluation compares; ``temperature=0`` is greedy, None keeps the
        config's); leaves the agent's RNG alone."""
        return [g[0].text for g in self._generate(observations, 1, seed, temperature, top_p, max_new_tokens)]

    def update(self, transitions: Transitions) -> dict[str, float]:
        """No training. Reports the mean length (tokens) and speed of the samples since the last update."""
        metrics = {}
        if self._lengths:
            metrics = {"response_length": float(np.mean(self._lengths)), "generated_tokens": float(self._tokens),
                       "tokens_per_second": self._tokens / max(self._seconds, 1e-9)}
        self._lengths, self._tokens, self._seconds = [], 0, 0.0
        return metrics

    def save(self, folder: Path) -> None:
        save_meta(Path(folder), self.name, self.config, {"rng": rng_state(self.rng), "seed": self.seed})

    def load(self, folder: Path) -> None:
        state = load_meta(Path(folder), self.name, self.config)
        set_rng_state(self.rng, state["rng"])
