"""Errors that name the problem, with did-you-mean suggestions where a name was mistyped."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignEnvError(ValueError):
    """Base class for align-env input errors (a ValueError, so callers may catch either)."""


class UnknownNameError(AlignEnvError, KeyError):
    """A name (env id, annotator family, model, track, agent...) that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(str(k) for k in known)
        if not isinstance(name, str):  # a non-string name gets no suggestion, only its type
            name = f"{name!r:.80} (a {type(name).__name__}, not a string)"
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(self.known) if len(self.known) <= 20 else f"{len(self.known)} known"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {listing}.")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class TextTypeError(AlignEnvError, TypeError):
    """A text input (prompt, response, spec) of the wrong type: an AlignEnvError and a TypeError."""


class BadTextError(AlignEnvError):
    """A text that cannot be judged: lone surrogates, or longer than the limit."""


def did_you_mean(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    return UnknownNameError(kind, name, known)
