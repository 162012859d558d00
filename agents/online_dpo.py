"""``online-dpo``: direct alignment from online AI feedback (OAIF; Guo et al. 2024, arXiv 2402.04792).

The algorithm box (``docs/algorithms.md``, section 1), one env step at a time::

    for each batch of prompts x:                                   # the env's batch (num_envs prompts)
        y1, y2 ~ pi_theta(. | x)                                   # act(): two samples from the CURRENT policy
        p = P(y1 better than y2 | x)                               # env.step(): the annotator, both orders
        (y+, y-) = (y1, y2) if p > 0.5 else (y2, y1)                # update(): hard label from the verdict
        L = mean over pairs of loss(h)                             # h = [log pi_theta(y+|x) - log pi_ref(y+|x)]
                                                                   #   - [log pi_theta(y-|x) - log pi_ref(y-|x)]
        theta <- optimizer step on L (after ``grad_accum`` updates)

with ``loss`` one of DPO ``-log sigma(beta h)``, IPO ``(h - 1/(2 beta))^2``, SLiC ``max(0, 1 - beta h)``
(:mod:`agents.losses`). No gradient flows through sampling or annotation. The reference pi_ref is the
initial policy: with LoRA the base model with adapters disabled, otherwise a frozen copy (:mod:`agents.policy`).

Which pairs enter the update:

* an abstained pair (``info["abstained"]`` or a NaN preference) is dropped and counted (``abstained``). This
  avoids the known pitfall of a public implementation, where a judge failure (-1) silently made the second
  answer the chosen one: an abstention never becomes a preference here;
* a tie (``p == 0.5`` exactly, e.g. two identical answers, or a rules annotator scoring both the same) is
  dropped and counted (``ties``): it says neither answer is better, and a hard label would be a coin flip;
* every other pair is used with the hard label ``p > 0.5``, as the paper does.

Not in the paper, for robustness: a non-finite loss or gradient skips the update (counted in
``nonfinite_skipped``); ``max_nonfinite`` of them in a row raise :class:`NonFiniteLossError` so the loop
stops with its last checkpoint intact.

Length control (the OAIF experiment): ``length_control`` is an instruction appended to the annotator's
prompt. The annotator lives in the environment, so the agent exposes the spec the environment must use as
``agent.annotator_spec`` (see :func:`with_length_control`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.pair_trainer import NonFiniteLossError, PairTrainer, PairTrainingConfig, make_policy
from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError
from align_env.feedback import with_length_control

__all__ = ["OnlineDPO", "OnlineDPOConfig", "NonFiniteLossError", "with_length_control"]


@dataclass
class OnlineDPOConfig(PairTrainingConfig):
    """OAIF settings: the shared pair-training settings plus how the two responses are sampled and judged."""

    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of the two responses (paper: 0.9)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (paper: none, 1.0)"})
    length_control: str = field(default="", metadata={
        "help": "instruction appended to the annotator's prompt, e.g. 'Prefer the shorter answer.' (the OAIF "
                "length-control experiment); see align_env.feedback.with_length_control for what each family takes"})

    def __post_init__(self):
        super().__post_init__()
        self.require({"temperature > 0": self.temperature > 0, "0 < top_p <= 1": 0 < self.top_p <= 1})


@dataclass
class _Sampled:
    """What act() produced, kept for update(): prompts, the two responses, whether each ended by itself."""

    messages: list
    a: list[str]
    b: list[str]
    ended: list[tuple[bool, bool]]
    lengths: list[int]
    seconds: float


# -- the agent --------------------------------------------------------------------------------------------
class OnlineDPO:
    """Online DPO / IPO / SLiC with online AI feedback (see the module docstring)."""

    name = "online-dpo"
    Config = OnlineDPOConfig
    feedback = "pairwise"

    def __init__(self, config: OnlineDPOConfig, *, track: str, annotator: Any = None, seed: int = 0):
        self.config, self.track, self.seed = config, track, int(seed)
        self.annotator_spec = with_length_control(annotator, config.length_control)  # what the env must judge with
        self.policy = make_policy(config, self.seed)
        self.trainer = PairTrainer(self.policy, config)
        self.rng = np.random.default_rng(self.seed)  # one draw per act() seeds that act's sampling
        self._last: _Sampled | None = None

    # -- acting -----------------------------------------------------------------------------------------
    def act(self, observations: dict[str, tuple]) -> tuple[list[str], list[str]]:
        """Two samples per prompt from the current policy: ``(responses_a, responses_b)``."""
        messages = list(observations["messages"])
        seed = int(self.rng.integers(2**31))
        start = time.perf_counter()
        gens = self.policy.sample(messages, n=2, temperature=self.config.temperature, top_p=self.config.top_p,
                                  seed=seed)
        seconds = time.perf_counter() - start
        self._last = _Sampled(
            messages, [g[0].text for g in gens], [g[1].text for g in gens],
            [(g[0].finish_reason == "stop", g[1].finish_reason == "stop") for g in gens],
            [x.tokens for g in gens for x in g], seconds)
        return list(self._last.a), list(self._last.b)

    def respond(self, observations: dict[str, tuple], *, seed: int = 0, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """One answer per prompt from the current policy, for evaluation (``temperature=0`` is greedy; None keeps
        the training settings). Leaves the agent's RNG alone."""
        gens = self.policy.sample(list(observations["messages"]), n=1,
                                  temperature=self.config.temperature if temperature is None else temperature,
                                  top_p=self.config.top_p if top_p is None else top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
        return [g[0].text for g in gens]

    # -- learning ---------------------------------------------------------------------------------------
    def update(self, transitions: Transitions) -> dict[str, float]:
        """Label each pair by its verdict, drop abstentions and ties, take one (micro-)step of the loss."""
        sampled, self._last = self._last, None
        _check_matches(sampled, transitions)
        prefs = transitions.preferences
        abstained = transitions.abstained | np.isnan(prefs)
        ties = ~abstained & (prefs == 0.5)
        prompts, chosen, rejected = [], [], []
        for i in np.flatnonzero(~abstained & ~ties):
            a_first = prefs[i] > 0.5
            (ca, cb), (ea, eb) = (sampled.a[i], sampled.b[i]), sampled.ended[i]
            win, win_end, lose, lose_end = (ca, ea, cb, eb) if a_first else (cb, eb, ca, ea)
            prompts.append(self.policy.prompt_ids(sampled.messages[i]))
            chosen.append(self.policy.response_ids(win, win_end))
            rejected.append(self.policy.response_ids(lose, lose_end))
        start = time.perf_counter()
        metrics = self.trainer.train(prompts, chosen, rejected)
        generated = sum(sampled.lengths)
        return metrics | {
            "pairs_used": float(len(prompts)),
            "abstained": float(abstained.sum()),
            "ties": float(ties.sum()),
            "response_length": float(np.mean(sampled.lengths)),
            "generated_tokens": float(generated),
            "tokens_per_second": generated / max(sampled.seconds, 1e-9),
            "sample_seconds": sampled.seconds,
            "update_seconds": time.perf_counter() - start,
        }

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Adapters or weights, optimizer + scheduler (+ an unfinished accumulation's gradients), RNG, counters."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save(folder)
        self.trainer.save(folder)
        save_meta(folder, self.name, self.config,
                  {"rng": rng_state(self.rng), "seed": self.seed, "trainer": self.trainer.counters()})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = load_meta(folder, self.name, self.config, must_match=("model", "lora", "lora_r", "loss", "optimizer"))
        self.policy.load(folder)
        self.trainer.load(folder, state["trainer"])
        set_rng_state(self.rng, state["rng"])
        self._last = None


def _check_matches(sampled: _Sampled | None, transitions: Transitions) -> None:
    if sampled is None:
        raise AlignEnvError("update() without a preceding act(): the agent trains on the pairs it sampled itself")
    actions = transitions.actions
    if not (isinstance(actions, (tuple, list)) and len(actions) == 2
            and list(actions[0]) == sampled.a and list(actions[1]) == sampled.b):
        raise AlignEnvError("update() got actions that are not the ones this agent's last act() returned")
    if len(transitions.preferences) != len(sampled.a):
        raise AlignEnvError(f"update() got {len(transitions.preferences)} verdicts for {len(sampled.a)} pairs")
