"""HTTP transport of the ``openai`` engine: session, deadlines, retries with backoff, error text, redaction.

:meth:`Transport.post` sends one JSON request and returns the decoded JSON object, or raises
:class:`ServerError` with a message that names the URL (without credentials) and what went wrong. Every text
it quotes from the server or the request goes through :func:`align_env.redaction.safe_text` (the key, any
``Authorization``-like header, anything bearer-looking is masked; control sequences are escaped).

Bounds: connect and read timeouts on every request, the body read under a deadline (a server that drips bytes
cannot hold a call), at most 64 MiB of body. Connection errors, timeouts, 429 and 5xx are retried
``max_retries`` times with exponential backoff and seeded jitter (``Retry-After`` honoured up to
``backoff_max``); other 4xx fail at once.
"""

from __future__ import annotations

import json
import random
import threading
import time
from urllib.parse import urlsplit

from align_env.engines.openai_parse import CONTEXT_ERROR, ServerError, display_url, shape
from align_env.redaction import register_secret, register_secret_env, safe_text

MAX_BODY = 64 << 20  # bytes; a larger answer is not an OpenAI-style response
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class Secret:
    """Holds the API key; prints as ``***``; refuses to be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value or None
        register_secret(self._value)

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "***" if self._value else "None"

    def __reduce__(self):
        raise TypeError("the API key is not picklable")


class Transport:
    """POSTs JSON to ``base_url`` under the bounds above; counts requests, retries and failures in ``stats``."""

    def __init__(self, base_url: str, secret: Secret, *, api_key_env: str, timeout: float, connect_timeout: float,
                 max_retries: int, backoff: float, backoff_max: float, jitter_seed: int, max_concurrency: int,
                 stats: dict, lock: threading.Lock):
        self.base_url, self.secret, self.api_key_env = base_url, secret, api_key_env
        register_secret_env(api_key_env)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff, backoff_max
        self.max_concurrency, self.stats, self.lock = max_concurrency, stats, lock
        self._rng = random.Random(jitter_seed)
        self._local = threading.local()

    def __reduce__(self):
        raise TypeError("a Transport holds a session and the API key; it is not picklable")

    def session(self):
        import requests

        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            # Loopback servers are never reached through a proxy from the environment.
            sess.trust_env = urlsplit(self.base_url).hostname not in LOOPBACK
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=self.max_concurrency,
                                                    max_retries=0)
            sess.mount("http://", adapter)
            sess.mount("https://", adapter)
            self._local.session = sess
        return sess

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry ``attempt + 1``: exponential, jittered, ``Retry-After`` up to the cap."""
        base = min(self.backoff_max, self.backoff * (2 ** attempt))
        with self.lock:
            base *= 0.5 + 0.5 * self._rng.random()
        if retry_after:
            try:
                base = max(base, min(float(retry_after), self.backoff_max))
            except ValueError:
                pass
        return base

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.secret.get():
            headers["Authorization"] = f"Bearer {self.secret.get()}"
        return headers

    def post(self, path: str, body: dict, *, model: str, retries: int | None = None) -> dict:
        """POST ``body`` as JSON to ``base_url + path``; the decoded answer, retrying what is worth retrying."""
        url = self.base_url + path
        shown = display_url(url)
        attempts = (self.max_retries if retries is None else retries) + 1
        last: ServerError | None = None
        retry_after = None
        for attempt in range(attempts):
            if attempt:
                with self.lock:
                    self.stats["retries"] += 1
                time.sleep(self.delay(attempt - 1, retry_after))
            with self.lock:
                self.stats["requests"] += 1
            outcome = self._attempt(url, shown, body)
            if isinstance(outcome, ServerError):
                last, retry_after = outcome, None
                if outcome.retryable:
                    continue
                break
            status, raw, retry_after = outcome
            if status == 200:
                result = self._decode(raw, shown)
                if isinstance(result, dict):
                    return result
                last = result
                break
            last = self._http_error(status, raw, shown, path, model)
            if not last.retryable:
                break
        with self.lock:
            self.stats["failures"] += 1
        assert last is not None
        if last.retryable and attempts > 1:
            raise ServerError(f"{last} (gave up after {attempts} attempts)", status=last.status, retryable=True)
        raise last

    def _attempt(self, url: str, shown: str, body: dict) -> tuple[int, bytes, str | None] | ServerError:
        """One request: (status, body, Retry-After), or the ServerError that ended it."""
        import requests

        try:
            resp = self.session().post(url, json=body, headers=self.headers(), stream=True,
                                       timeout=(self.connect_timeout, self.timeout))
            try:
                raw = self.read(resp, shown)
            finally:
                resp.close()
        except ServerError as exc:
            return exc
        except requests.exceptions.ConnectionError as exc:
            return self._connection_error(exc, shown)
        except requests.exceptions.Timeout:
            return ServerError(f"the server at {shown} did not answer within {self.timeout:g} s", retryable=True)
        except requests.exceptions.RequestException as exc:
            return ServerError(f"request to {shown} failed: {safe_text(exc, 300)}", retryable=True)
        return resp.status_code, raw, resp.headers.get("Retry-After")

    def _connection_error(self, exc, shown: str) -> ServerError:
        import requests

        text = str(exc).lower()
        if "read timed out" in text:  # the body stopped coming (stream=True reports it this way)
            return ServerError(f"the server at {shown} did not answer within {self.timeout:g} s", retryable=True)
        reason = ("timed out" if isinstance(exc, requests.exceptions.ConnectTimeout) else
                  "connection refused" if "refused" in text else
                  "name not resolved" if "resolve" in text or "name or service" in text else
                  "connection failed")
        return ServerError(f"cannot reach the OpenAI-compatible server at {shown} ({reason}: {type(exc).__name__})",
                           retryable=True)

    @staticmethod
    def _decode(raw: bytes, shown: str) -> dict | ServerError:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            snippet = safe_text(raw[:200].decode("utf-8", "replace"))
            return ServerError(f"the server at {shown} answered 200 with a body that is not JSON: {snippet!r}",
                               status=200)
        if not isinstance(data, dict) or "error" in data and "choices" not in data:
            detail = error_text(json.dumps(data).encode()) if isinstance(data, dict) else shape(data)
            return ServerError(f"the server at {shown} answered 200 without a result: {detail}", status=200)
        return data

    def _http_error(self, status: int, raw: bytes, shown: str, path: str, model: str) -> ServerError:
        message = error_text(raw)
        hint = ""
        if status in (401, 403):
            hint = f"; check the API key in ${self.api_key_env} (not shown)"
        elif status == 404:
            hint = f"; does the server serve {path} and know the model {safe_text(model, 80)!r}?"
        if status == 400 and CONTEXT_ERROR.search(message):
            from align_env.engines.transformers_engine import PromptTooLongError

            raise PromptTooLongError(f"the server at {shown} refused an overlong prompt: {message}")
        return ServerError(f"the server at {shown} answered HTTP {status}: {message}{hint}", status=status,
                           retryable=status == 429 or status >= 500)

    def read(self, resp, shown: str) -> bytes:
        """The body, read under a deadline (a server that drips bytes cannot hold us past the timeout)."""
        deadline = time.monotonic() + self.timeout
        chunks, size = [], 0
        # ``read1`` (urllib3 2) returns what has arrived; ``iter_content`` would wait for a whole chunk.
        read1 = getattr(resp.raw, "read1", None)
        if read1 is not None:
            stream = iter(lambda: read1(65536, decode_content=True), b"")
        else:  # pragma: no cover - urllib3 1.x
            stream = resp.iter_content(chunk_size=1024)
        for chunk in stream:
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                raise ServerError(f"the server at {shown} sent more than {MAX_BODY >> 20} MiB", status=resp.status_code)
            if time.monotonic() > deadline:
                raise ServerError(f"the server at {shown} did not finish its answer within {self.timeout:g} s",
                                  retryable=True)
        return b"".join(chunks)


def error_text(raw: bytes) -> str:
    """The message of an error body (``{"error": {"message": ...}}`` and the like), redacted, one line."""
    text = raw[:2000].decode("utf-8", "replace")
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err)
        elif isinstance(data, dict) and "detail" in data:
            text = str(data["detail"])
        else:
            text = str(err)
    except ValueError:
        pass
    return safe_text(" ".join(text.split()), 300) or "(empty body)"


__all__ = ["LOOPBACK", "MAX_BODY", "Secret", "ServerError", "Transport", "error_text"]
