"""The ``llama_cpp`` engine: frozen GGUF models in-process through llama.cpp (``llama-cpp-python``).

It serves the same protocol as the transformers engine (``generate``, ``score``, ``next_token_logprobs``,
``render``) and follows the same conventions, so a judge gives the same verdicts on either engine up to
quantization noise:

* chat messages are rendered with the GGUF's own chat template (``tokenizer.chat_template``), through the
  same Jinja renderer transformers uses; a GGUF without a template (a base model) gets the plain
  ``User:/Assistant:`` template, with BOS prepended, exactly as the transformers engine does;
* context and continuation are tokenized apart and joined; an empty string context scores after BOS;
* overlong prompts follow the ``overflow`` policy (``truncate_left`` or ``error`` ->
  :class:`~align_env.engines.transformers_engine.PromptTooLongError`).

Speed: llama.cpp evaluates a prompt in large batches and only the positions whose logits are needed are
output. The engine keeps the KV cache of the last sequence and re-uses its longest common prefix with the
next one; ``score`` and ``next_token_logprobs`` visit their rows in sorted token order, so prompts that
share a preamble (a judge's rubric, the two orders of a pair) evaluate it once.

Sampling is done here, in numpy, from the logits (temperature, top-p), with one generator per sample seeded
by ``(seed, prompt index, sample index)``: a seeded call is reproducible and a prompt's samples do not
depend on what the other prompts of the batch are.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from align_env.engines import ContinuationScore, Generation, PromptInput
from align_env.engines.transformers_engine import OVERFLOW_POLICIES, PLAIN_TEMPLATE, PromptTooLongError
from align_env.errors import AlignEnvError, did_you_mean

# Bytes of logits one decode call may output (rows x vocabulary x 4): bounds memory for large vocabularies.
_LOGIT_BYTES_PER_CALL = 64 << 20


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise AlignEnvError(
            "the llama_cpp engine needs llama-cpp-python: pip install 'align-env[llama]'"
        ) from exc
    return llama_cpp


def resolve_gguf(model: str) -> tuple[Path, str]:
    """(GGUF path, display name) of a catalogue name (e.g. ``smollm2-135m``) or a ``.gguf`` file path."""
    from align_env.models import CATALOGUE, gguf_path

    if model in CATALOGUE:
        return gguf_path(model), model
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise AlignEnvError(f"GGUF file {str(path)!r} does not exist")
        return path, path.name
    raise did_you_mean("llama_cpp model (a catalogue name or a .gguf file path)", model, CATALOGUE)


class LlamaCppEngine:
    """Generation and scoring on a GGUF model with llama.cpp, in-process (CPU by default)."""

    name = "llama_cpp"
    capabilities = frozenset({"generate", "score", "next_token"})

    def __init__(self, llm, *, overflow: str = "truncate_left", chat_template: str | None = None,
                 model_name: str = "gguf"):
        if overflow not in OVERFLOW_POLICIES:
            raise did_you_mean("overflow policy", overflow, OVERFLOW_POLICIES)
        self._lib = _import_llama_cpp()
        self.llm, self.overflow, self.model_name = llm, overflow, model_name
        template = chat_template if chat_template is not None else llm.metadata.get("tokenizer.chat_template")
        if template == "plain":
            template = None
        self.chat_template = template or None
        self.has_chat_template = self.chat_template is not None
        self.max_context = int(llm.n_ctx())
        self.n_vocab = int(llm.n_vocab())
        self.n_batch = int(getattr(llm, "n_batch", 512))
        self._vocab = self._lib.llama_model_get_vocab(llm.model)
        self._bos_id = int(llm.token_bos())
        self._special = {
            "bos_token": llm._model.token_get_text(self._bos_id) if self._bos_id >= 0 else "",
            "eos_token": llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else "",
        }
        self._batch = self._lib.llama_batch_init(self.n_batch, 0, 1)
        self._kv: list[int] = []  # the tokens whose keys and values sit in the cache (sequence 0)
        self._lock = threading.RLock()
        self.stats = {"truncated_prompts": 0, "reused_tokens": 0, "decoded_tokens": 0}
        self.usage = {"tokens_in": 0, "tokens_out": 0}
        # A base model under the plain template goes on to write the next "User:" turn: stop there.
        self.stop_strings = [] if self.has_chat_template else ["\nUser:"]
        # Free the native objects before interpreter teardown (llama-cpp-python's own finalizer then fails).
        atexit.register(_close_at_exit, weakref.ref(self))

    @classmethod
    def from_name(cls, model: str, *, n_ctx: int | None = None, n_threads: int | None = None, n_batch: int = 512,
                  overflow: str = "truncate_left", chat_template: str | None = None, n_gpu_layers: int = 0,
                  verbose: bool = False, **llama_kwargs) -> LlamaCppEngine:
        """``model``: a catalogue name (``smollm2-135m``, ``gemma3-270m``) or a path to a ``.gguf`` file.

        ``n_ctx`` defaults to the model's training context capped at 4096; ``n_threads`` to ``os.cpu_count()``;
        ``chat_template`` overrides the GGUF's template (``"plain"`` forces the plain template). Other keyword
        arguments go to ``llama_cpp.Llama``.
        """
        lib = _import_llama_cpp()
        path, display = resolve_gguf(model)
        threads = int(n_threads or os.cpu_count() or 1)
        llm = lib.Llama(str(path), n_ctx=int(n_ctx or 4096), n_batch=int(n_batch), n_ubatch=int(n_batch),
                        n_threads=threads, n_threads_batch=threads, n_gpu_layers=int(n_gpu_layers), logits_all=False,
                        verbose=verbose, **llama_kwargs)
        engine = cls(llm, overflow=overflow, chat_template=chat_template, model_name=display)
        train = int(llm._model.n_ctx_train() or 0)
        if n_ctx is None and 0 < train < engine.max_context:
            engine.max_context = train  # never run past the training context unless asked to
        return engine

    def __repr__(self) -> str:
        return f"LlamaCppEngine(model={self.model_name!r}, n_ctx={self.max_context})"

    def close(self) -> None:
        """Free the llama.cpp model, context and batch (the engine is unusable afterwards)."""
        with self._lock:
            if self._batch is not None:
                self._lib.llama_batch_free(self._batch)
                self._batch = None
                self.llm.close()

    def _check_open(self) -> None:
        if self._batch is None:  # using a freed llama.cpp model would crash the process
            raise AlignEnvError(f"{self!r} is closed")

    # -- text <-> tokens ------------------------------------------------------------------------------------
    def render(self, prompt: PromptInput, add_generation_prompt: bool = True) -> str:
        """Chat messages -> the model's prompt text (the GGUF's template, or the plain one for base models)."""
        from align_env.text import check_prompt

        prompt = check_prompt(prompt)
        if isinstance(prompt, str):
            return prompt
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[prompt], chat_template=self.chat_template or PLAIN_TEMPLATE,
            add_generation_prompt=add_generation_prompt, **self._special,
        )
        return rendered[0]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, no BOS; special tokens written in the text are parsed (as transformers does)."""
        self._check_open()
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else []

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text. A chat template already holds its special tokens."""
        ids = self.tokenize(text)
        if not self.has_chat_template and self._bos_id >= 0 and (not ids or ids[0] != self._bos_id):
            ids = [self._bos_id] + ids
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        self._check_open()
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="ignore") if ids else ""

    def _fit(self, ids: list[int], budget: int) -> tuple[list[int], bool]:
        if budget <= 0:
            raise PromptTooLongError(f"no room for a prompt: the context is {self.max_context} tokens")
        if len(ids) <= budget:
            return ids, False
        if self.overflow == "error":
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens does not fit the context of {self.max_context} tokens "
                f"with {self.max_context - budget} tokens reserved; shorten it or use overflow='truncate_left'"
            )
        self.stats["truncated_prompts"] += 1
        return ids[len(ids) - budget :], True

    # -- the forward pass -----------------------------------------------------------------------------------
    def _clear_cache(self) -> None:
        mem = self._lib.llama_get_memory(self.llm.ctx)
        if mem is not None:
            self._lib.llama_memory_clear(mem, True)
        self._kv = []

    def _forward(self, tokens: list[int], need_from: int, on_logits: Callable[[int, np.ndarray], None]) -> None:
        """Evaluate ``tokens``; call ``on_logits(pos, logits)`` for every ``pos >= need_from``.

        ``logits`` (a view, valid during the call) is the distribution of the token at ``pos + 1``. The
        cached prefix shared with the previous sequence is kept and not evaluated again.
        """
        self._check_open()
        if not tokens:
            raise AlignEnvError("nothing to evaluate: empty token sequence")
        if len(tokens) > self.max_context:
            raise PromptTooLongError(f"{len(tokens)} tokens do not fit the context of {self.max_context} tokens")
        need_from = max(0, min(need_from, len(tokens) - 1))
        lib, ctx, batch = self._lib, self.llm.ctx, self._batch
        keep = 0
        for a, b in zip(self._kv, tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, need_from)
        mem = lib.llama_get_memory(ctx)
        if keep and (mem is None or not lib.llama_memory_seq_rm(mem, 0, keep, -1)):
            keep = 0
        if not keep:
            self._clear_cache()
        self._kv = list(tokens[:keep])
        self.stats["reused_tokens"] += keep
        max_outputs = max(1, min(self.n_batch, _LOGIT_BYTES_PER_CALL // (4 * self.n_vocab)))
        pos = keep
        while pos < len(tokens):
            # A call outputs at most ``max_outputs`` rows of logits.
            end = min(len(tokens), pos + self.n_batch, max(need_from, pos) + max_outputs)
            batch.n_tokens = end - pos
            for i, p in enumerate(range(pos, end)):
                batch.token[i] = tokens[p]
                batch.pos[i] = p
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = p >= need_from
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                self._clear_cache()
                raise AlignEnvError(f"llama_decode failed (code {rc}) at positions {pos}..{end - 1}")
            self._kv.extend(tokens[pos:end])
            self.stats["decoded_tokens"] += end - pos
            for i, p in enumerate(range(pos, end)):
                if p >= need_from:
                    ptr = lib.llama_get_logits_ith(ctx, i)
                    on_logits(p, np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                       shape=(self.n_vocab,)))
            pos = end

    @staticmethod
    def _logsumexp(row: np.ndarray) -> float:
        row = row.astype(np.float64, copy=False)
        m = float(row.max())
        return m + float(np.log(np.exp(row - m).sum()))

    # -- protocol ---------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[PromptInput], *, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 64, seed: int | None = None) -> list[list[Generation]]:
        """``n`` samples per prompt (greedy when ``temperature == 0``), seeded per (seed, prompt, sample)."""
        if max_new_tokens < 1 or max_new_tokens >= self.max_context:
            raise AlignEnvError(f"max_new_tokens must be in [1, {self.max_context}), got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise AlignEnvError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if n < 1:
            raise AlignEnvError(f"n must be >= 1, got {n}")
        with self._lock:
            encoded = [self._fit(self.encode(self.render(p)), self.max_context - max_new_tokens) for p in prompts]
            out = []
            for i, (ids, truncated) in enumerate(encoded):
                row = []
                for k in range(n):
                    entropy = [int(seed) % (1 << 63), i, k] if seed is not None else None
                    rng = np.random.default_rng(np.random.SeedSequence(entropy))
                    row.append(self._sample_one(ids, truncated, temperature, top_p, max_new_tokens, rng))
                out.append(row)
            return out

    def _sample_one(self, ids, truncated, temperature, top_p, max_new_tokens, rng) -> Generation:
        seq, body, finish = list(ids), [], "length"
        holder: dict[str, np.ndarray] = {}

        def keep_last(_pos, logits):
            holder["row"] = logits

        for _ in range(max_new_tokens):
            self._forward(seq, len(seq) - 1, keep_last)
            tok = _sample(holder["row"], temperature, top_p, rng)
            if self._lib.llama_vocab_is_eog(self._vocab, tok):
                finish = "stop"
                break
            body.append(tok)
            seq.append(tok)
            if self.stop_strings and any(s in self.detokenize(body[-16:]) for s in self.stop_strings):
                finish = "stop"
                break
        text = self.detokenize(body)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        self.usage["tokens_in"] += len(ids)
        self.usage["tokens_out"] += len(body)
        return Generation(text=text.strip(), tokens=len(body), finish_reason=finish, prompt_tokens=len(ids),
                          truncated_prompt=truncated)

    def score(self, contexts: Sequence[PromptInput], continuations: Sequence[str]) -> list[ContinuationScore]:
        """log p(continuation | context), summed over the continuation's tokens (tokenized apart and joined)."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        with self._lock:
            rows = []
            for ctx, cont in zip(contexts, continuations):
                ctx_ids = self.encode(self.render(ctx)) if (ctx or not isinstance(ctx, str)) else self._bos()
                cont_ids = self.tokenize(cont)
                truncated = False
                if len(cont_ids) >= self.max_context:
                    cont_ids, truncated = cont_ids[: self.max_context - 1], True
                if len(ctx_ids) + len(cont_ids) > self.max_context:
                    ctx_ids, truncated = self._fit(ctx_ids, self.max_context - len(cont_ids))[0], True
                rows.append((ctx_ids, cont_ids, truncated))
            results: list[ContinuationScore | None] = [None] * len(rows)
            for r in sorted(range(len(rows)), key=lambda r: rows[r][0] + rows[r][1]):
                results[r] = self._score_row(*rows[r])
            return results  # type: ignore[return-value]

    def _bos(self) -> list[int]:
        return [self._bos_id] if self._bos_id >= 0 else []

    def _score_row(self, ctx: list[int], cont: list[int], truncated: bool) -> ContinuationScore:
        seq = ctx + cont
        first = max(len(ctx), 1)  # the first token of a BOS-less sequence has no prediction
        token_lp: list[float] = []
        if first < len(seq):
            def gather(pos, logits):
                if pos + 1 < len(seq):
                    token_lp.append(float(logits[seq[pos + 1]]) - self._logsumexp(logits))

            self._forward(seq, first - 1, gather)
        self.usage["tokens_in"] += len(seq)
        return ContinuationScore(sum(token_lp), len(token_lp), tuple(token_lp), len(ctx), truncated)

    def next_token_logprobs(self, contexts: Sequence[PromptInput], candidates: Sequence[str]) -> list[dict[str, float]]:
        """log p(first token of each candidate | context), one evaluation per context."""
        first = {}
        for cand in candidates:
            ids = self.tokenize(cand)
            if not ids:
                raise AlignEnvError(f"candidate {cand!r} has no tokens")
            first[cand] = ids[0]
        if len(set(first.values())) != len(first):
            raise AlignEnvError(f"candidates {list(candidates)} share their first token; pick distinct labels")
        with self._lock:
            rows = [self._fit(self.encode(self.render(c)), self.max_context)[0] for c in contexts]
            out: list[dict[str, float] | None] = [None] * len(rows)
            for r in sorted(range(len(rows)), key=lambda r: rows[r]):
                holder = {}

                def read(_pos, logits, holder=holder):
                    lse = self._logsumexp(logits)
                    holder.update({c: float(logits[t]) - lse for c, t in first.items()})

                self._forward(rows[r], len(rows[r]) - 1, read)
                self.usage["tokens_in"] += len(rows[r])
                out[r] = holder
            return out  # type: ignore[return-value]


def _close_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from ``logits``: argmax at temperature 0, else softmax(logits / T) cut to the top-p nucleus."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        cdf = np.cumsum(p[keep])
        return int(keep[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(keep) - 1)])
    cdf = np.cumsum(p)
    return int(min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(p) - 1))
