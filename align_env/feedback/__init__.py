"""Annotators: ``make_annotator(spec, track=...)`` builds one from a spec string.

Families are registered by name with a lazy ``"module:attr"`` target (a factory taking
``(spec: AnnotatorSpec, track: str | None)``); third-party families register through the
``align_env.annotators`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from align_env.errors import AlignEnvError, did_you_mean
from align_env.feedback.base import Annotator, FeedbackCost, validate_verdicts
from align_env.feedback.spec import AnnotatorSpec, parse_spec

__all__ = ["Annotator", "AnnotatorSpec", "FeedbackCost", "FAMILIES", "make_annotator", "parse_spec",
           "families", "register_family", "validate_verdicts", "RECOMMENDED_ANNOTATORS",
           "with_length_control"]

FAMILIES: dict[str, str] = {
    "rules": "align_env.feedback.factories:rules",
    "llm_judge": "align_env.feedback.factories:llm_judge",
    "likelihood": "align_env.feedback.factories:likelihood",
    "embedding": "align_env.feedback.factories:embedding",
    "reward_model": "align_env.feedback.factories:reward_model",
    "pool": "align_env.feedback.factories:pool",
    "self": "align_env.feedback.factories:self_judge",
}
MODEL_FREE = {"rules", "pool", "self"}
NEEDS_MODEL = {"llm_judge", "likelihood", "embedding", "reward_model"}  # third-party families decide themselves
CACHE_MODES = ("memory", "disk", "off")

# The annotator chosen per track on the selection half of the labelled pairs in the committed evaluation
# (leaderboards/annotators/; align_env/feedback/ranking.json holds the whole ranking with report-half accuracies).
def _recommended() -> dict[str, str]:
    from align_env.feedback.ranking import RANKING

    return {track: rows[0]["annotator"] for track, rows in RANKING.items() if rows}


RECOMMENDED_ANNOTATORS: dict[str, str] = _recommended()


def register_family(name: str, target: str) -> None:
    """Register a family: ``target`` is ``"module:factory"``, the factory takes ``(spec, track)``."""
    FAMILIES[name] = target


def families() -> dict[str, str]:
    """Every annotator family by name: the built-in ones and those registered through entry points."""
    found = dict(FAMILIES)
    for ep in entry_points(group="align_env.annotators"):
        found.setdefault(ep.name, ep.value)
    return found


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_annotator(spec: str | AnnotatorSpec | Any, track: str | None = None) -> Annotator:
    """Build an annotator from a spec string (or return an annotator object as is)."""
    if not isinstance(spec, (str, AnnotatorSpec)):
        if hasattr(spec, "pairwise") and hasattr(spec, "score"):
            return spec
        raise AlignEnvError(f"annotator must be a spec string or an object with pairwise/score, got {spec!r}")
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    known = families()
    if parsed.family not in known:
        raise did_you_mean("annotator family", parsed.family, known)
    if parsed.family in MODEL_FREE and parsed.model:
        raise AlignEnvError(f"annotator family {parsed.family!r} takes no model; write {parsed.family!r}")
    if parsed.family in NEEDS_MODEL and not parsed.model:
        raise AlignEnvError(f"annotator family {parsed.family!r} needs a model: '<model>:{parsed.family}'")
    annotator = _load(known[parsed.family])(parsed, track)
    return _with_cache(annotator, parsed)


def _with_cache(annotator, parsed: AnnotatorSpec):
    """Wrap deterministic model-based annotators in a judgement cache (``cache=memory|disk|off|<path>``)."""
    from align_env.feedback.cache import CachedAnnotator, JudgementStore

    raw = parsed.params.get("cache", "memory" if parsed.family not in ("rules", "self") else "off")
    if not isinstance(raw, (str, bool)) and raw not in (0, None):  # cache=inf or cache=3 is no file name
        raise AlignEnvError(f"annotator {parsed.family!r}: parameter 'cache' got {raw!r:.40}; accepted: memory, disk, "
                            "off or a file path")
    mode = "off" if raw in (False, None, 0, "none", "no") else "memory" if raw is True else str(raw)
    cacheable = getattr(annotator, "cacheable", True) and getattr(annotator, "deterministic", False)
    if mode == "off" or not cacheable:
        return annotator
    if mode == "memory":
        store = JudgementStore()
    elif mode == "disk":
        from align_env.models import cache_dir

        store = JudgementStore(cache_dir() / "judgements.sqlite")
    else:
        store = JudgementStore(mode)
    key_spec = str(AnnotatorSpec(parsed.family, parsed.model, {k: v for k, v in parsed.params.items() if k != "cache"}))
    if parsed.model:  # the weights behind the name are part of the key: replaced weights never get old verdicts
        from align_env.models import weights_identity

        key_spec += f"#weights={weights_identity(parsed.model)}"
    return CachedAnnotator(annotator, store, key_spec)


def with_length_control(annotator: Any, instruction: str) -> Any:
    """The annotator spec with a length-control instruction added (returned unchanged when it is empty).

    * ``llm_judge``: the instruction becomes the judge prompt's ``suffix`` (as in the OAIF experiment);
    * ``rules``: it cannot read instructions; any instruction turns on its length preference (``prefer=short``);
    * other families and annotator objects take no instruction: an error says so.
    """
    if not instruction:
        return annotator
    if not isinstance(annotator, (str, AnnotatorSpec)):
        raise AlignEnvError("length_control needs an annotator spec string, not an annotator object")
    spec = parse_spec(annotator) if isinstance(annotator, str) else annotator
    if spec.family == "llm_judge":
        return str(AnnotatorSpec(spec.family, spec.model, {**spec.params, "suffix": instruction}, spec.raw))
    if spec.family == "rules":
        return str(AnnotatorSpec(spec.family, spec.model, {**spec.params, "prefer": "short"}, spec.raw))
    raise AlignEnvError(f"annotator family {spec.family!r} takes no length-control instruction; use llm_judge or rules")

