"""The env's annotator, asked only for the pairs an agent requests a label for.

An agent that labels part of its pairs itself (SAIL-PP and SAIL-DP label with the policy's own Bradley-Terry
probability) must not pay an annotator call for them. The environment judges every pair of a step, so such an
agent hands the environment this wrapper as its ``annotator_spec`` (the runner builds the env with it):

* ``act()`` calls :meth:`RequestedLabels.request` with the pair it returns and which of them need a verdict;
* the env's ``step`` calls :meth:`pairwise` on that same batch: only the requested pairs reach the inner
  annotator (one batched call, so ``cost`` grows by the requested pairs only); the others get ``None``, the
  protocol's "no verdict" (the env marks them abstained, and the agent ignores them: it never asked);
* any other batch (a caller that did not go through ``request``) is judged in full, as the plain annotator.

``spec`` is the inner annotator's spec, so a run's ``config.json`` names the real annotator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from align_env.feedback import FeedbackCost


class RequestedLabels:
    """Forwards to ``inner`` only the pairs the last :meth:`request` marked (see the module docstring)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.spec = getattr(inner, "spec", repr(inner))
        self.deterministic = getattr(inner, "deterministic", False)
        self.cacheable = False  # the inner annotator keeps its own cache
        self._pending: tuple[list[str], list[str], list[bool]] | None = None
        self.requested = self.skipped = 0  # pairs sent to the inner annotator / answered None without a call

    @property
    def cost(self) -> FeedbackCost:
        return getattr(self.inner, "cost", FeedbackCost())

    def request(self, a: Sequence[str], b: Sequence[str], wanted: Sequence[bool]) -> None:
        """The next ``pairwise(…, a, b)`` judges only the pairs where ``wanted`` is True."""
        self._pending = (list(a), list(b), [bool(w) for w in wanted])

    def pairwise(self, prompts: Sequence, a: Sequence[str], b: Sequence[str]) -> list[float | None]:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != list(a) or pending[1] != list(b):
            return list(self.inner.pairwise(prompts, a, b))
        idx = [i for i, w in enumerate(pending[2]) if w]
        out: list[float | None] = [None] * len(a)
        if idx:
            verdicts = self.inner.pairwise([prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx])
            for i, v in zip(idx, verdicts):
                out[i] = v
        self.requested += len(idx)
        self.skipped += len(a) - len(idx)
        return out

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float | None]:
        return list(self.inner.score(prompts, responses))
