"""The ``pool`` family: a seeded mixture of annotators with optional label-flip noise (AlpacaFarm).

Each item is assigned one member by a hash of (seed, request, the two responses in sorted order), so the
assignment does not depend on presentation order and is the same across runs. With ``noise`` > 0 the
member's preference is flipped (P -> 1 - P) for a seeded, order-independent fraction of items: use it
for training labels only, never for evaluation. Noisy pools are not cached.

``combine=mean`` makes the pool an ensemble instead: every member judges every item and the verdict is the mean
of the members' verdicts (abstaining members left out; the item abstains when all do). Members that score each
response on their own (likelihood, embedding, rules) make an order-free ensemble.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from align_env.errors import AlignEnvError
from align_env.feedback.base import FeedbackCost, Prompt, Verdict, as_item, check_batch


def _unit(*parts: str) -> float:
    """A number in [0, 1) from a hash of the parts (stable across runs and machines)."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class AnnotatorPool:
    def __init__(self, members: Sequence, *, noise: float = 0.0, seed: int = 0, combine: str = "route",
                 spec: str = "pool"):
        if not members:
            raise AlignEnvError("pool needs at least one member annotator")
        if combine not in ("route", "mean"):
            raise AlignEnvError(f"pool combine must be 'route' (one seeded member per item) or 'mean' (ensemble), "
                                f"got {combine!r}")
        self.combine = combine
        self.order_free = all(getattr(m, "order_free", False) for m in members)
        if not 0.0 <= noise < 0.5:
            raise AlignEnvError(f"pool noise must be in [0, 0.5), got {noise}")
        self.members, self.noise, self.seed, self.spec = list(members), float(noise), int(seed), spec
        self.deterministic = all(getattr(m, "deterministic", False) for m in self.members)
        self.cacheable = self.noise == 0.0

    @property
    def cost(self) -> FeedbackCost:
        total = FeedbackCost()
        for m in self.members:
            total = total + getattr(m, "cost", FeedbackCost())
        return total

    def _member(self, text: str, x: str, y: str) -> int:
        lo, hi = sorted((x, y))
        return int(_unit(str(self.seed), "member", text, lo, hi) * len(self.members))

    def _flip(self, text: str, x: str, y: str) -> bool:
        lo, hi = sorted((x, y))
        return self.noise > 0 and _unit(str(self.seed), "noise", text, lo, hi) < self.noise

    def _route(self, prompts, *cols):
        items = [as_item(p) for p in prompts]
        second = cols[1] if len(cols) > 1 else cols[0]
        groups: dict[int, list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(self._member(item.prompt, cols[0][k], second[k]), []).append(k)
        return items, groups

    def _mean(self, kind: str, items: list, *cols) -> list[Verdict]:
        votes = [getattr(m, kind)(items, *cols) for m in self.members]
        out: list[Verdict] = []
        for k in range(len(items)):
            usable = [v[k] for v in votes if v[k] is not None]
            out.append(sum(usable) / len(usable) if usable else None)
        return out

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, a, b)
        if self.combine == "mean":
            items = [as_item(p) for p in prompts]
            out = self._mean("pairwise", items, list(a), list(b))
            return [None if v is None else (1.0 - v if self._flip(i.prompt, x, y) else v)
                    for v, i, x, y in zip(out, items, a, b)]
        items, groups = self._route(prompts, a, b)
        out: list[Verdict] = [None] * len(items)
        for m, idx in groups.items():  # one batched call per member
            verdicts = self.members[m].pairwise([items[k] for k in idx], [a[k] for k in idx], [b[k] for k in idx])
            for k, v in zip(idx, verdicts):
                out[k] = None if v is None else (1.0 - v if self._flip(items[k].prompt, a[k], b[k]) else v)
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses)
        if self.combine == "mean":
            return self._mean("score", [as_item(p) for p in prompts], list(responses))
        items, groups = self._route(prompts, responses)
        out: list[Verdict] = [None] * len(items)
        for m, idx in groups.items():
            for k, v in zip(idx, self.members[m].score([items[k] for k in idx], [responses[k] for k in idx])):
                out[k] = v
        return out
