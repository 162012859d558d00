"""One redaction step for every text that can carry a secret: errors, log lines and stored records that quote
a server's answer or a request.

:func:`redact` removes

* the values of the secret environment variables: those registered with :func:`register_secret_env` (the
  ``openai`` engine registers its ``api_key_env``) and the usual ones (``OPENAI_API_KEY``, ``HF_TOKEN``...),
  plus values registered with :func:`register_secret`;
* the value of ``Authorization``, ``Proxy-Authorization``, ``X-Api-Key``, ``Api-Key``, ``Cookie`` and similar
  headers, in any quoting (``"Authorization": "..."``, ``authorization=...``, ``Authorization: ...``);
* anything that looks like a bearer token (``Bearer <token>``) or an API key (``sk-...``, ``hf_...``).

:func:`neutralize` makes text from models and data safe for a terminal: control and escape sequences
(ANSI CSI/OSC, C0/C1 controls other than newline and tab, lone surrogates) are shown escaped, never
interpreted. :func:`safe_text` does both, for messages that quote outside text.
"""

from __future__ import annotations

import os
import re
import threading

MASK = "***"
DEFAULT_SECRET_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                       "HUGGINGFACE_HUB_TOKEN", "API_KEY")
_MIN_SECRET = 6  # shorter values would mask ordinary words

_lock = threading.Lock()
_secret_envs: set[str] = set(DEFAULT_SECRET_ENVS)
_secrets: set[str] = set()

_NAMES = (r"""["']?\b(?:proxy-)?(?:authorization|x-api-key|api[-_]?key|x-auth-token|auth[-_]?token|"""
          r"""access[-_]?token|cookie|set-cookie|openai-api-key)\b["']?""")
_HEADER_QUOTED = re.compile(rf"""(?i)({_NAMES}\s*(?:[:=]|=>)\s*)(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
_HEADER_LINE = re.compile(rf"""(?i)({_NAMES}\s*:\s*)(?!\*\*\*)[^\r\n"'}}]+""")  # "Name: value" to the line's end
_HEADER_QUERY = re.compile(rf"""(?i)({_NAMES}\s*=\s*)(?!\*\*\*)[^\s&;,"'}}]+""")  # name=value in a query
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[A-Za-z0-9._~+/=\-]{4,}")
_KEYLIKE = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{8,}|\bhf_[A-Za-z0-9]{8,}|\bgh[pousr]_[A-Za-z0-9]{8,}")


def register_secret_env(name: str) -> None:
    """Treat the value of environment variable ``name`` as a secret from now on (read at each redaction)."""
    if name:
        with _lock:
            _secret_envs.add(str(name))


def register_secret(value: str | None) -> None:
    """Treat ``value`` (a key held in memory, not in the environment) as a secret from now on."""
    if value and len(value) >= _MIN_SECRET:
        with _lock:
            _secrets.add(value)


def _known_secrets() -> list[str]:
    with _lock:
        values = set(_secrets) | {os.environ.get(n) or "" for n in _secret_envs}
    return sorted((v for v in values if len(v) >= _MIN_SECRET), key=len, reverse=True)


def redact(text: object) -> str:
    """``text`` (as a string) with every secret, credential header value and token-looking string masked."""
    out = text if isinstance(text, str) else str(text)
    for secret in _known_secrets():
        out = out.replace(secret, MASK)
    for pattern in (_HEADER_QUOTED, _HEADER_LINE, _HEADER_QUERY):
        out = pattern.sub(lambda m: m.group(1) + MASK, out)
    out = _BEARER.sub(lambda m: m.group(1) + m.group(2) + MASK, out)
    return _KEYLIKE.sub(MASK, out)


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def neutralize(text: object) -> str:
    """``text`` safe to print: escape sequences and control characters shown as ``\\x1b``-style escapes."""
    out = text if isinstance(text, str) else str(text)
    out = _ANSI.sub(lambda m: m.group(0).encode("unicode_escape", "backslashreplace").decode("ascii"), out)
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape", "backslashreplace").decode("ascii"), out)


def safe_text(text: object, limit: int | None = None) -> str:
    """Redacted, neutralised and (with ``limit``) shortened: for messages that quote outside text."""
    out = neutralize(redact(text))
    if limit is not None and len(out) > limit:
        out = out[:limit] + "..."
    return out


__all__ = ["MASK", "neutralize", "redact", "register_secret", "register_secret_env", "safe_text"]
