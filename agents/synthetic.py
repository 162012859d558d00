"""Synthetic comparisons of ALMoST (Kim et al. 2023, arXiv 2305.13735, sec. 2.1): prompted configurations ranked by
rules of thumb, and the paper's length filter (``docs/algorithms.md``, section 4).

A *configuration* is ``model|shots|demos``: a model, how many in-context demonstrations it is given and from
which set (:mod:`agents.almost_demos`; ``-`` or any set with 0 shots). *Ranking rules* are configuration, e.g.::

    model: gemma3-270m > smollm2-135m; shots: 3 > 1 > 0; demos: faithful > poor

Each clause orders the values of one axis (``model``, ``shots``, ``demos``); orders are transitive. A configuration
``A`` beats ``B`` when ``A`` is at least as good as ``B`` on every axis and better on one (the rules of thumb
combined: a larger model with as many, as good demonstrations wins). The ``demos`` axis is compared only when both
have demonstrations. Two values of an axis that no rule orders make the configurations incomparable: their pair
is "same rank" and dropped. Rules that contradict each other (a cycle such as ``3 > 1`` and ``1 > 3``) are an error
naming the clauses.

The filter (paper sec. 2.1, "heuristic filter"), per prompt with candidate lengths ``l`` (words) over all
configurations; a pair ``(hi, lo)`` (hi ranked higher) is dropped, in this order, when

* ``empty``: either response is empty;
* ``same_rank``: neither configuration beats the other;
* ``identical``: both responses are the same text (nothing to learn);
* ``length``: ``l(hi) < l(lo)`` and ``l(hi) < mean(l) - std(l) / 2``.

Each rule's drop count is returned with the kept pairs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agents.almost_demos import demonstrations
from align_env.errors import AlignEnvError, did_you_mean

AXES = ("model", "shots", "demos")
FILTER_RULES = ("empty", "same_rank", "identical", "length")


@dataclass(frozen=True)
class Configuration:
    model: str
    shots: int
    demos: str

    @property
    def name(self) -> str:
        return f"{self.model}|{self.shots}|{self.demos if self.shots else '-'}"

    def values(self) -> dict[str, str]:
        return {"model": self.model, "shots": str(self.shots), "demos": self.demos}


def parse_configurations(text: str) -> list[Configuration]:
    """``"gemma3-270m|3|faithful; smollm2-135m|0|-"`` -> configurations (``;``-separated, no duplicates)."""
    out: list[Configuration] = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        fields = [f.strip() for f in part.split("|")]
        if len(fields) != 3 or not fields[0]:
            raise AlignEnvError(
                f"configuration {part!r} must look like 'model|shots|demos', e.g. 'gemma3-270m|3|faithful'")
        try:
            shots = int(fields[1])
        except ValueError:
            raise AlignEnvError(f"configuration {part!r}: shots must be an integer, got {fields[1]!r}") from None
        if shots < 0:
            raise AlignEnvError(f"configuration {part!r}: shots must be >= 0")
        config = Configuration(fields[0], shots, fields[2] if shots else "-")
        if config in out:
            raise AlignEnvError(f"configuration {config.name!r} is listed twice")
        out.append(config)
    if len(out) < 2:
        raise AlignEnvError(f"synthetic comparisons need at least two configurations, got {text!r}")
    return out


class RankingRules:
    """Per-axis orders from rule clauses, checked for contradictions (see the module docstring)."""

    def __init__(self, text: str):
        self.text = text
        self.better: dict[str, set[tuple[str, str]]] = {axis: set() for axis in AXES}  # (winner, loser), closed
        clauses = [c.strip() for c in text.split(";") if c.strip()]
        if not clauses:
            raise AlignEnvError("ranking rules are empty; e.g. 'model: gemma3-270m > smollm2-135m; shots: 3 > 1 > 0'")
        edges: dict[str, list[tuple[str, str, str]]] = {axis: [] for axis in AXES}
        for clause in clauses:
            axis, sep, chain = clause.partition(":")
            axis = axis.strip()
            if not sep:
                raise AlignEnvError(f"ranking rule {clause!r} must look like 'axis: a > b > c'")
            if axis not in AXES:
                raise did_you_mean("ranking-rule axis", axis, AXES)
            values = [v.strip() for v in re.split(r">", chain)]
            if len(values) < 2 or not all(values):
                raise AlignEnvError(f"ranking rule {clause!r} must order at least two values: 'axis: a > b'")
            edges[axis] += [(a, b, clause) for a, b in zip(values, values[1:])]
        for axis in AXES:
            self.better[axis] = self._closure(axis, edges[axis])

    @staticmethod
    def _closure(axis: str, edges: list[tuple[str, str, str]]) -> set[tuple[str, str]]:
        """All (a, b) with a > b by transitivity; a cycle raises naming the clauses on it."""
        graph: dict[str, list[tuple[str, str]]] = {}
        for a, b, clause in edges:
            graph.setdefault(a, []).append((b, clause))
        closed: set[tuple[str, str]] = set()
        for start in graph:
            stack = [(start, [])]  # (node, clauses on the path from start)
            seen = set()
            while stack:
                node, path = stack.pop()
                for nxt, clause in graph.get(node, []):
                    if nxt == start:
                        names = list(dict.fromkeys(path + [clause]))
                        raise AlignEnvError(
                            f"ranking rules contradict each other on {axis!r}: {' and '.join(repr(c) for c in names)} "
                            f"make {start!r} both better and worse than itself")
                    if nxt not in seen:
                        seen.add(nxt)
                        closed.add((start, nxt))
                        stack.append((nxt, path + [clause]))
        return closed

    def axis_compare(self, axis: str, a: str, b: str) -> int | None:
        """1 if a is better, -1 if worse, 0 if equal, None if no rule orders them."""
        if a == b:
            return 0
        if (a, b) in self.better[axis]:
            return 1
        if (b, a) in self.better[axis]:
            return -1
        return None

    def beats(self, a: Configuration, b: Configuration) -> bool:
        """``a`` at least as good on every compared axis and better on one."""
        better = False
        for axis in AXES:
            if axis == "demos" and (a.shots == 0 or b.shots == 0):
                continue
            cmp = self.axis_compare(axis, a.values()[axis], b.values()[axis])
            if cmp is None or cmp < 0:
                return False
            better |= cmp > 0
        return better

    def best(self, configs: Sequence[Configuration]) -> Configuration:
        """The configuration that beats the most others (ties: the earliest listed); RMSP samples from it."""
        wins = [sum(self.beats(c, o) for o in configs) for c in configs]
        return configs[int(np.argmax(wins))]


def prompt_messages(config: Configuration, track: str, messages: list) -> list[dict[str, str]]:
    """The configuration's prompt: its demonstrations as earlier chat turns, then the episode's messages."""
    return demonstrations(track, config.demos, config.shots) + [dict(m) for m in messages]


# -- the filter -------------------------------------------------------------------------------------------
def words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class Comparison:
    """One kept synthetic pair: prompt index, chosen/rejected text and the configurations that produced them."""

    prompt: int
    chosen: str
    rejected: str
    chosen_config: str
    rejected_config: str


def compare(candidates: Sequence[Sequence[str]], configs: Sequence[Configuration],
            rules: RankingRules) -> tuple[list[Comparison], dict[str, int]]:
    """All configuration pairs per prompt, ranked by ``rules`` and filtered; ``(kept, drops per rule)``.

    ``candidates[i][k]`` is configuration ``k``'s response to prompt ``i``.
    """
    dropped = dict.fromkeys(FILTER_RULES, 0)
    kept: list[Comparison] = []
    for i, texts in enumerate(candidates):
        if len(texts) != len(configs):
            raise AlignEnvError(f"prompt {i} has {len(texts)} candidates for {len(configs)} configurations")
        lengths = np.array([words(t) for t in texts], dtype=float)
        threshold = lengths.mean() - lengths.std() / 2.0
        for a in range(len(configs)):
            for b in range(a + 1, len(configs)):
                if not texts[a].strip() or not texts[b].strip():
                    dropped["empty"] += 1
                    continue
                if rules.beats(configs[a], configs[b]):
                    hi, lo = a, b
                elif rules.beats(configs[b], configs[a]):
                    hi, lo = b, a
                else:
                    dropped["same_rank"] += 1
                    continue
                if texts[hi].strip() == texts[lo].strip():
                    dropped["identical"] += 1
                    continue
                if lengths[hi] < lengths[lo] and lengths[hi] < threshold:
                    dropped["length"] += 1
                    continue
                kept.append(Comparison(i, texts[hi], texts[lo], configs[hi].name, configs[lo].name))
    return kept, dropped
