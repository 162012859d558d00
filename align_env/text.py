"""Text safety: the one check every prompt and response passes before an annotator or engine sees it.

Policy (docs/inputs.md):

* a text is a ``str`` (``numpy.str_`` counts and becomes a plain ``str``); ``bytes``, ``None``, numbers and
  containers raise :class:`~align_env.errors.TextTypeError` naming the field and the type;
* lone surrogates (``"\\ud800"``) cannot be encoded as UTF-8 for tokenizers or HTTP: :class:`BadTextError`
  naming the field and the character position;
* NUL and other control characters are valid text and are kept as they are (annotators judge them);
* empty and whitespace-only texts are allowed: a valid, bad answer;
* a text longer than ``max_chars`` (``MAX_TEXT_CHARS`` by default) raises :class:`BadTextError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from align_env.errors import AlignEnvError, BadTextError, TextTypeError

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


def check_prompt(prompt: Any, where: str = "prompt") -> Any:
    """An engine prompt: a text, or chat messages (a list of ``{"role": str, "content": str}``), both under
    the text policy. Returns it with ``numpy.str_`` made plain ``str``."""
    if isinstance(prompt, str):
        return check_text(prompt, where)
    if not isinstance(prompt, list):
        raise TextTypeError(f"{where} must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not prompt:
        raise BadTextError(f"{where} is an empty list of chat messages; give at least one message (or a string)")
    out = []
    for k, m in enumerate(prompt):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise TextTypeError(f"{where}[{k}] must be a chat message {{'role': ..., 'content': ...}}, got {m!r:.80}")
        out.append({**m, "role": check_text(m["role"], f"{where}[{k}].role"),
                    "content": check_text(m["content"], f"{where}[{k}].content")})
    return out


def check_sampling(n: Any, temperature: Any, top_p: Any, max_new_tokens: Any) -> None:
    """Generation settings every engine shares: ints >= 1, a finite temperature >= 0, 0 < top_p <= 1."""
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise AlignEnvError(f"{name} must be an int >= 1, got {value!r:.40}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise AlignEnvError(f"{name} must be a finite number, got {value!r:.40}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise AlignEnvError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
