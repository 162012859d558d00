"""Text engines. One small protocol: ``generate`` and ``score`` (log-probabilities of continuations).

``transformers`` runs everywhere (the CPU default). Other engines (vllm, openai-compatible HTTP,
llama.cpp) satisfy the same protocol, so any annotator family runs on any engine that can serve it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Messages = list[dict[str, str]]
PromptInput = str | Messages  # a rendered string, or chat messages the engine renders


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # generated tokens (EOS excluded)
    finish_reason: str  # "stop" (EOS) or "length"
    prompt_tokens: int = 0
    truncated_prompt: bool = False


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of log p(continuation tokens | context)
    tokens: int
    token_logprobs: tuple[float, ...] = field(default=(), repr=False)
    context_tokens: int = 0
    truncated: bool = False

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, self.tokens)


@runtime_checkable
class Engine(Protocol):
    name: str

    def generate(self, prompts: Sequence[PromptInput], *, n: int = 1, temperature: float = 0.7,
                 top_p: float = 1.0, max_new_tokens: int = 64, seed: int | None = None) -> list[list[Generation]]: ...

    def score(self, contexts: Sequence[PromptInput], continuations: Sequence[str]) -> list[ContinuationScore]: ...


__all__ = ["ContinuationScore", "Engine", "Generation", "Messages", "PromptInput"]
