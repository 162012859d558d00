"""The ``likelihood`` family: scores from a causal LM's log-probabilities, no prompting.

Modes (x the request, y the response, n_y its token count):

* ``pmi``: pointwise mutual information of response and request, per token,
  [log p(y | x) - log p(y)] / n_y. It rewards what the request makes likely beyond what is likely anyway,
  so generic or off-topic text scores low (a small LM carries this signal where its prompted judgement
  is at chance).
* ``mean_logprob``: log p(y | x) / n_y, the fluency of y as an answer to x.
* ``reconstruction`` (summaries): log p(post | summary) - log p(post), per post token: how much the summary
  helps to predict the post (faithful, informative summaries help most).

``log p(y)`` is measured after the same chat framing with an empty request, so the framing cancels.
Pairwise: P(a > b) = sigmoid((s_a - s_b) / temperature). An empty response gets ``EMPTY_SCORE`` (the
floor), so it loses to any non-empty one; the family does not abstain. Inputs longer than the model's context
follow the engine's policy (transformers: the request loses its oldest tokens, then an overlong response its
last ones); ``last_details[i]["truncated"]`` records it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from align_env.engines import require
from align_env.errors import AlignEnvError
from align_env.feedback.base import CostMeter, Prompt, Verdict, as_item, check_batch

MODES = ("pmi", "mean_logprob", "reconstruction")
EMPTY_SCORE = -20.0


class LikelihoodScorer:
    deterministic = True
    order_free = True  # each response is scored on its own

    def __init__(self, engine, *, mode: str = "pmi", temperature: float = 0.5, spec: str = "likelihood"):
        if mode not in MODES:
            raise AlignEnvError(f"likelihood mode must be one of {MODES}, got {mode!r}")
        if temperature <= 0:
            raise AlignEnvError(f"likelihood temperature must be > 0, got {temperature}")
        require(engine, "score", "likelihood")
        self.engine, self.mode, self.temperature, self.spec = engine, mode, float(temperature), spec
        self._meter = CostMeter()
        self.last_details: list[dict] = []  # per item of the last call: {"truncated": bool} (the engine's policy)

    @property
    def cost(self):
        return self._meter.cost

    def _scores(self, items, responses: Sequence[str]) -> list[float]:
        live = [k for k, r in enumerate(responses) if r.strip()]
        out = [EMPTY_SCORE] * len(responses)
        self._cut = [False] * len(responses)
        if not live:
            return out
        its, rs = [items[k] for k in live], [responses[k] for k in live]
        if self.mode == "reconstruction":
            ctx_cond = [f"Summary: {r}\n\nThe post it summarises:\n" for r in rs]
            ctx_base = ["The post:\n" for _ in rs]
            posts = [i.source for i in its]
            cond = self.engine.score(ctx_cond, posts)
            base = self.engine.score(ctx_base, posts)
            vals = [(c.logprob - b.logprob) / max(1, c.tokens) for c, b in zip(cond, base)]
            self._meter.cost.tokens_in += sum(c.context_tokens + c.tokens for c in cond)  # as pmi: the scored pass
            base_cut = [b.truncated for b in base]
        else:
            cond = self.engine.score([i.messages for i in its], rs)
            base_cut = [False] * len(cond)
            if self.mode == "mean_logprob":
                vals = [c.mean_logprob for c in cond]
            else:
                empty = [[{"role": "user", "content": ""}] for _ in rs]
                base = self.engine.score(empty, rs)
                vals = [(c.logprob - b.logprob) / max(1, c.tokens) for c, b in zip(cond, base)]
                base_cut = [b.truncated for b in base]
            self._meter.cost.tokens_in += sum(c.context_tokens + c.tokens for c in cond)
        for k, c, bc in zip(live, cond, base_cut):
            self._cut[k] = bool(getattr(c, "truncated", False) or bc)
        for k, v in zip(live, vals):
            out[k] = v if math.isfinite(v) else EMPTY_SCORE
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses)
        with self._meter.measure(calls=len(prompts)):
            out = self._scores([as_item(p) for p in prompts], list(responses))
        self.last_details = [{"truncated": c} for c in self._cut]
        return out

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, a, b)
        items = [as_item(p) for p in prompts]
        with self._meter.measure(calls=len(items)):
            s = self._scores(items + items, list(a) + list(b))
        n = len(items)
        self.last_details = [{"truncated": self._cut[k] or self._cut[n + k]} for k in range(n)]
        return [1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, (s[k] - s[n + k]) / self.temperature))))
                for k in range(n)]
