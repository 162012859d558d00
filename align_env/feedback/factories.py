"""Factories that turn a parsed spec into an annotator, one per family."""

from __future__ import annotations

import inspect

from align_env.errors import AlignEnvError
from align_env.feedback.spec import AnnotatorSpec


def check_params(spec: AnnotatorSpec, cls) -> None:
    """Unknown spec parameters are an error that lists the accepted ones."""
    import difflib

    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "track", "spec", "engine", "model")]
    for key in spec.params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AlignEnvError(f"annotator {spec.family!r} has no parameter {key!r}.{hint} Accepted: {accepted}")


def rules(spec: AnnotatorSpec, track: str | None):
    from align_env.feedback.rules import RulesAnnotator

    check_params(spec, RulesAnnotator)
    return RulesAnnotator(track or "helpful", spec=str(spec), **spec.params)
