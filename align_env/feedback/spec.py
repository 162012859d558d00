"""Annotator spec strings: ``"<model>:<family>[?key=value&...]"``.

Examples: ``"rules"``, ``"rules?length_penalty=0.005"``, ``"smollm2-135m:likelihood?mode=pmi"``,
``"Qwen/Qwen2.5-0.5B-Instruct:llm_judge?suffix=prefer+the+shorter+answer"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from align_env.errors import AlignEnvError


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@dataclass(frozen=True)
class AnnotatorSpec:
    family: str
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        from urllib.parse import urlencode

        head = f"{self.model}:{self.family}" if self.model else self.family
        return f"{head}?{urlencode(self.params)}" if self.params else head


def parse_spec(spec: str) -> AnnotatorSpec:
    """Parse a spec string. The family is what follows the last ``:`` before any ``?``."""
    if not isinstance(spec, str) or not spec.strip():
        raise AlignEnvError(f"annotator spec must be a non-empty string like 'smollm2-135m:likelihood', got {spec!r}")
    head, _, query = spec.strip().partition("?")
    model, sep, family = head.rpartition(":")
    if not sep:
        model, family = "", head
    if not family:
        raise AlignEnvError(f"annotator spec {spec!r} has no family after ':' (e.g. 'smollm2-135m:likelihood')")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise AlignEnvError(f"annotator spec {spec!r}: bad parameters {query!r} (use key=value&key2=value2)") from exc
    params = {k: _coerce(v) for k, v in pairs}
    return AnnotatorSpec(family=family, model=model or None, params=params)
