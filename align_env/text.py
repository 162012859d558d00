"""Text safety: the one check every prompt and response passes before an annotator or engine sees it.

Policy (docs/text-policy.md):

* a text is a ``str`` (``numpy.str_`` counts and becomes a plain ``str``); ``bytes``, ``None``, numbers and
  containers raise :class:`~align_env.errors.TextTypeError` naming the field and the type;
* lone surrogates (``"\\ud800"``) cannot be encoded as UTF-8 for tokenizers or HTTP: :class:`BadTextError`
  naming the field and the character position;
* NUL and other control characters are valid text and are kept as they are (annotators judge them);
* empty and whitespace-only texts are allowed: a valid, bad answer;
* a text longer than ``max_chars`` (``MAX_TEXT_CHARS`` by default) raises :class:`BadTextError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from align_env.errors import BadTextError, TextTypeError

MAX_TEXT_CHARS = 1_000_000  # prompts and annotator inputs; the env's actions have their own, smaller limit
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any, where: str = "text", max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` as a plain ``str`` under the policy above, or an error naming ``where`` and the problem."""
    if isinstance(value, bytes):
        raise TextTypeError(f"{where} must be str, got bytes; decode it first (e.g. .decode('utf-8'))")
    if not isinstance(value, str):
        raise TextTypeError(f"{where} must be str, got {type(value).__name__}: {value!r:.80}")
    value = str(value)  # numpy.str_ and other str subclasses become plain str
    if len(value) > max_chars:
        raise BadTextError(f"{where} has {len(value)} characters; the limit is {max_chars}")
    bad = _SURROGATE.search(value)
    if bad:
        raise BadTextError(f"{where} has a lone surrogate {bad.group()!r} at character {bad.start()}; it cannot be "
                           "encoded as UTF-8 (decode the source with errors='replace')")
    return value


def check_texts(values: Any, where: str = "responses", n: int | None = None,
                max_chars: int = MAX_TEXT_CHARS) -> list[str]:
    """A batch of texts: a sequence (not a string) of ``n`` texts, each checked by :func:`check_text`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not _is_array(values):
        raise TextTypeError(f"{where} must be a list of str, got {type(values).__name__}: {values!r:.80}")
    if _is_array(values) and values.ndim != 1:
        raise TextTypeError(f"{where} must be a 1-d sequence of str, got an array of shape {values.shape}")
    if n is not None and len(values) != n:
        raise BadTextError(f"{where} has {len(values)} texts, expected {n}")
    return [check_text(v, f"{where}[{k}]", max_chars) for k, v in enumerate(values)]


def _is_array(values: Any) -> bool:
    return hasattr(values, "ndim") and hasattr(values, "shape") and hasattr(values, "__len__")
