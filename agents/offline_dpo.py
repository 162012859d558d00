"""``offline-dpo``: the same direct-alignment losses on a fixed preference set (the OAIF paper's main baseline).

The set is one of (``pairs=``):

* ``"track"``: the track's labelled pairs (``get_track(track).pairs``: prompt, chosen, rejected), the
  "pre-collected offline data" of the paper;
* ``"annotator"``: pairs labelled once, up front, by the same annotator as the online run, from two samples
  of the *initial* policy for each of ``num_pairs`` training prompts (the OAIF offline baseline: the same
  feedback source, but on off-policy samples that never change). Abstentions and ties are dropped there
  too; the labelling cost is reported once, in the first update's ``annotator_calls``.

The loop stays the same as for online agents: ``act`` still returns two samples of the current policy per
prompt (so the environment runs and its verdicts on current samples are logged as ``online_preference``, a
free measure of progress), but ``update`` ignores them and trains on the next batch of the fixed set, of
the same size as the env's batch. So ``N`` env steps make ``N`` updates on ``N * num_envs`` pairs, as
online DPO does. The set is reshuffled (seeded) at each pass; ``epochs`` in the metrics counts the passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.pair_trainer import PairTrainer, PairTrainingConfig, make_policy
from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError, did_you_mean
from align_env.feedback import with_length_control

PAIR_SOURCES = ("track", "annotator")


@dataclass
class OfflineDPOConfig(PairTrainingConfig):
    """The shared pair-training settings, how its (logged, untrained) samples are drawn, and where the fixed
    preference set comes from."""

    temperature: float = field(default=0.9, metadata={
        "help": "sampling temperature of act()'s samples and of the up-front labelled pairs (as online-dpo)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    length_control: str = field(default="", metadata={
        "help": "instruction appended to the annotator's prompt (as online-dpo's length_control)"})
    pairs: str = field(default="track", metadata={
        "help": "'track': the track's labelled pairs; 'annotator': pairs of initial-policy samples labelled once "
                "up front by the run's annotator (the OAIF offline baseline)"})
    num_pairs: int = field(default=128, metadata={
        "help": "with pairs='annotator': training prompts to sample and label up front (two samples each)"})

    def __post_init__(self):
        super().__post_init__()
        self.require({"temperature > 0": self.temperature > 0, "0 < top_p <= 1": 0 < self.top_p <= 1})
        if self.pairs not in PAIR_SOURCES:
            raise did_you_mean("offline pair source", self.pairs, PAIR_SOURCES)
        if self.num_pairs < 1:
            raise AlignEnvError(f"offline-dpo: num_pairs must be >= 1, got {self.num_pairs}")


@dataclass(frozen=True)
class TextPair:
    messages: list
    chosen: str
    rejected: str
    chosen_ended: bool = True
    rejected_ended: bool = True


class OfflineDPO:
    """Offline DPO / IPO / SLiC on a fixed set (see the module docstring)."""

    name = "offline-dpo"
    Config = OfflineDPOConfig
    feedback = "pairwise"

    def __init__(self, config: OfflineDPOConfig, *, track: str, annotator: Any = None, seed: int = 0):
        self.config, self.track, self.seed = config, track, int(seed)
        self.annotator_spec = with_length_control(annotator, config.length_control)
        if config.pairs == "annotator" and self.annotator_spec is None:
            raise AlignEnvError("offline-dpo with pairs='annotator' needs an annotator to label its set")
        self.policy = make_policy(config, self.seed)
        self.trainer = PairTrainer(self.policy, config)
        self.rng = np.random.default_rng(self.seed)
        self.data: list[TextPair] | None = None  # built lazily (labelling samples the initial policy)
        self.order, self.cursor, self.epochs = np.arange(0), 0, 0
        self._label_cost: dict[str, float] = {}
        self._last: tuple | None = None

    # -- the fixed set ----------------------------------------------------------------------------------
    def _build(self) -> list[TextPair]:
        from align_env.tracks import get_track

        track = get_track(self.track)
        if self.config.pairs == "track":
            data = [TextPair(p.item.messages, p.chosen, p.rejected) for p in track.pairs]
        else:
            data = self._label(track)
        if not data:
            raise AlignEnvError(f"offline-dpo: the fixed preference set of track {self.track!r} is empty")
        return data

    def _label(self, track) -> list[TextPair]:
        """Two initial-policy samples for each of ``num_pairs`` seeded training prompts, judged once."""
        from align_env.feedback import make_annotator

        annotator = make_annotator(self.annotator_spec, track=self.track)
        label_rng = np.random.default_rng([self.seed, 1])  # apart from the act/shuffle stream
        prompts = track.split("train")
        picked = [prompts[int(i)] for i in label_rng.permutation(len(prompts))[: self.config.num_pairs]]
        gens = self.policy.sample([p.messages for p in picked], n=2, temperature=self.config.temperature,
                                  top_p=self.config.top_p, seed=int(label_rng.integers(2**31)))
        a, b = [g[0].text for g in gens], [g[1].text for g in gens]
        calls_before = getattr(getattr(annotator, "cost", None), "calls", None)
        verdicts = annotator.pairwise(picked, a, b)
        calls_after = getattr(getattr(annotator, "cost", None), "calls", None)
        self._label_cost = {"annotator_calls": float(calls_after - calls_before if calls_before is not None
                                                     else len(picked)),
                            "label_abstained": float(sum(v is None for v in verdicts)),
                            "label_ties": float(sum(v == 0.5 for v in verdicts))}
        data = []
        for item, g, v in zip(picked, gens, verdicts):
            if v is None or v == 0.5 or not np.isfinite(v):  # abstention or tie: no preference, dropped
                continue
            win, lose = (g[0], g[1]) if v > 0.5 else (g[1], g[0])
            data.append(TextPair(item.messages, win.text, lose.text, win.finish_reason == "stop",
                                 lose.finish_reason == "stop"))
        return data

    def _next_batch(self, size: int) -> list[TextPair]:
        if self.data is None:
            self.data = self._build()
        batch = []
        while len(batch) < size:
            if self.cursor >= len(self.order):
                if len(self.order):
                    self.epochs += 1
                self.order, self.cursor = self.rng.permutation(len(self.data)), 0
            batch.append(self.data[int(self.order[self.cursor])])
            self.cursor += 1
        return batch

    # -- the protocol -----------------------------------------------------------------------------------
    def act(self, observations: dict[str, tuple]) -> tuple[list[str], list[str]]:
        """Two samples of the current policy per prompt (judged by the env, logged, not trained on)."""
        start = time.perf_counter()
        gens = self.policy.sample(list(observations["messages"]), n=2, temperature=self.config.temperature,
                                  top_p=self.config.top_p, seed=int(self.rng.integers(2**31)))
        self._last = ([x.tokens for g in gens for x in g], time.perf_counter() - start)
        return [g[0].text for g in gens], [g[1].text for g in gens]

    def respond(self, observations: dict[str, tuple], *, seed: int = 0, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """One answer per prompt from the current policy, for evaluation (``temperature=0`` is greedy; None keeps
        the training settings). Leaves the agent's RNG alone."""
        gens = self.policy.sample(list(observations["messages"]), n=1,
                                  temperature=self.config.temperature if temperature is None else temperature,
                                  top_p=self.config.top_p if top_p is None else top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
        return [g[0].text for g in gens]

    def update(self, transitions: Transitions) -> dict[str, float]:
        """One (micro-)step on the next ``len(transitions)`` pairs of the fixed set."""
        if self._last is None:
            raise AlignEnvError("update() without a preceding act()")
        (lengths, seconds), self._last = self._last, None
        batch = self._next_batch(len(transitions))
        p = self.policy
        prompts = [p.prompt_ids(x.messages) for x in batch]
        chosen = [p.response_ids(x.chosen, x.chosen_ended) for x in batch]
        rejected = [p.response_ids(x.rejected, x.rejected_ended) for x in batch]
        metrics = self.trainer.train(prompts, chosen, rejected)
        prefs = transitions.preferences
        judged = prefs[~np.isnan(prefs)]
        metrics |= {
            "pairs_used": float(len(batch)),
            "abstained": float(np.isnan(prefs).sum()),
            "response_length": float(np.mean(lengths)),
            "generated_tokens": float(sum(lengths)),
            "tokens_per_second": sum(lengths) / max(seconds, 1e-9),
            "epochs": float(self.epochs),
            "set_size": float(len(self.data)),
        }
        if len(judged):
            metrics["online_preference"] = float(judged.mean())
        metrics |= self._label_cost
        self._label_cost = {}
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """As online-dpo, plus the fixed set (when labelled up front) and the position in its shuffled order."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save(folder)
        self.trainer.save(folder)
        data = None
        if self.data is not None and self.config.pairs == "annotator":
            data = [[x.messages, x.chosen, x.rejected, x.chosen_ended, x.rejected_ended] for x in self.data]
        save_meta(folder, self.name, self.config, {
            "rng": rng_state(self.rng), "seed": self.seed, "trainer": self.trainer.counters(),
            "order": self.order.tolist(), "cursor": self.cursor, "epochs": self.epochs,
            "built": self.data is not None, "labelled": data})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = load_meta(folder, self.name, self.config,
                          must_match=("model", "lora", "lora_r", "loss", "optimizer", "pairs"))
        self.policy.load(folder)
        self.trainer.load(folder, state["trainer"])
        set_rng_state(self.rng, state["rng"])
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.cursor, self.epochs = state["cursor"], state["epochs"]
        if state["labelled"] is not None:
            self.data = [TextPair(*row) for row in state["labelled"]]
        else:
            self.data = self._build() if state["built"] else None
        self._last = None
        self._label_cost = {}
