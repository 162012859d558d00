"""The ``vllm`` engine: in-process vLLM for GPU machines.

vLLM is imported lazily (in :meth:`VLLMEngine.from_name` and in the methods), so importing this module
never needs it; without it, ``make_engine("vllm", ...)`` raises a clear install hint.

Conventions are the transformers engine's (its ``render``, ``encode`` and overflow policy are reused as
they are): chat messages are rendered with the tokenizer's chat template (the plain template for base
models), prompts go to vLLM as token ids, context and continuation are tokenized apart and joined.

* ``generate``: ``SamplingParams(n, temperature, top_p, max_tokens, seed)``, one request per prompt, its
  seed derived from (seed, prompt index), so a prompt's samples do not depend on the rest of the batch.
* ``score``: ``prompt_logprobs=0`` gives log p of every prompt token; the continuation's are summed.
* ``next_token_logprobs``: the top ``logprobs`` of one greedy step; a candidate outside them is scored
  exactly with a second request whose prompt ends with the candidate's token (``prompt_logprobs``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from align_env.engines import ContinuationScore, Generation, PromptInput
from align_env.engines.transformers_engine import OVERFLOW_POLICIES, TransformersEngine
from align_env.errors import AlignEnvError, did_you_mean

INSTALL_HINT = "the vllm engine needs vLLM: pip install align-env[vllm] (needs a GPU)"
_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>")


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise AlignEnvError(INSTALL_HINT) from exc
    return vllm


def _derive_seed(seed: int, *parts: int) -> int:
    data = ":".join(str(x) for x in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big") & 0x7FFFFFFF


class VLLMEngine:
    """Generation and scoring with an in-process ``vllm.LLM``."""

    name = "vllm"
    capabilities = frozenset({"generate", "score", "next_token"})

    # The transformers engine's text handling, reused as is (it needs only ``tokenizer``,
    # ``has_chat_template``, ``overflow``, ``max_context`` and ``stats``).
    render = TransformersEngine.render
    encode = TransformersEngine.encode
    _fit = TransformersEngine._fit
    _bos = TransformersEngine._bos

    def __init__(self, llm, *, overflow: str = "truncate_left", max_context: int | None = None,
                 top_logprobs: int = 20, model_name: str = "vllm"):
        if overflow not in OVERFLOW_POLICIES:
            raise did_you_mean("overflow policy", overflow, OVERFLOW_POLICIES)
        self.llm, self.overflow, self.model_name = llm, overflow, model_name
        self.tokenizer = llm.get_tokenizer()
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
        self.max_context = int(max_context or getattr(config, "max_model_len", None) or 2048)
        self.top_logprobs = max(1, min(int(top_logprobs), int(getattr(config, "max_logprobs", 20) or 20)))
        self.stats = {"truncated_prompts": 0}
        self.usage = {"tokens_in": 0, "tokens_out": 0}
        self.stop_strings = [] if self.has_chat_template else ["\nUser:"]
        vocab = self.tokenizer.get_vocab()
        ids = {self.tokenizer.eos_token_id} | {vocab[t] for t in _END_TOKENS if t in vocab}
        self.eos_ids = sorted(i for i in ids if i is not None)

    @classmethod
    def from_name(cls, model: str, *, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.5,
                  max_model_len: int | None = None, enforce_eager: bool = False, overflow: str = "truncate_left",
                  top_logprobs: int = 20, **llm_kwargs) -> VLLMEngine:
        """``model``: a catalogue name (converted once to safetensors), a local folder or a hub id.

        Other keyword arguments go to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``max_logprobs``).
        """
        vllm = _import_vllm()
        from align_env.models import resolve

        path = resolve(model)
        if dtype is not None and not isinstance(dtype, str):  # a torch dtype from an annotator spec
            dtype = str(dtype).removeprefix("torch.")
        kwargs = {"dtype": dtype, "seed": seed, "gpu_memory_utilization": gpu_memory_utilization,
                  "enforce_eager": enforce_eager, **llm_kwargs}
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        llm = vllm.LLM(model=path, **kwargs)
        return cls(llm, overflow=overflow, top_logprobs=top_logprobs, model_name=model)

    def __repr__(self) -> str:
        return f"VLLMEngine(model={self.model_name!r}, max_context={self.max_context})"

    def _run(self, token_lists: list[list[int]], params) -> list:
        prompts = [{"prompt_token_ids": list(ids)} for ids in token_lists]
        return self.llm.generate(prompts, params, use_tqdm=False)

    # -- protocol -------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[PromptInput], *, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 64, seed: int | None = None) -> list[list[Generation]]:
        """``n`` samples per prompt (greedy when ``temperature == 0``), seeded per (seed, prompt)."""
        from vllm import SamplingParams

        if max_new_tokens < 1 or max_new_tokens >= self.max_context:
            raise AlignEnvError(f"max_new_tokens must be in [1, {self.max_context}), got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise AlignEnvError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if n < 1:
            raise AlignEnvError(f"n must be >= 1, got {n}")
        encoded = [self._fit(self.encode(self.render(p)), self.max_context - max_new_tokens) for p in prompts]
        if not encoded:
            return []
        params = [
            SamplingParams(n=n, temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_new_tokens),
                           seed=None if seed is None else _derive_seed(int(seed), i),
                           stop=list(self.stop_strings) or None, stop_token_ids=list(self.eos_ids),
                           skip_special_tokens=True)
            for i in range(len(encoded))
        ]
        outputs = self._run([ids for ids, _ in encoded], params)
        results = []
        for (ids, truncated), out in zip(encoded, outputs):
            gens = []
            for c in out.outputs:
                toks = list(c.token_ids)
                if toks and toks[-1] in self.eos_ids:
                    toks = toks[:-1]
                finish = "length" if c.finish_reason == "length" else "stop"
                gens.append(Generation(text=c.text.strip(), tokens=len(toks), finish_reason=finish,
                                       prompt_tokens=len(ids), truncated_prompt=truncated))
                self.usage["tokens_out"] += len(toks)
            self.usage["tokens_in"] += len(ids)
            results.append(gens)
        return results

    def score(self, contexts: Sequence[PromptInput], continuations: Sequence[str]) -> list[ContinuationScore]:
        """log p(continuation | context) from vLLM's prompt log-probs, summed over the continuation."""
        from vllm import SamplingParams

        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        limit = self.max_context - 1  # vLLM generates one token after the prompt
        rows = []
        for ctx, cont in zip(contexts, continuations):
            ctx_ids = self.encode(self.render(ctx)) if (ctx or not isinstance(ctx, str)) else self._bos()
            cont_ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            truncated = False
            if len(cont_ids) >= limit:
                cont_ids, truncated = cont_ids[: limit - 1], True
            if len(ctx_ids) + len(cont_ids) > limit:
                ctx_ids, truncated = self._fit(ctx_ids, limit - len(cont_ids))[0], True
            rows.append((ctx_ids, cont_ids, truncated))
        if not rows:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._run([c + t for c, t, _ in rows], params)
        results = []
        for (ctx, cont, truncated), out in zip(rows, outputs):
            seq = ctx + cont
            plp = out.prompt_logprobs or []
            token_lp = []
            for pos in range(max(len(ctx), 1), len(seq)):
                entry = plp[pos] if pos < len(plp) else None
                if not entry or seq[pos] not in entry:
                    raise AlignEnvError(f"vLLM returned no prompt log-prob for position {pos}")
                token_lp.append(float(entry[seq[pos]].logprob))
            self.usage["tokens_in"] += len(seq)
            results.append(ContinuationScore(sum(token_lp), len(token_lp), tuple(token_lp), len(ctx), truncated))
        return results

    def next_token_logprobs(self, contexts: Sequence[PromptInput], candidates: Sequence[str]) -> list[dict[str, float]]:
        """log p(first token of each candidate | context): top log-probs of one step, exact fallback."""
        from vllm import SamplingParams

        first = {}
        for cand in candidates:
            ids = self.tokenizer(cand, add_special_tokens=False)["input_ids"]
            if not ids:
                raise AlignEnvError(f"candidate {cand!r} has no tokens")
            first[cand] = ids[0]
        if len(set(first.values())) != len(first):
            raise AlignEnvError(f"candidates {list(candidates)} share their first token; pick distinct labels")
        rows = [self._fit(self.encode(self.render(c)), self.max_context - 2)[0] for c in contexts]
        if not rows:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs, detokenize=False)
        outputs = self._run(rows, params)
        out: list[dict[str, float]] = []
        missing: list[tuple[int, str]] = []
        for r, o in enumerate(outputs):
            step = (o.outputs[0].logprobs or [{}])[0] or {}
            found = {}
            for cand, tok in first.items():
                if tok in step:
                    found[cand] = float(step[tok].logprob)
                else:
                    missing.append((r, cand))
            out.append(found)
            self.usage["tokens_in"] += len(rows[r])
        if missing:  # exact: the candidate's token as the last prompt token
            exact = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
            extra = self._run([rows[r] + [first[c]] for r, c in missing], exact)
            for (r, cand), o in zip(missing, extra):
                entry = (o.prompt_logprobs or [None])[-1] or {}
                tok = first[cand]
                out[r][cand] = float(entry[tok].logprob) if tok in entry else float("-inf")
        return [{c: row[c] for c in first} for row in out]


__all__ = ["INSTALL_HINT", "VLLMEngine"]
