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
