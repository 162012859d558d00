"""The token-by-token sampling loop of the fast CPU path, and a cheaper exact way to draw each token.

transformers' ``generate`` draws a token with ``torch.multinomial``, which on CPU fills a tensor of the
whole vocabulary with exponential random numbers and takes ``argmax(p / q)``: for 16 rows x 49,152 tokens that
is 17 ms per decode step here, a fifth of the step (profiled in ``benchmarks/perf/bench_limits.py``). Drawing
by the inverse of the cumulative distribution needs one uniform number per row: token ``i`` is drawn when
``F(i-1) <= u * F(V) < F(i)``, with ``F`` the running sum of the probabilities (0.5 ms for the same shape).
Both are exact draws from the same distribution; they use the random stream differently, so for one seed
they give different (equally likely) samples. :data:`DRAWS` names the two; ``"multinomial"`` reproduces
``generate``'s tokens exactly and is what the tests compare this loop against.

:func:`sample_tokens` is the loop itself: the same steps ``generate`` takes for plain sampling (temperature,
then top-p, then the draw; finished rows continue with the pad token; stop when every row has finished or
after ``max_new_tokens``) without its per-step bookkeeping. It serves only plain sampling:
:func:`is_plain_sampling` says whether a model's generation config asks for anything more (repetition
penalties, banned words, minimum lengths...), and then the engine keeps ``generate``.
"""

from __future__ import annotations

import torch

DRAWS = ("inverse_cdf", "multinomial")

# Generation-config fields that add a logits processor or stopping rule this loop does not implement,
# with the value that means "off" (``top_k`` is passed as 0 by the engine; temperature and top-p are ours).
_OFF = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
        "min_length": (None, 0), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
        "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
        "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_p": (None,),
        "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
        "sequence_bias": (None,), "renormalize_logits": (None, False), "watermarking_config": (None,),
        "max_time": (None,)}


def is_plain_sampling(generation_config) -> bool:
    """Whether ``generation_config`` asks for nothing beyond temperature, top-p and EOS (see the module doc)."""
    if generation_config is None:
        return True
    return all(getattr(generation_config, field, None) in off for field, off in _OFF.items())


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` does it: the least likely tokens whose total
    probability is at most ``1 - top_p`` get ``-inf``; the most likely token always stays."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


def draw(probs: torch.Tensor, how: str = "inverse_cdf") -> torch.Tensor:
    """One token per row of ``probs`` ([rows, vocab], rows summing to 1), from the default random generator."""
    if how == "multinomial":
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    if how != "inverse_cdf":
        raise ValueError(f"unknown draw {how!r}; known: {', '.join(DRAWS)}")
    cdf = probs.cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    # the first index whose running sum exceeds u: zero-probability tokens (no step in F) are never drawn
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


@torch.no_grad()
def sample_tokens(model, input_ids: torch.Tensor, attention: torch.Tensor, cache, *, max_new_tokens: int,
                  eos: list[int], pad: int, temperature: float, top_p: float = 1.0,
                  how: str = "inverse_cdf") -> torch.Tensor:
    """``input_ids`` (left-padded, ``attention`` marking real tokens) continued by up to ``max_new_tokens``
    sampled tokens (greedy when ``temperature == 0``), as ``generate`` returns them: [rows, width + steps].

    ``cache`` may already hold the first tokens of every row (the engine's shared prefill); the rest of the
    prompt is run first. Finished rows (an EOS drawn) continue with ``pad``."""
    if how not in DRAWS:
        raise ValueError(f"unknown draw {how!r}; known: {', '.join(DRAWS)}")
    rows, width = input_ids.shape
    cached = int(cache.get_seq_length()) if cache is not None else 0
    if not 0 <= cached < width:
        raise ValueError(f"the cache holds {cached} tokens of a {width}-token prompt; at least one must be left")
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    eos_ids = torch.tensor(sorted(set(eos)), dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    step_ids, step_positions, mask = input_ids[:, cached:], positions[:, cached:], attention
    new_tokens = []
    for step in range(max_new_tokens):
        length = cached + step_ids.shape[1]
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, cache=cache,
                    cache_position=torch.arange(cached, length, device=input_ids.device), use_cache=True,
                    logits_to_keep=1)
        cache, cached = cache if cache is not None else out.cache, length
        scores = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        if temperature > 0:
            scores = top_p_filter(scores / temperature, top_p)
            token = draw(torch.softmax(scores, dim=-1), how)
        else:
            token = torch.argmax(scores, dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        new_tokens.append(token)
        unfinished &= ~torch.isin(token, eos_ids)
        if not bool(unfinished.any()):
            break
        step_ids, step_positions = token[:, None], step_positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids
