"""The annotator protocol and feedback-cost accounting.

An annotator has two methods (TRL learned that judge class hierarchies find no users):

* ``pairwise(prompts, a, b) -> list[float | None]``: P(a better than b) per item, debiased over both
  presentation orders where order matters;
* ``score(prompts, responses) -> list[float | None]``: a scalar score per item.

``None`` means the annotator abstains: it could not give a usable verdict. Abstentions are never turned
into a silent preference by anything in align-env.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from align_env.errors import AlignEnvError, BadTextError, TextTypeError
from align_env.text import check_text, check_texts
from align_env.tracks.track import PromptItem

Prompt = PromptItem | str
Verdict = float | None


@dataclass
class FeedbackCost:
    """Cost of feedback: judgements asked, tokens in/out, wall seconds.

    ``seconds`` is measured, so it is left out of equality: two runs that asked for the same judgements
    compare equal (this keeps seeded envs deterministic under Gymnasium's checker).
    """

    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = field(default=0.0, compare=False)

    def __add__(self, other: FeedbackCost) -> FeedbackCost:
        return FeedbackCost(self.calls + other.calls, self.tokens_in + other.tokens_in,
                            self.tokens_out + other.tokens_out, self.seconds + other.seconds)

    def __sub__(self, other: FeedbackCost) -> FeedbackCost:
        return FeedbackCost(self.calls - other.calls, self.tokens_in - other.tokens_in,
                            self.tokens_out - other.tokens_out, self.seconds - other.seconds)

    def copy(self) -> FeedbackCost:
        return FeedbackCost(self.calls, self.tokens_in, self.tokens_out, self.seconds)

    def as_dict(self) -> dict[str, float]:
        return {"calls": self.calls, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "seconds": self.seconds}


@runtime_checkable
class Annotator(Protocol):
    """What the environment needs from an annotator. ``cost`` is cumulative and optional."""

    spec: str
    deterministic: bool

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]: ...

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]: ...


def as_item(prompt: Prompt) -> PromptItem:
    """Accept a PromptItem or a bare prompt string (no reference, no metadata)."""
    if isinstance(prompt, PromptItem):
        return prompt
    if isinstance(prompt, str):
        text = str(prompt)
        return PromptItem(id="", prompt=text, source=text)
    raise TextTypeError(f"prompt must be a PromptItem or str, got {type(prompt).__name__}: {prompt!r:.80}")


def check_batch(prompts: Sequence[Any], *columns: Sequence[Any]) -> None:
    """Every annotator's input check: a list of prompts and, per column, as many texts under the text policy
    (:mod:`align_env.text`); an error names the column, the index and the problem."""
    if isinstance(prompts, (str, bytes, PromptItem)) or not hasattr(prompts, "__len__"):
        raise TextTypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}: {prompts!r:.80}")
    for k, p in enumerate(prompts):
        item = as_item(p)
        check_text(item.prompt, f"prompt[{k}]")
        check_text(item.source, f"prompt[{k}].source")
        if item.reference is not None:
            check_text(item.reference, f"prompt[{k}].reference")
    names = ("responses",) if len(columns) == 1 else ("responses a", "responses b")
    for name, col in zip(names, columns):
        check_texts(col, name)
        if len(col) != len(prompts):
            raise BadTextError(f"batch size mismatch: {len(prompts)} prompts but {len(col)} {name}")


class CostMeter:
    """Mixin-free helper: ``with meter.measure(calls=n): ...`` adds calls and wall time to ``meter.cost``."""

    def __init__(self) -> None:
        self.cost = FeedbackCost()

    @contextmanager
    def measure(self, calls: int):
        start = time.perf_counter()
        try:
            yield self.cost
        finally:
            self.cost.calls += calls
            self.cost.seconds += time.perf_counter() - start


class AnnotatorOutputError(AlignEnvError, RuntimeError):
    """An annotator returned something that is not a list of verdicts (a RuntimeError too: its bug, not the input's)."""


def model_max_length(model, tokenizer, wanted: int) -> int:
    """``wanted`` capped by what the model can take (its position embeddings) and the tokenizer's limit."""
    limits = [int(wanted), getattr(model.config, "max_position_embeddings", None) or wanted,
              getattr(tokenizer, "model_max_length", None) or wanted]
    return max(2, min(x for x in limits if 0 < x < 10**9))


def validate_verdicts(verdicts: Sequence[Any], n: int, spec: str, kind: str) -> list[Verdict]:
    """Check an annotator's output: n values, each a real number (probability for pairwise) or None.

    A broken output (not a list, the wrong count, a value that is not a number: str, bool, list) is an
    :class:`AnnotatorOutputError`; a non-finite or out-of-range number is an abstention, counted as such.
    """
    import math
    from numbers import Real

    if isinstance(verdicts, (str, bytes, dict)) or not hasattr(verdicts, "__iter__"):
        raise AnnotatorOutputError(f"annotator {spec!r} returned {type(verdicts).__name__} for {kind} verdicts; "
                                   f"expected a list of {n} numbers or None")
    out = list(verdicts)
    if len(out) != n:
        raise AnnotatorOutputError(f"annotator {spec!r} returned {len(out)} {kind} verdicts for {n} items")
    for i, v in enumerate(out):
        if v is None:
            continue
        try:  # numbers, numpy scalars and 0-d tensors; not str, bool or containers
            if isinstance(v, (bool, str, bytes)) or not (isinstance(v, Real) or hasattr(v, "__float__")):
                raise TypeError
            v = float(v)
        except (TypeError, ValueError, RuntimeError):
            raise AnnotatorOutputError(f"annotator {spec!r}: {kind} verdict {i} is {type(v).__name__} {v!r:.40}, "
                                       "not a number or None") from None
        if not math.isfinite(v) or (kind == "pairwise" and not 0.0 <= v <= 1.0):
            out[i] = None  # an unusable verdict is an abstention, counted as such
        else:
            out[i] = v
    return out
