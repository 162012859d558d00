"""Spaces for natural-language observations and actions.

Gymnasium's ``Text`` space is character-set limited (it rejects spaces and
punctuation by default), so, like MiniWoB++ and BrowserGym, we define our own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.spaces import Space

from align_env.errors import BadTextError, TextTypeError
from align_env.text import MAX_TEXT_CHARS, check_text

# Printable sample alphabet: ASCII letters, digits, punctuation, whitespace and some non-ASCII text.
_SAMPLE_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " .,;:!?'\"()-\n\t" "éüßçñ漢字カナ한글Ωπ€–—…😀"
)
ROLES = ("system", "user", "assistant")


class UnicodeText(Space[str]):
    """Any Python ``str`` of at most ``max_length`` characters (all of Unicode allowed)."""

    def __init__(self, max_length: int = 100_000, min_length: int = 0, seed: int | None = None):
        if min_length < 0 or max_length < min_length:
            raise ValueError(f"need 0 <= min_length <= max_length, got {min_length}, {max_length}")
        self.min_length, self.max_length = int(min_length), int(max_length)
        super().__init__(shape=None, dtype=str, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        """A random string; length drawn uniformly in [min_length, min(max_length, 64)]."""
        hi = max(self.min_length, min(self.max_length, 64))
        length = int(self.np_random.integers(self.min_length, hi + 1))
        idx = self.np_random.integers(0, len(_SAMPLE_ALPHABET), size=length)
        return "".join(_SAMPLE_ALPHABET[i] for i in idx)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText(min_length={self.min_length}, max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, UnicodeText)
            and other.min_length == self.min_length
            and other.max_length == self.max_length
        )


class ChatMessages(Space[list]):
    """A list of chat messages ``{"role": ..., "content": str}`` with roles in ``ROLES``."""

    def __init__(self, max_messages: int = 64, max_length: int = 100_000, seed: int | None = None):
        self.max_messages = int(max_messages)
        self.content = UnicodeText(max_length=max_length)
        super().__init__(shape=None, dtype=object, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def seed(self, seed: int | None = None) -> int | list[int] | dict[str, int]:
        seeds = super().seed(seed)
        self.content.seed(int(self.np_random.integers(2**31)))
        return seeds

    def sample(self, mask: Any = None, probability: Any = None) -> list[dict[str, str]]:
        n = int(self.np_random.integers(1, min(self.max_messages, 4) + 1))
        roles = ["user" if i % 2 == 0 else "assistant" for i in range(n)]
        return [{"role": r, "content": self.content.sample()} for r in roles]

    def contains(self, x: Any) -> bool:
        if not isinstance(x, (list, tuple)) or len(x) > self.max_messages:
            return False
        return all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and m["role"] in ROLES
            and self.content.contains(m["content"])
            for m in x
        )

    def __repr__(self) -> str:
        return f"ChatMessages(max_messages={self.max_messages})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ChatMessages) and other.max_messages == self.max_messages


def check_response(response: Any, *, where: str = "response", max_chars: int = MAX_TEXT_CHARS) -> str:
    """Validate one agent response under the text policy (:mod:`align_env.text`): a ``str``, may be empty."""
    return check_text(response, where, max_chars)


def check_pair(action: Any, *, where: str = "", max_chars: int = MAX_TEXT_CHARS) -> tuple[str, str]:
    """Validate a pairwise action: a pair (tuple, list or 1-d array) of two strings."""
    is_vector = isinstance(action, np.ndarray) and action.ndim == 1
    if isinstance(action, str) or not (isinstance(action, Sequence) or is_vector):
        raise TextTypeError(
            f"pairwise feedback needs a pair of responses (a, b){where}; got "
            f"{type(action).__name__}. Use feedback='scalar' to score a single response."
        )
    if len(action) != 2:
        raise BadTextError(f"pairwise feedback needs exactly 2 responses{where}, got {len(action)}")
    return (check_response(action[0], where=f"response a{where}", max_chars=max_chars),
            check_response(action[1], where=f"response b{where}", max_chars=max_chars))
