"""Tracks: summarization, helpfulness, harmlessness. ``get_track(name, source=...)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from align_env.errors import AlignEnvError, did_you_mean
from align_env.tracks import gold, hub
from align_env.tracks.embedded import DATA_DIR, load_embedded
from align_env.tracks.track import SPLITS, PreferencePair, PromptItem, Track

__all__ = ["Track", "PromptItem", "PreferencePair", "SPLITS", "TRACKS", "get_track", "track_names"]


def format_summarize(post: str, meta: dict) -> str:
    """The TL;DR request shown to the policy (chat form of the TL;DR prompt)."""
    head = []
    if meta.get("forum"):
        head.append(f"Forum: {meta['forum']}")
    if meta.get("title"):
        head.append(f"Title: {meta['title']}")
    header = "\n".join(head) + "\n\n" if head else ""
    # The post first and the request after it: SmolLM2-135M's summaries of the first 6 eval posts find 28% of
    # their content words in the post this way, 14% with the request first (greedy, measured 2026-11).
    return f"{header}{post.strip()}\n\nWrite a TL;DR of the post above: one or two sentences, at most 40 words."


def format_plain(text: str, meta: dict) -> str:
    return text.strip()


@dataclass(frozen=True)
class TrackSpec:
    version: str
    description: str
    format_prompt: Callable[[str, dict], str]
    gold: Callable[[PromptItem, str], dict[str, float]]
    # Pinned sha256 prefix of the embedded data at this version: a silent change of the data fails.
    embedded_hash: str | None
    hub_sources: str


TRACKS: dict[str, TrackSpec] = {
    "summarize": TrackSpec(
        "v0", "TL;DR summaries of forum posts", format_summarize, gold.summarize_gold, "51e977a1bb3e3675",
        f"{hub.TLDR} (train/eval) + {hub.SUMMARIZE_FROM_FEEDBACK} comparisons (pairs)",
    ),
    "helpful": TrackSpec(
        "v0", "single-turn helpful instructions", format_plain, gold.helpful_gold, "dec12af9248c28d2",
        f"{hub.HH_RLHF} helpful-base",
    ),
    "harmless": TrackSpec(
        "v0", "harmful requests to refuse and edgy-but-benign requests to answer", format_plain,
        gold.harmless_gold, "fa85da39623c0bfc", f"{hub.HH_RLHF} harmless-base",
    ),
}


def track_names() -> list[str]:
    return sorted(TRACKS)


def _spec(name: str) -> TrackSpec:
    if name not in TRACKS:
        raise did_you_mean("track", name, TRACKS)
    return TRACKS[name]


def rubric(name: str) -> str:
    return (DATA_DIR / name / "rubric.md").read_text(encoding="utf-8").strip()


@lru_cache(maxsize=None)
def _embedded(name: str) -> Track:
    spec = _spec(name)
    rub, train, eval_, pairs, digest = load_embedded(name, spec.format_prompt)
    if spec.embedded_hash is not None and digest != spec.embedded_hash:
        raise AlignEnvError(
            f"embedded data of track {name!r} changed (hash {digest}, pinned {spec.embedded_hash} for "
            f"{spec.version}): a changed track is a new version; bump it and the pin together"
        )
    return Track(name, spec.version, "embedded", rub, train, eval_, pairs, spec.gold, digest, spec.description)


def _hub(name: str, max_items: int | None, data_files: dict[str, Any] | None) -> Track:
    spec = _spec(name)
    files = data_files or {}
    if name == "summarize":
        fmt = spec.format_prompt
        train = hub.load_tldr(fmt, split="train", data_files=files.get("tldr"), max_items=max_items)
        eval_ = hub.load_tldr(fmt, split="validation", data_files=files.get("tldr"), max_items=max_items)
        pairs = hub.load_summarize_comparisons(fmt, data_files=files.get("comparisons"), max_items=max_items)
        source = hub.TLDR
    else:
        subset = f"{name}-base"
        kw = {"data_files": files.get("hh"), "max_items": max_items}
        train = hub.load_hh(subset, split="train", **kw)
        eval_ = hub.load_hh(subset, split="test", **kw)
        pairs = hub.load_hh(subset, split="test", pairs=True, **kw)
        source = f"{hub.HH_RLHF}/{subset}"
    return Track(name, spec.version, source, rubric(name), train, eval_, pairs, spec.gold, "", spec.description)


def get_track(name: str, source: str = "embedded", *, max_items: int | None = None,
              data_files: dict[str, Any] | None = None) -> Track:
    """Load a track. ``source="embedded"`` (offline, shipped) or ``"hub"`` (``datasets``; ``data_files``
    maps loader name -> {split: local file} to read local copies in the hub schema)."""
    if source == "embedded":
        if max_items is not None or data_files is not None:
            raise AlignEnvError("max_items and data_files apply to source='hub' only")
        return _embedded(name)
    if source == "hub":
        return _hub(name, max_items, data_files)
    raise did_you_mean("track source", source, ("embedded", "hub"))
