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


# Optional capability: ``next_token_logprobs(contexts, candidates) -> list[dict[str, float]]`` gives
# log p(candidate's first token | context) for each candidate string (e.g. " A", " B"), in one pass.
# ``capabilities`` names what an engine serves: {"generate", "score", "next_token"}.

ENGINES: dict[str, str] = {
    "transformers": "align_env.engines.transformers_engine:TransformersEngine",
    "llama_cpp": "align_env.engines.llama_cpp_engine:LlamaCppEngine",
    "openai": "align_env.engines.openai_engine:OpenAIEngine",
    "vllm": "align_env.engines.vllm_engine:VLLMEngine",
}
_LOADED: dict[tuple, object] = {}


def make_engine(name: str, model: str, **options):
    """An engine by name for ``model`` (shared: the same (name, model, options) loads once per process).

    Every engine class has ``from_name(model, **options)``.
    """
    import importlib

    from align_env.errors import did_you_mean

    if name not in ENGINES:
        raise did_you_mean("engine", name, ENGINES)
    key = (name, model, tuple(sorted(options.items())))
    if key not in _LOADED:
        module, _, attr = ENGINES[name].partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _LOADED[key] = cls.from_name(model, **options)
    return _LOADED[key]


def require(engine, capability: str, family: str) -> None:
    """Raise a clear error when ``engine`` cannot serve what ``family`` needs."""
    from align_env.errors import AlignEnvError

    caps = getattr(engine, "capabilities", {"generate", "score"})
    if capability not in caps:
        # Engines that find out what they serve (a server) say why in ``capability_notes``.
        note = (getattr(engine, "capability_notes", None) or {}).get(capability)
        raise AlignEnvError(
            f"annotator family {family!r} needs '{capability}' but engine {getattr(engine, 'name', engine)!r} "
            f"serves only {sorted(caps)}" + (f": {note}" if note else "")
        )


__all__ = ["ContinuationScore", "ENGINES", "Engine", "Generation", "Messages", "PromptInput", "make_engine",
           "require"]
