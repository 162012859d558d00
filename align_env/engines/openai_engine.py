"""The ``openai`` engine: any OpenAI-compatible HTTP server (``vllm serve``, SGLang, llama.cpp's server,
hosted APIs), through the plain ``requests`` client (no ``openai`` package).

Endpoints:

* ``generate``: chat messages go to ``/chat/completions`` (the server applies the model's template); a
  string is already-rendered text and goes to ``/completions``. With ``mode="completions"`` everything goes
  to ``/completions``, messages rendered here with ``chat_template`` (the plain ``User:/Assistant:``
  template by default, as for base models in the transformers engine).
* ``next_token_logprobs``: one token (``max_tokens=1``, greedy) with ``top_logprobs``; each candidate is
  matched by text among the returned top tokens. Tokens that differ from a candidate only by surrounding
  whitespace (``"A"``, ``" A"``) count as the same answer and are combined (log-sum-exp), unless two
  candidates would then collide. A candidate outside the returned top tokens gets ``-inf``: when both
  labels are missing a judge abstains. A server that answers without log-probs (or ``logprobs=False``)
  gets the answer parsed from a few generated tokens instead (:func:`parse_label`): the label named gets
  0.0 and the others ``-inf`` (a hard verdict); an answer naming none abstains, counted in
  ``stats["unparsed_answers"]``.
* ``score``: ``/completions`` with ``echo=True`` and ``logprobs``, which gives the log-probabilities of the
  prompt's own tokens (vLLM). The server tokenizes context and continuation together; the continuation's
  tokens are found from the end of the echoed prompt. A server without echo log-probs raises
  :class:`CapabilityError` naming what is missing. llama-cpp-python's server (0.3.x) echoes prompt
  log-probs that do not belong to the prompt's tokens (about -12 nats per token on text the model predicts
  at -0.5); the capability probe detects it, so that server serves judges (``next_token``), not ``score``.

``capabilities`` is probed lazily (one tiny request, the first time it is read) unless it is given.

Transport (``openai_transport.py``; pure reply parsers in ``openai_parse.py``): every request has a
timeout (connect and read; the body is read under a deadline too). Connection errors, timeouts, 429 and
5xx are retried ``max_retries`` times with exponential backoff and seeded jitter (``Retry-After`` is
honoured up to ``backoff_max``); other 4xx fail at once; a body that is not the JSON expected is a
:class:`ServerError`. So a call ends, with a result or a clear error, after at most about
``(max_retries + 1) * (connect_timeout + 2 * timeout) + max_retries * backoff_max`` seconds.

The API key is read from ``$OPENAI_API_KEY`` (or the variable named by ``api_key_env``). It is sent in the
``Authorization`` header and nowhere else: not in ``repr``, not in error messages (server text is
redacted by :mod:`align_env.redaction`), not in pickles. Token usage reported by the server is summed in
``usage`` (``{"tokens_in", "tokens_out"}``) so annotators can count cost; a malformed ``usage`` is a
:class:`ServerError` naming the reply's shape.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from align_env.engines import ContinuationScore, Generation, PromptInput
from align_env.engines.openai_parse import (ServerError, choice_text, continuation_start, derive_seed, display_url,
                                            logsumexp, parse_label, parse_tops, usage_counts)
from align_env.engines.openai_parse import choice as first_choice
from align_env.engines.openai_transport import Secret, Transport
from align_env.errors import AlignEnvError, did_you_mean
from align_env.redaction import safe_text

BASE_URL_ENV = ("ALIGN_ENV_OPENAI_BASE_URL", "OPENAI_BASE_URL")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
MODES = ("chat", "completions")


class CapabilityError(AlignEnvError):
    """The server does not serve what was asked (e.g. prompt log-probabilities for ``score``)."""



class OpenAIEngine:
    """Generation, next-token log-probs and (where served) scoring on an OpenAI-compatible server."""

    name = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", mode: str = "chat", timeout: float = 60.0,
                 connect_timeout: float | None = None, max_retries: int = 3, backoff: float = 0.5,
                 backoff_max: float = 8.0, jitter_seed: int = 0, max_concurrency: int = 8, top_logprobs: int = 20,
                 chat_template: str | None = None, capabilities: Sequence[str] | None = None,
                 extra_body: dict | None = None, logprobs: bool = True, answer_tokens: int = 8):
        if mode not in MODES:
            raise did_you_mean("openai engine mode", mode, MODES)
        if timeout <= 0 or max_retries < 0 or max_concurrency < 1 or top_logprobs < 1:
            raise AlignEnvError(f"need timeout > 0, max_retries >= 0, max_concurrency >= 1 and top_logprobs >= 1; got "
                                f"{timeout}, {max_retries}, {max_concurrency}, {top_logprobs}")
        self.model, self.mode = model, mode
        url = base_url or next((os.environ[k] for k in BASE_URL_ENV if os.environ.get(k)), DEFAULT_BASE_URL)
        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        if urlsplit(url).path in ("", "/"):
            url += "/v1"
        self.base_url = url
        self.api_key_env = api_key_env
        secret = Secret(api_key if api_key is not None else os.environ.get(api_key_env))
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout or min(10.0, timeout))
        self.max_retries, self.backoff, self.backoff_max = int(max_retries), float(backoff), float(backoff_max)
        self.jitter_seed, self.max_concurrency, self.top_logprobs = jitter_seed, int(max_concurrency), int(top_logprobs)
        self.chat_template = chat_template
        self.has_chat_template = chat_template is not None
        self.stop_strings = [] if self.has_chat_template else ["\nUser:"]
        self.extra_body = dict(extra_body or {})
        self._caps = frozenset(capabilities) if capabilities is not None else None
        self.capability_notes: dict[str, str] = {}
        self.usage = {"tokens_in": 0, "tokens_out": 0}
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "parsed_answers": 0, "unparsed_answers": 0}
        # Judge answers parsed from text rather than read from log-probs (asked for, or found out).
        self._text_answers, self.answer_tokens = not logprobs, int(answer_tokens)
        self._init_runtime(secret)

    def _init_runtime(self, secret: Secret) -> None:
        self._lock = threading.Lock()
        self._transport = Transport(self.base_url, secret, api_key_env=self.api_key_env, timeout=self.timeout,
                                    connect_timeout=self.connect_timeout, max_retries=self.max_retries,
                                    backoff=self.backoff, backoff_max=self.backoff_max, jitter_seed=self.jitter_seed,
                                    max_concurrency=self.max_concurrency, stats=self.stats, lock=self._lock)

    @classmethod
    def from_name(cls, model: str, **options) -> OpenAIEngine:
        """``model`` is the name the server knows the model by; options as in the constructor.

        The API key comes from the environment (``$OPENAI_API_KEY`` or ``api_key_env``), never from options.
        """
        if "api_key" in options:
            raise AlignEnvError("pass the API key in the environment ($OPENAI_API_KEY or the variable named by "
                                "api_key_env), not as an engine option")
        return cls(model, **options)

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.model!r}, base_url={display_url(self.base_url)!r}, mode={self.mode!r})"

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_transport", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime(Secret(os.environ.get(self.api_key_env)))

    # -- capabilities ---------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        """What the server serves: {"generate", "next_token"} always, "score" when it echoes prompt log-probs."""
        if self._caps is None:
            self._caps = self._probe()
        return self._caps

    # A text any language model continues with confidence: correctly aligned echo log-probs average about
    # -0.06 nats per token on it (SmolLM2-135M, Gemma-3-270M); the misaligned echo log-probs of
    # llama-cpp-python's server (0.3.x) average about -12.
    _PROBE = ("1, 2, 3, 4, 5, 6, 7, 8,", " 9, 10, 11, 12, 13, 14, 15, 16")
    _PROBE_MIN_MEAN = -2.0

    def _probe(self) -> frozenset[str]:
        """One small echo request: does the server give (correctly aligned) prompt log-probs?"""
        self.capability_notes = {}
        try:
            got = self._echo_score(*self._PROBE, retries=min(1, self.max_retries))
            if got.tokens == 0 or got.mean_logprob < self._PROBE_MIN_MEAN:
                self.capability_notes["score"] = (
                    f"its echoed prompt log-probs look misaligned (mean {got.mean_logprob:.2f} nats per token on a "
                    f"counting sequence, expected > {self._PROBE_MIN_MEAN}), as llama-cpp-python's server (0.3.x) "
                    f"gives them")
        except CapabilityError as exc:
            self.capability_notes["score"] = safe_text(getattr(exc, "detail", str(exc)))
        except ServerError as exc:
            if exc.status is None or exc.retryable or exc.status in (401, 403):  # unreachable, failing, or the
                raise  # key is refused: say so now
            self.capability_notes["score"] = f"/completions with echo=True and logprobs was refused ({exc})"
        score = "score" not in self.capability_notes
        return frozenset({"generate", "next_token"} | ({"score"} if score else set()))

    def _need(self, capability: str, detail: str) -> CapabilityError:
        if self._caps is not None:
            self._caps = self._caps - {capability}
        err = CapabilityError(f"engine 'openai' at {display_url(self.base_url)} cannot serve '{capability}': "
                              f"{detail}")
        err.detail = detail
        return err

    # -- HTTP (the transport: openai_transport.py) ---------------------------------------------------------
    def _post(self, path: str, payload: dict, *, retries: int | None = None) -> dict:
        """POST ``extra_body | payload`` and return the decoded answer (token usage counted)."""
        data = self._transport.post(path, {**self.extra_body, **payload}, model=self.model, retries=retries)
        counts = usage_counts(data, display_url(self.base_url + path))
        if counts is not None:
            with self._lock:
                self.usage["tokens_in"] += counts[0]
                self.usage["tokens_out"] += counts[1]
        return data

    def _map(self, fn: Callable, items: list) -> list:
        """``[fn(x) for x in items]`` on at most ``max_concurrency`` threads, in order; the first error wins."""
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)),
                                  thread_name_prefix="align-env-openai")
        try:
            futures = [pool.submit(fn, x) for x in items]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- rendering ----------------------------------------------------------------------------------------------
    def render(self, prompt: PromptInput, add_generation_prompt: bool = True) -> str:
        """Messages -> text for ``/completions``, with ``chat_template`` (the plain template by default)."""
        from align_env.text import check_prompt

        prompt = check_prompt(prompt)
        if isinstance(prompt, str):
            return prompt
        from transformers.utils.chat_template_utils import render_jinja_template

        from align_env.engines.transformers_engine import PLAIN_TEMPLATE

        rendered, _ = render_jinja_template(conversations=[prompt], chat_template=self.chat_template or PLAIN_TEMPLATE,
                                            add_generation_prompt=add_generation_prompt)
        return rendered[0]

    def _uses_chat(self, prompt: PromptInput) -> bool:
        return self.mode == "chat" and not isinstance(prompt, str)

    # -- protocol -------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[PromptInput], *, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 64, seed: int | None = None) -> list[list[Generation]]:
        """``n`` samples per prompt, one request each (seeded by (seed, prompt, sample) when ``seed`` is set)."""
        from align_env.text import check_sampling

        check_sampling(n, temperature, top_p, max_new_tokens)
        prompts = list(prompts)
        tasks = [(i, k) for i in range(len(prompts)) for k in range(n)]

        def one(task) -> Generation:
            i, k = task
            p = prompts[i]
            payload = {"model": self.model, "max_tokens": int(max_new_tokens), "temperature": float(temperature),
                       "top_p": float(top_p), "n": 1}
            if seed is not None:
                payload["seed"] = derive_seed(int(seed), i, k)
            chat = self._uses_chat(p)
            if chat:
                payload["messages"] = p
            else:
                payload["prompt"] = self.render(p)
                if self.stop_strings and not isinstance(p, str):
                    payload["stop"] = list(self.stop_strings)
            data = self._post("/chat/completions" if chat else "/completions", payload)
            shown = display_url(self.base_url)
            choice = first_choice(data, shown)
            text = choice_text(choice, chat, shown)
            prompt_tokens, tokens = usage_counts(data, shown) or (0, 0)
            finish = choice.get("finish_reason") or "stop"
            finish = finish if isinstance(finish, str) else "stop"
            finish = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(finish, finish)
            return Generation(text=text.strip(), tokens=tokens, finish_reason=finish, prompt_tokens=prompt_tokens)

        flat = self._map(one, tasks)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def next_token_logprobs(self, contexts: Sequence[PromptInput], candidates: Sequence[str]) -> list[dict[str, float]]:
        """log p(first token of each candidate | context), read from the server's top log-probs.

        A server that gives no log-probs (or ``logprobs=False``) gets the answer parsed from generated text
        instead: the label found gets 0.0, the others ``-inf``; with no label found every candidate gets
        ``-inf`` (a judge abstains), counted in ``stats["unparsed_answers"]``.
        """
        candidates = list(candidates)
        if not candidates or any(not isinstance(c, str) or not c for c in candidates):
            raise AlignEnvError(f"candidates must be non-empty strings, got {candidates!r}")
        if len(set(candidates)) != len(candidates):
            raise AlignEnvError(f"candidates {candidates} repeat; pick distinct labels")
        stripped = [c.strip() for c in candidates]
        loose = all(stripped) and len(set(stripped)) == len(stripped)

        def one(ctx) -> dict[str, float]:
            tops = None if self._text_answers else self._top_logprobs(ctx)
            if tops is None:  # the server gives no log-probs: read the answer from generated text
                return self._parsed_answer(ctx, candidates)
            out = {}
            for cand, bare in zip(candidates, stripped):
                hits = [lp for tok, lp in tops.items() if tok == cand or (loose and tok.strip() == bare)]
                out[cand] = logsumexp(hits)
            return out

        return self._map(one, list(contexts))

    def _parsed_answer(self, ctx: PromptInput, candidates: list[str]) -> dict[str, float]:
        (gen,) = self.generate([ctx], temperature=0.0, max_new_tokens=self.answer_tokens)
        label = parse_label(gen[0].text, candidates)
        with self._lock:
            self.stats["parsed_answers" if label is not None else "unparsed_answers"] += 1
        return {c: 0.0 if c == label else float("-inf") for c in candidates}

    def _top_logprobs(self, ctx: PromptInput) -> dict[str, float] | None:
        """{token text: log-prob} of the next token's top alternatives (sampled token included).

        None when the server answered with text but without log-probs (it does not serve them): from then on
        answers are parsed from text.
        """
        chat = self._uses_chat(ctx)
        payload = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if chat:
            payload.update(messages=ctx, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            payload.update(prompt=self.render(ctx), logprobs=self.top_logprobs)
        path = "/chat/completions" if chat else "/completions"
        shown = display_url(self.base_url)
        choice = first_choice(self._post(path, payload), shown)
        tops = parse_tops(choice.get("logprobs"), chat, shown)
        if tops is None and choice.get("finish_reason") == "stop" and not choice_text(choice, chat).strip():
            # The model ended at once (end-of-text) and the server then sent no log-probs (llama.cpp's Python
            # server does this): ask again for one real token. When that is refused too, no candidate is in
            # view: every candidate gets -inf and a judge abstains.
            try:
                choice = first_choice(self._post(path, {**payload, "min_tokens": 1}), shown)
            except ServerError as exc:
                if exc.status is None or exc.retryable:
                    raise
                return {}
            tops = parse_tops(choice.get("logprobs"), chat, shown)
            if tops is None:
                return {}
        if tops is None:
            with self._lock:
                self._text_answers = True
                self.capability_notes["next_token"] = (
                    f"the server returned no log-probs for {path}: judge answers are parsed from generated text "
                    f"(hard 0/1 verdicts)")
        return tops

    def score(self, contexts: Sequence[PromptInput], continuations: Sequence[str]) -> list[ContinuationScore]:
        """log p(continuation | context) from the server's echoed prompt log-probs (``/completions``).

        The server tokenizes context + continuation as one text; the continuation's tokens are those that
        cover it from the end (a token that straddles the boundary counts with the continuation). An empty
        string context leaves the first token unscored (servers give it no log-prob).
        """
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        if "score" not in self.capabilities:
            note = self.capability_notes.get("score") or "it was declared without 'score'"
            raise self._need("score", f"{note}. Use a server that echoes prompt log-probs (vLLM), another engine "
                                      f"(transformers, llama_cpp), or an annotator family that needs only "
                                      f"'next_token' (llm_judge)")
        return self._map(lambda pair: self._echo_score(self.render(pair[0]), pair[1]),
                         list(zip(contexts, continuations)))

    def _echo_score(self, ctx_text: str, cont: str, *, retries: int | None = None) -> ContinuationScore:
        shown = display_url(self.base_url)
        if not cont:
            return ContinuationScore(0.0, 0, (), 0, False)
        payload = {"model": self.model, "prompt": ctx_text + cont, "max_tokens": 1, "temperature": 0.0,
                   "echo": True, "logprobs": 0}
        try:
            data = self._post("/completions", payload, retries=retries)
        except ServerError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (401, 403, 429):
                raise self._need("score", f"/completions with echo=True and logprobs was refused ({exc})") from None
            raise
        choice = first_choice(data, shown)
        lp = choice.get("logprobs")
        toks = lp.get("tokens") if isinstance(lp, dict) else None
        vals = lp.get("token_logprobs") if isinstance(lp, dict) else None
        if not isinstance(toks, list) or not isinstance(vals, list) or len(toks) != len(vals) or not toks:
            raise self._need("score", "the server returned no echoed prompt log-probs (/completions with echo=True "
                                      "and logprobs)")
        texts = [t if isinstance(t, str) else "" for t in toks]
        counts = usage_counts(data, shown)
        generated = counts[1] if counts is not None else 1
        # Where the echoed prompt ends: servers differ on whether the generated token is listed.
        for end in dict.fromkeys([len(toks) - min(generated, len(toks)), len(toks), len(toks) - 1]):
            start = continuation_start(texts, end, cont)
            if start is not None:
                break
        else:
            tail = "".join(texts)[-60:]
            raise self._need("score", f"its echoed tokens do not end with the continuation (they end with {tail!r})")
        lps = [float(v) for v in vals[start:end] if isinstance(v, (int, float)) and not isinstance(v, bool)]
        n_ctx = (counts[0] if counts is not None and counts[0] else end) - (end - start)
        return ContinuationScore(sum(lps), len(lps), tuple(lps), max(0, n_ctx), False)



__all__ = ["CapabilityError", "OpenAIEngine", "ServerError", "continuation_start", "parse_label"]
