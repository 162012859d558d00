"""``best-of-n``: no training; at act time sample ``n`` answers per prompt and return the one the annotator prefers.

Selection (``select=``):

* ``"pairwise"`` (default): a knockout tournament. Round by round the surviving candidates are paired in
  order (a bye for an odd one out) and each pair is judged with ``pairwise``; the batch of every prompt's
  pairs is one annotator call per round. ``n - 1`` judgements per prompt, ``ceil(log2 n)`` rounds.
* ``"score"``: ``score`` every candidate (``n`` judgements per prompt) and keep the argmax.

No abstention is ever read as a preference: when a judgement abstains (or is an exact tie) the winner of that
match, or the argmax among tied or unscored candidates, is drawn at random from the agent's seeded RNG, and
the abstention is counted. The annotator is a private copy built from the run's annotator spec
(``annotator=`` of :func:`agents.make_agent`), or from ``judge=`` when set; its judgements are reported in
``update``'s metrics as ``annotator_calls`` (judgements of the selection, not those of the environment).

Best-of-n answers one response per prompt, so it runs in a ``feedback="scalar"`` environment whose score is
the reward of the selected answer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError, did_you_mean

SELECTIONS = ("pairwise", "score")


@dataclass
class BestOfNConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "policy: catalogue name, local folder or hub id"})
    n: int = field(default=4, metadata={"help": "candidates sampled per prompt"})
    select: str = field(default="pairwise", metadata={
        "help": "'pairwise': knockout tournament of pairwise verdicts (n-1 per prompt); 'score': argmax of scores"})
    judge: str = field(default="", metadata={
        "help": "annotator spec for the selection; empty uses the run's annotator"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (as online-dpo samples)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens per response"})
    bf16: bool = field(default=False, metadata={"help": "sample under bf16 autocast on CPU"})

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise did_you_mean("best-of-n selection", self.select, SELECTIONS)
        if self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise AlignEnvError(
                f"best-of-n: need n >= 1, temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1: {self}")


class BestOfN:
    """Best-of-n selection by the annotator (see the module docstring)."""

    name = "best-of-n"
    trains = False  # evaluated by name (align-env eval); nothing to train
    Config = BestOfNConfig
    feedback = "scalar"

    def __init__(self, config: BestOfNConfig, *, track: str, annotator: Any = None, seed: int = 0):
        from align_env.engines.transformers_engine import TransformersEngine
        from align_env.feedback import make_annotator
        from align_env.models import load_causal_lm

        self.config, self.track, self.seed = config, track, int(seed)
        self.annotator_spec = annotator
        spec = config.judge or annotator
        if spec is None:
            raise AlignEnvError("best-of-n needs an annotator to select with: pass annotator= or judge=")
        self.judge = make_annotator(spec, track=track)
        model, tokenizer = load_causal_lm(config.model)
        model.eval().requires_grad_(False)
        self.engine = TransformersEngine(model, tokenizer)
        self.rng = np.random.default_rng(self.seed)
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._counts = {"annotator_calls": 0.0, "selection_abstained": 0.0, "selection_ties": 0.0}
        self._lengths: list[int] = []
        self._tokens, self._seconds = 0, 0.0

    def _sample(self, observations: dict) -> tuple[list, list[list[str]]]:
        from agents.policy import autocast

        start = time.perf_counter()
        with autocast(self.config.bf16):
            gens = self.engine.generate(list(observations["messages"]), n=self.config.n,
                                        temperature=self.config.temperature, top_p=self.config.top_p,
                                        max_new_tokens=self.config.max_new_tokens,
                                        seed=int(self.rng.integers(2**31)))
        self._seconds += time.perf_counter() - start
        self._tokens += sum(x.tokens for g in gens for x in g)
        return gens, [[x.text for x in g] for g in gens]

    def _calls(self, before: float | None, fallback: int) -> float:
        after = getattr(getattr(self.judge, "cost", None), "calls", None)
        return float(after - before) if before is not None and after is not None else float(fallback)

    def _before(self) -> float | None:
        return getattr(getattr(self.judge, "cost", None), "calls", None)

    def _coin(self) -> bool:
        return bool(self.rng.integers(2))

    def _knockout(self, prompts: list, texts: list[list[str]]) -> list[int]:
        alive = [list(range(len(t))) for t in texts]
        while any(len(a) > 1 for a in alive):
            matches = [(i, a[j], a[j + 1]) for i, a in enumerate(alive) for j in range(0, len(a) - 1, 2)]
            before = self._before()
            verdicts = self.judge.pairwise([prompts[i] for i, _, _ in matches], [texts[i][x] for i, x, _ in matches],
                                           [texts[i][y] for i, _, y in matches])
            self._counts["annotator_calls"] += self._calls(before, len(matches))
            winners: dict[int, list[int]] = {i: [] for i in range(len(alive))}
            for (i, x, y), v in zip(matches, verdicts):
                if v is None or not math.isfinite(v):
                    self._counts["selection_abstained"] += 1
                    winners[i].append(x if self._coin() else y)
                elif v == 0.5:
                    self._counts["selection_ties"] += 1
                    winners[i].append(x if self._coin() else y)
                else:
                    winners[i].append(x if v > 0.5 else y)
            alive = [winners[i] + ([a[-1]] if len(a) % 2 else []) if len(a) > 1 else a for i, a in enumerate(alive)]
        return [a[0] for a in alive]

    def _argmax(self, prompts: list, texts: list[list[str]]) -> list[int]:
        flat_prompts = [p for p, t in zip(prompts, texts) for _ in t]
        before = self._before()
        scores = self.judge.score(flat_prompts, [x for t in texts for x in t])
        self._counts["annotator_calls"] += self._calls(before, len(flat_prompts))
        picks, k = [], 0
        for t in texts:
            group = [scores[k + j] for j in range(len(t))]
            k += len(t)
            usable = [s for s in group if s is not None and math.isfinite(s)]
            self._counts["selection_abstained"] += len(group) - len(usable)
            if not usable:
                picks.append(int(self.rng.integers(len(t))))
                continue
            best = [j for j, s in enumerate(group) if s is not None and math.isfinite(s) and s == max(usable)]
            self._counts["selection_ties"] += len(best) > 1
            picks.append(best[int(self.rng.integers(len(best)))] if len(best) > 1 else best[0])
        return picks

    def _select(self, observations: dict) -> list[str]:
        from align_env.tracks.track import PromptItem

        gens, texts = self._sample(observations)
        prompts = self._items(observations, PromptItem)
        picks = self._knockout(prompts, texts) if self.config.select == "pairwise" else self._argmax(prompts, texts)
        chosen = [g[j] for g, j in zip(gens, picks)]
        self._lengths += [x.tokens for x in chosen]
        return [x.text for x in chosen]

    def _items(self, observations: dict, PromptItem) -> list:
        """The annotator judges PromptItems; rebuild them from the env's prompts (the track's items when known)."""
        from align_env.tracks import get_track

        by_prompt = getattr(self, "_by_prompt", None)
        if by_prompt is None:
            track = get_track(self.track)
            by_prompt = self._by_prompt = {i.prompt: i for split in ("train", "eval") for i in track.split(split)}
        return [by_prompt.get(p) or PromptItem(id="", prompt=p, source=p) for p in observations["prompt"]]

    def act(self, observations: dict[str, tuple]) -> list[str]:
        """The annotator's pick among ``n`` samples, one per prompt."""
        return self._select(observations)

    def respond(self, observations: dict[str, tuple], *, seed: int = 0, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Same selection as act, for evaluation: seeded by ``seed``, leaves the agent's RNG and counts alone.

        The candidates are always sampled with the config's temperature and top-p (n greedy candidates would be
        n copies of one answer): the selection is this agent's decoding. ``max_new_tokens`` caps each candidate.
        """
        del temperature, top_p
        if max_new_tokens is not None and max_new_tokens != self.config.max_new_tokens:
            import dataclasses

            saved_config, self.config = self.config, dataclasses.replace(self.config, max_new_tokens=max_new_tokens)
            try:
                return self.respond(observations, seed=seed)
            finally:
                self.config = saved_config
        saved_rng, saved_counts = self.rng, (dict(self._counts), list(self._lengths), self._tokens, self._seconds)
        self.rng = np.random.default_rng(seed)
        try:
            return self._select(observations)
        finally:
            self.rng = saved_rng
            self._counts, self._lengths, self._tokens, self._seconds = saved_counts

    def update(self, transitions: Transitions) -> dict[str, float]:
        """No training: reports the selection's annotator calls and abstentions, and the chosen answers' length."""
        metrics = dict(self._counts)
        if self._lengths:
            metrics |= {"response_length": float(np.mean(self._lengths)), "generated_tokens": float(self._tokens),
                        "tokens_per_second": self._tokens / max(self._seconds, 1e-9)}
        self._reset_counts()
        return metrics

    def save(self, folder: Path) -> None:
        save_meta(Path(folder), self.name, self.config, {"rng": rng_state(self.rng), "seed": self.seed})

    def load(self, folder: Path) -> None:
        state = load_meta(Path(folder), self.name, self.config)
        set_rng_state(self.rng, state["rng"])
        self._reset_counts()
