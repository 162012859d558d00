"""A track: prompt splits, a rubric for judges, the chat formatting, and gold checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from align_env.errors import did_you_mean

SPLITS = ("train", "eval", "pairs")


@dataclass(frozen=True)
class PromptItem:
    """One episode's prompt.

    ``prompt`` is the user message the policy sees (the track's formatting of ``source``);
    ``source`` is the raw text (a post, a request); ``reference`` a reference answer if any.
    """

    id: str
    prompt: str
    source: str
    reference: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    history: tuple[Mapping[str, str], ...] = ()  # earlier dialogue turns (HH), oldest first

    @property
    def messages(self) -> list[dict[str, str]]:
        """Chat messages for the policy: earlier turns, then the user prompt."""
        return [dict(m) for m in self.history] + [{"role": "user", "content": self.prompt}]

    def __str__(self) -> str:
        return self.prompt


@dataclass(frozen=True)
class PreferencePair:
    """A labelled comparison: ``chosen`` is better than ``rejected`` for ``item``."""

    id: str
    item: PromptItem
    chosen: str
    rejected: str
    why: str = ""


def pair_halves(pairs: tuple[PreferencePair, ...]) -> tuple[tuple[PreferencePair, ...], tuple[PreferencePair, ...]]:
    """Split labelled pairs into a fixed selection half and a report half.

    The pairs are ordered by the SHA-256 of their id and the first ``ceil(n / 2)`` form the selection half.
    The rule depends on the set of ids alone, so a pair stays in its half whatever order the data comes in, on
    any machine; adding or removing pairs moves at most the pairs next to the cut.
    """
    import hashlib

    ranked = sorted(pairs, key=lambda p: (hashlib.sha256(p.id.encode("utf-8")).hexdigest(), p.id))
    cut = (len(ranked) + 1) // 2
    chosen = {id(p) for p in ranked[:cut]}
    return tuple(p for p in pairs if id(p) in chosen), tuple(p for p in pairs if id(p) not in chosen)


GoldCheck = Callable[[PromptItem, str], dict[str, float]]


@dataclass(frozen=True)
class Track:
    """Splits ``train``/``eval`` (PromptItems) and ``pairs`` (PreferencePairs), plus rubric and gold checks."""

    name: str
    version: str
    source: str  # "embedded" or a hub data set name
    rubric: str
    train: tuple[PromptItem, ...]
    eval: tuple[PromptItem, ...]
    pairs: tuple[PreferencePair, ...]
    gold: GoldCheck | None = None
    content_hash: str = ""
    description: str = ""

    @property
    def id(self) -> str:
        """Versioned id, e.g. ``summarize-v0`` (embedded) or ``summarize-v0@trl-lib/tldr``."""
        base = f"{self.name}-{self.version}"
        return base if self.source == "embedded" else f"{base}@{self.source}"

    def split(self, name: str) -> tuple:
        if name not in SPLITS:
            raise did_you_mean("split", name, SPLITS)
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}

    @property
    def selection_pairs(self) -> tuple[PreferencePair, ...]:
        """The half of the labelled pairs on which annotators are chosen, tuned or fine-tuned (see :func:`pair_halves`)."""
        return pair_halves(self.pairs)[0]

    @property
    def report_pairs(self) -> tuple[PreferencePair, ...]:
        """The other half: the pairs accuracies are reported on. Nothing is chosen or trained on them."""
        return pair_halves(self.pairs)[1]

    def gold_check(self, item: PromptItem, response: str) -> dict[str, float]:
        """Gold measures of one response (empty when the track has none)."""
        return self.gold(item, response) if self.gold else {}

    def summary(self) -> dict[str, Any]:
        return MappingProxyType(
            {
                "id": self.id,
                "name": self.name,
                "version": self.version,
                "source": self.source,
                "sizes": self.sizes(),
                "hash": self.content_hash,
                "description": self.description,
            }
        ).copy()
