"""Annotator spec strings: ``"<model>:<family>[?key=value&...]"``.

Examples: ``"rules"``, ``"rules?length_penalty=0.005"``, ``"smollm2-135m:likelihood?mode=pmi"``,
``"Qwen/Qwen2.5-0.5B-Instruct:llm_judge?suffix=prefer+the+shorter+answer"``.
"""

from __future__ import annotations

import re
import unicodedata
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
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # the values as written

    def __str__(self) -> str:
        from urllib.parse import urlencode

        head = f"{self.model}:{self.family}" if self.model else self.family
        written = {k: self.raw[k] if k in self.raw and _coerce(self.raw[k]) == v else v for k, v in self.params.items()}
        return f"{head}?{urlencode(written)}" if self.params else head


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _check_chars(spec: str, what: str, text: str) -> None:
    """No lone surrogates, control characters or replacement characters (a bad %-escape) in a spec."""
    for pos, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat in ("Cs", "Cc", "Cf") and ch not in "\t\n" or ch == "\ufffd":
            raise AlignEnvError(f"annotator spec {spec!r:.120}: {what} has the character {ch!r} "
                                f"(U+{ord(ch):04X}) at position {pos}; specs take printable text only")


def parse_spec(spec: str) -> AnnotatorSpec:
    """Parse a spec string. The family is what follows the last ``:`` before any ``?``.

    Refused with an error naming the problem: empty family or parameter names, names that are not identifiers,
    repeated parameters, and control or unencodable characters (lone surrogates, bad %-escapes).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AlignEnvError("annotator spec must be a non-empty string like 'smollm2-135m:likelihood', "
                            f"got {spec!r:.80}")
    head, _, query = spec.strip().partition("?")
    _check_chars(spec, "the model:family part", head)
    model, sep, family = head.rpartition(":")
    if not sep:
        model, family = "", head
    if not family:
        raise AlignEnvError(f"annotator spec {spec!r} has no family after ':' (e.g. 'smollm2-135m:likelihood')")
    if not _NAME.match(family):
        raise AlignEnvError(f"annotator spec {spec!r:.120}: family {family!r:.60} is not a name (letters, digits, "
                            "'_', '.', '-', starting with a letter)")
    if sep and not model.strip():
        raise AlignEnvError(f"annotator spec {spec!r:.120} has an empty model name before ':'")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise AlignEnvError(f"annotator spec {spec!r}: bad parameters {query!r} (use key=value&key2=value2)") from exc
    params: dict[str, Any] = {}
    raw: dict[str, str] = {}
    for key, value in pairs:
        if not _KEY.match(key):
            raise AlignEnvError(f"annotator spec {spec!r:.120}: parameter name {key!r:.60} is "
                                f"{'empty' if not key else 'not an identifier'} (write key=value)")
        if key in params:
            raise AlignEnvError(f"annotator spec {spec!r:.120}: parameter {key!r} is given twice")
        _check_chars(spec, f"parameter {key!r}", value)
        params[key], raw[key] = _coerce(value), value
    return AnnotatorSpec(family=family, model=model or None, params=params, raw=raw)
