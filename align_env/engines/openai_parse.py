"""Pure parsers of OpenAI-style replies (no HTTP): choices, usage, top log-probs, judge labels, echoed tokens.

Every parser either returns what it read or raises :class:`ServerError` naming the reply's *shape* (field
names and value types, never values: a reply may echo a request's headers), so a malformed reply is a
clear server error rather than a ``KeyError`` or a ``ValueError`` from ``int()``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from align_env.errors import AlignEnvError

CONTEXT_ERROR = re.compile(r"context.{0,20}(length|window|size)|too (long|many tokens)|maximum.{0,30}tokens|"
                           r"exceed", re.IGNORECASE)


class ServerError(AlignEnvError):
    """The server could not be reached, or answered with an error or with something that is not an answer."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status, self.retryable = status, retryable


def display_url(url: str) -> str:
    """The URL without user:password or query (error messages)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def derive_seed(seed: int, *parts: int) -> int:
    data = ":".join(str(x) for x in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big") & 0x7FFFFFFF


def logsumexp(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("-inf")
    m = max(finite)
    return m + math.log(sum(math.exp(v - m) for v in finite))


def shape(value, depth: int = 3) -> str:
    """The structure of a JSON value with types in place of values: ``{choices: list[1], usage: {...}}``."""
    if isinstance(value, dict):
        if depth == 0:
            return "{...}"
        items = [f"{str(k)[:40]}: {shape(v, depth - 1)}" for k, v in list(value.items())[:12]]
        return "{" + ", ".join(items) + (", ..." if len(value) > 12 else "") + "}"
    if isinstance(value, list):
        inner = f" of {shape(value[0], depth - 1)}" if value and depth else ""
        return f"list[{len(value)}]{inner}"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return "non-finite number"
        return "negative number" if value < 0 else type(value).__name__
    return "null" if value is None else type(value).__name__


def choice(data: dict, shown: str) -> dict:
    """The first choice of a reply."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(f"the server at {shown} answered without choices (reply shape: {shape(data)})")
    return choices[0]


def choice_text(ch: dict, chat: bool, shown: str | None = None) -> str:
    """The text of a choice ('' when absent); non-text content is a server error when ``shown`` is given."""
    message = ch.get("message") if chat else None
    text = (message.get("content") if isinstance(message, dict) else None) if chat else ch.get("text")
    if text is not None and not isinstance(text, str):
        if shown is not None:
            raise ServerError(f"the server at {shown} answered with non-text content (choice shape: {shape(ch)})")
        return ""
    return text or ""


def usage_counts(data: dict, shown: str) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a reply's ``usage`` (missing counts are 0); None without usage.

    A ``usage`` that is not an object of non-negative integers is a server error naming its shape.
    """
    usage = data.get("usage")
    if usage is None:
        return None
    counts = []
    ok = isinstance(usage, dict)
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key) if ok else None
        if value is None:
            counts.append(0)
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value < 0 or value != int(value):
            ok = False
        else:
            counts.append(int(value))
    if not ok:
        raise ServerError(f"the server at {shown} answered with a malformed 'usage' (expected non-negative integer "
                          f"prompt_tokens and completion_tokens; reply shape: {shape(data)})")
    return counts[0], counts[1]


def parse_tops(lp, chat: bool, shown: str) -> dict[str, float] | None:
    """{token text: log-prob} of the first generated token's alternatives; None when there are none."""
    if not isinstance(lp, dict):
        return None
    tops: dict[str, float] = {}

    def add(tok, val):
        if isinstance(tok, str) and isinstance(val, int | float) and not isinstance(val, bool) and not math.isnan(val):
            tok = tok.replace("\u2581", " ").replace("\u0120", " ")
            tops[tok] = max(float(val), tops.get(tok, float("-inf")))

    try:
        if chat:
            content = lp.get("content") or []
            if not content:
                return None
            first = content[0]
            add(first.get("token"), first.get("logprob"))
            for alt in first.get("top_logprobs") or []:
                add(alt.get("token"), alt.get("logprob"))
        else:
            toks, vals, top = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
            if not toks and not top:
                return None
            if toks and vals:
                add(toks[0], vals[0])
            first = top[0] if top else None
            if isinstance(first, dict):
                for tok, val in first.items():
                    add(tok, val)
            elif isinstance(first, list):
                for alt in first:
                    if isinstance(alt, dict):
                        add(alt.get("token"), alt.get("logprob"))
    except (AttributeError, TypeError, IndexError, KeyError):
        raise ServerError(f"the server at {shown} answered with malformed log-probs (shape: {shape(lp)})") from None
    return tops or None


def parse_label(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate label a judge's free-text answer names, or None (then it abstains).

    The answer's first word when it is a label standing alone (``"B"``, ``"B."``, ``"(A) because..."``; not
    the article in ``"A good answer"``), else a label named as ``Response B`` / ``Answer: A`` / ``Output (B)``;
    labels are matched without surrounding whitespace.
    """
    bare = {c.strip(): c for c in candidates if c.strip()}
    if not bare:
        return None
    alt = "|".join(re.escape(b) for b in sorted(bare, key=len, reverse=True))
    head = re.match(rf"\s*[\(\[\*\"']*({alt})(?=$|[^\w\s]|\s*\n)", text or "")
    if head:
        return bare[head.group(1)]
    named = re.search(rf"(?i:response|answer|output|option|assistant)\s*[:\(\[\*]*\s*({alt})(?![\w])", text or "")
    return bare[named.group(1)] if named else None


def continuation_start(texts: Sequence[str], end: int, cont: str) -> int | None:
    """Index of the first of ``texts[:end]`` that belongs to ``cont`` (matched from the end), or None.

    A token that straddles the boundary (context characters, then the continuation's first ones) belongs to
    the continuation. Servers show a token that holds only part of a multi-byte character as an empty
    string (or a replacement character); such fragments are skipped and the non-ASCII characters they stand
    for are matched loosely.
    """
    pos, j, pending = len(cont), end, False
    while pos > 0:
        if j == 0:
            return None
        j -= 1
        frag = "\ufffd" in texts[j]
        t = texts[j].replace("\ufffd", "")
        if not t:
            pending = True  # a fragment of a multi-byte character
            continue
        k = pos
        while True:
            if cont.endswith(t, 0, k):
                pos, pending = k - len(t), frag
                break
            if k and t.endswith(cont[:k]):  # straddles the boundary
                pos = 0
                break
            if k and ord(cont[k - 1]) > 127 and pending:
                k -= 1  # a character the server showed only as fragments
                if k == 0:
                    return j + 1  # the continuation begins with such a character; this token is context
                continue
            return None
    return j


__all__ = ["CONTEXT_ERROR", "ServerError", "choice", "choice_text", "continuation_start", "derive_seed",
           "display_url", "logsumexp", "parse_label", "parse_tops", "shape", "usage_counts"]
