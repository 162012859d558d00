"""The ``transformers`` engine: batched generation and continuation scoring with a causal LM.

Prompts longer than the model's context are handled by a documented policy (``overflow``):
``"truncate_left"`` (default) drops the oldest prompt tokens so that prompt + ``max_new_tokens`` fits,
and marks the result ``truncated_prompt``; ``"error"`` raises :class:`PromptTooLongError` before any
tensor is built. Nothing overlong reaches torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from align_env.engines import ContinuationScore, Generation, PromptInput
from align_env.engines.decoding import (PROMPT_WIDTH_MULTIPLE, attention_for_decoding, choose_paths,
                                        new_reserved_cache, padded_width, reserve)
from align_env.engines.sampling_loop import DRAWS, is_plain_sampling, sample_tokens
from align_env.errors import AlignEnvError, did_you_mean
from align_env.text import check_prompt, check_sampling, check_texts

OVERFLOW_POLICIES = ("truncate_left", "error")
# Plain template for base models without a chat template (Gemma-3-270M base, tiny test models).
PLAIN_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}\n\n{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"


class PromptTooLongError(AlignEnvError):
    pass


class TransformersEngine:
    """Generation and scoring on a transformers causal LM (``model``, ``tokenizer`` already loaded)."""

    name = "transformers"
    capabilities = frozenset({"generate", "score", "next_token"})

    def __init__(self, model, tokenizer, *, overflow: str = "truncate_left", batch_size: int = 8,
                 max_context: int | None = None, fast_decode: bool = True, token_draw: str | None = None):
        if overflow not in OVERFLOW_POLICIES:
            raise did_you_mean("overflow policy", overflow, OVERFLOW_POLICIES)
        if token_draw is not None and token_draw not in DRAWS:
            raise did_you_mean("token draw", token_draw, DRAWS)
        self.token_draw = token_draw  # None: by the rule (decoding.choose_paths); "multinomial": generate's draw
        self.model, self.tokenizer, self.overflow, self.batch_size = model, tokenizer, overflow, int(batch_size)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        cfg_ctx = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = int(max_context or min(cfg_ctx, getattr(tokenizer, "model_max_length", cfg_ctx) or cfg_ctx))
        self.stats = {"truncated_prompts": 0}
        self.fast_decode = bool(fast_decode)  # align_env.engines.decoding; False: transformers' own decoding
        # A base model under the plain template goes on to write the next "User:" turn: stop there.
        self.stop_strings = [] if self.has_chat_template else ["\nUser:"]

    @classmethod
    def from_name(cls, name_or_path: str, *, dtype=None, **kwargs) -> TransformersEngine:
        from align_env.models import load_causal_lm

        model, tokenizer = load_causal_lm(name_or_path, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _bf16(self) -> bool:
        """Whether matmuls run in bf16 here (bf16 weights or autocast): oneDNN's path on CPU."""
        return next(self.model.parameters()).dtype == torch.bfloat16 or torch.is_autocast_enabled(self.device.type)

    @property
    def paths(self) -> dict[str, str]:
        """The decoding paths ``generate`` takes on this engine's device (:func:`decoding.choose_paths`)."""
        plain = {"kv_cache": "dynamic", "decode_attention": "sdpa", "decode_loop": "transformers",
                 "token_draw": "multinomial"}
        if not self.fast_decode:
            return plain
        paths = choose_paths(self.device)
        if paths["decode_loop"] == "align_env" and (self.stop_strings or not is_plain_sampling(
                getattr(self.model, "generation_config", None))):  # what only generate implements
            paths |= {"decode_loop": "transformers", "token_draw": "multinomial"}
        if self.token_draw is not None and paths["decode_loop"] == "align_env":
            paths["token_draw"] = self.token_draw
        return paths

    def render(self, prompt: PromptInput, add_generation_prompt: bool = True) -> str:
        """Chat messages -> the model's prompt text (the plain template for base models)."""
        prompt = check_prompt(prompt)
        if isinstance(prompt, str):
            return prompt
        template = None if self.has_chat_template else PLAIN_TEMPLATE
        return self.tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text. A chat template already holds its special tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if not self.has_chat_template and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

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

    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptInput], *, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 64, seed: int | None = None) -> list[list[Generation]]:
        """``n`` samples per prompt (greedy when ``temperature == 0``), seeded, batched with left padding."""
        check_sampling(n, temperature, top_p, max_new_tokens)
        if max_new_tokens >= self.max_context:
            raise AlignEnvError(f"max_new_tokens must be in [1, {self.max_context}), got {max_new_tokens}")
        budget = self.max_context - max_new_tokens
        encoded = [self._fit(self.encode(self.render(p)) or self._bos() or self._empty(), budget) for p in prompts]
        eos = self._eos_ids()
        results: list[list[Generation]] = []
        rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start : start + self.batch_size]
                results += self._generate_batch(chunk, n, temperature, top_p, max_new_tokens, eos)
        return results

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        for tok in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok) if tok in self.tokenizer.get_vocab() else None
            ids.add(tid)
        return sorted(i for i in ids if i is not None)

    def _generate_batch(self, chunk, n, temperature, top_p, max_new_tokens, eos) -> list[list[Generation]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids, _ in chunk)
        if self.fast_decode:  # a bounded set of prefill shapes (decoding.padded_width); pads are masked
            width = padded_width(width, PROMPT_WIDTH_MULTIPLE, self.max_context - max_new_tokens)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
            "do_sample": False}
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        shared = self._shared_prefill(input_ids, attention, n) if n > 1 and width > 1 else {}
        if shared:  # the n samples of a prompt continue one prefill, repeated n times in the cache
            input_ids, attention = input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)
        num_return, paths = 1 if shared else n, self.paths
        if paths["kv_cache"] == "reserved":
            capacity = width + max_new_tokens
            dtype = torch.float32 if torch.is_autocast_enabled(self.device.type) else None
            shared = {"past_key_values": reserve(shared["past_key_values"], capacity, dtype) if shared
                      else new_reserved_cache(self.model.config, capacity, dtype)}
        with attention_for_decoding(self.model, paths["decode_attention"] == "matmul"):
            if paths["decode_loop"] == "align_env":
                if num_return > 1:  # what generate(num_return_sequences=n) does to the inputs
                    input_ids, attention = input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)
                out = sample_tokens(self.model, input_ids, attention, shared.get("past_key_values"),
                                    max_new_tokens=max_new_tokens, eos=eos, pad=pad, temperature=temperature,
                                    top_p=top_p, how=paths["token_draw"])
                return self._decode_rows(chunk, n, out[:, width:].cpu(), eos)
            out = self._generate(input_ids, attention, max_new_tokens, num_return, eos, pad, sampling, shared)
        return self._decode_rows(chunk, n, out[:, width:].cpu(), eos)

    def _generate(self, input_ids, attention, max_new_tokens, num_return, eos, pad, sampling, shared):
        return self.model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
            num_return_sequences=num_return, eos_token_id=eos, pad_token_id=pad, **sampling, **shared,
            **({"stop_strings": self.stop_strings, "tokenizer": self.tokenizer} if self.stop_strings else {}),
        )

    def _decode_rows(self, chunk, n, new, eos) -> list[list[Generation]]:
        batch: list[list[Generation]] = []
        for row in range(len(chunk)):
            gens = []
            for k in range(n):
                toks = new[row * n + k].tolist()
                stop = next((i for i, t in enumerate(toks) if t in eos), None)
                body = toks if stop is None else toks[:stop]
                text = self.tokenizer.decode(body, skip_special_tokens=True)
                cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
                if cut >= 0:
                    text, stop = text[:cut], cut
                gens.append(Generation(
                    text=text.strip(), tokens=len(body),
                    finish_reason="length" if stop is None else "stop", prompt_tokens=len(chunk[row][0]),
                    truncated_prompt=chunk[row][1],
                ))
            batch.append(gens)
        return batch

    def _shared_prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, n: int) -> dict:
        """Run each prompt once (all but its last token) and repeat the key/value cache for its ``n`` samples.

        ``generate(num_return_sequences=n)`` would run every prompt n times; with prompts of a few hundred
        tokens and 64 new tokens that prefill is a third of the sampling time. ``generate`` then starts from
        the cache and runs only the last prompt token (the logits of the first sampled token). Models whose
        cache cannot be repeated (``batch_repeat_interleave``) take the plain path.
        """
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1],
                         position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1)
        cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return {}
        cache.batch_repeat_interleave(n)
        return {"past_key_values": cache}

    @torch.no_grad()
    def score(self, contexts: Sequence[PromptInput], continuations: Sequence[str]) -> list[ContinuationScore]:
        """log p(continuation | context), summed over continuation tokens, batched by length with left padding.

        Context and continuation are tokenized apart and joined, so the continuation's tokens are the
        same whatever the context. An empty context scores the continuation after BOS (or the first
        token is given, when the model has no BOS).
        """
        if len(contexts) != len(continuations):
            raise AlignEnvError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        continuations = check_texts(continuations, "continuations")
        rows = []
        for ctx, cont in zip(contexts, continuations):
            ctx_ids = self.encode(self.render(ctx)) if (ctx or not isinstance(ctx, str)) else self._bos()
            cont_ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            truncated = False
            if len(cont_ids) >= self.max_context:
                cont_ids, truncated = cont_ids[: self.max_context - 1], True
            if len(ctx_ids) + len(cont_ids) > self.max_context:
                ctx_ids, truncated = self._fit(ctx_ids, self.max_context - len(cont_ids))[0], True
            rows.append((ctx_ids, cont_ids, truncated))
        out: list[ContinuationScore | None] = [None] * len(rows)
        for batch in self._length_batches([c + t for c, t, _ in rows]):
            for k, result in zip(batch, self._score_batch([rows[k] for k in batch])):
                out[k] = result
        return out  # type: ignore[return-value]

    def _empty(self) -> list[int]:
        """An empty prompt for a model without BOS: start from its pad/EOS token rather than from nothing."""
        tid = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.pad_token_id
        return [tid]

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def _length_batches(self, seqs: Sequence[list[int]]) -> list[list[int]]:
        """Indices in batches of similar length (less padding), in a fixed order."""
        order = sorted(range(len(seqs)), key=lambda k: (len(seqs[k]), k))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _forward_tail(self, seqs: Sequence[list[int]], keep: int) -> torch.Tensor:
        """Log-softmax over the vocabulary at the last ``keep`` positions of each left-padded sequence.

        Only those positions go through the output layer (``logits_to_keep``): with a 49k-262k vocabulary
        the full logits of a long prompt cost as much as the rest of the model.
        """
        width = max(1, max(len(s) for s in seqs))
        if self.fast_decode and self._bf16():  # bounded shapes for oneDNN's bf16 kernels (engines.decoding)
            width = padded_width(width, PROMPT_WIDTH_MULTIPLE, self.max_context)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            if seq:
                ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[r, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), logits_to_keep=min(keep, width)).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _score_batch(self, rows) -> list[ContinuationScore]:
        seqs = [c + t for c, t, _ in rows]
        width = max(1, max(len(s) for s in seqs))
        keep = max(len(t) for _, t, _ in rows) + 1  # the last context token predicts the first continuation token
        logp = self._forward_tail(seqs, keep)  # [batch, keep', vocab], right-aligned with the sequences
        keep = logp.shape[1]
        results = []
        for r, (ctx, cont, truncated) in enumerate(rows):
            n = len(ctx) + len(cont)
            first = max(len(ctx), 1)  # the first token of a BOS-less sequence has no prediction
            # the logit at sequence position j (0-based in seq) sits at column j - (width - keep) - (width - n)
            token_lp = []
            for j in range(first - 1, n - 1):
                col = j + (width - n) - (width - keep)
                token_lp.append(float(logp[r, col, seqs[r][j + 1]]))
            results.append(ContinuationScore(sum(token_lp), len(token_lp), tuple(token_lp), len(ctx), truncated))
        return results

    @torch.no_grad()
    def next_token_logprobs(self, contexts: Sequence[PromptInput], candidates: Sequence[str]) -> list[dict[str, float]]:
        """log p(first token of each candidate | context), one forward pass per batch of contexts.

        Used by prompted judges: the preference is the softmax over the answer tokens' log-probabilities.
        """
        first = {}
        for cand in check_texts(candidates, "candidates"):
            ids = self.tokenizer(cand, add_special_tokens=False)["input_ids"]
            if not ids:
                raise AlignEnvError(f"candidate {cand!r} has no tokens")
            first[cand] = ids[0]
        if len(set(first.values())) != len(first):
            raise AlignEnvError(f"candidates {list(candidates)} share their first token; pick distinct labels")
        rows = [self._fit(self.encode(self.render(c)), self.max_context)[0] for c in contexts]
        out: list[dict[str, float] | None] = [None] * len(rows)
        for batch in self._length_batches(rows):
            logp = self._forward_tail([rows[k] for k in batch], 1)[:, -1]
            for r, k in enumerate(batch):
                out[k] = {c: float(logp[r, t]) for c, t in first.items()}
        return out  # type: ignore[return-value]
