"""Factories that turn a parsed spec into an annotator, one per family."""

from __future__ import annotations

import inspect

from align_env.errors import AlignEnvError
from align_env.feedback.spec import AnnotatorSpec


def check_params(spec: AnnotatorSpec, cls) -> dict:
    """Unknown spec parameters are an error that lists the accepted ones; known ones are converted to the
    family's declared types (:mod:`align_env.feedback.params`). Returns the converted parameters."""
    import difflib

    from align_env.feedback.params import describe, typed_params

    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "track", "spec", "engine", "model")]
    for key in spec.params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            kinds = describe(spec.family)
            listing = {k: kinds.get(k, "any") for k in accepted} if kinds else accepted
            raise AlignEnvError(f"annotator {spec.family!r} has no parameter {key!r}.{hint} Accepted: {listing}")
    return typed_params(spec.family, dict(spec.params), raw=spec.raw)


def rules(spec: AnnotatorSpec, track: str | None):
    from align_env.feedback.rules import RulesAnnotator

    params = {k: v for k, v in spec.params.items() if k != "cache"}
    params = check_params(AnnotatorSpec(spec.family, spec.model, params, raw=spec.raw), RulesAnnotator)
    return RulesAnnotator(track or "helpful", spec=str(spec), **params)


ENGINE_PARAMS = ("engine", "base_url", "batch_size", "dtype")
# Spec parameters that configure the engine (``?engine=openai&base_url=...&timeout=30``), per engine.
# ``api`` is the openai engine's ``mode`` (``chat`` or ``completions``): ``mode`` belongs to the families.
ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "transformers": ("batch_size", "dtype"),
    "llama_cpp": ("n_ctx", "n_threads", "n_batch"),
    "openai": ("base_url", "api", "timeout", "max_retries", "backoff", "max_concurrency", "top_logprobs",
               "logprobs", "api_key_env"),
    "vllm": ("dtype", "max_model_len", "gpu_memory_utilization"),
}


def _split_engine_params(spec: AnnotatorSpec) -> tuple[str, dict, dict]:
    params = dict(spec.params)
    params.pop("cache", None)
    from align_env.engines import ENGINES
    from align_env.errors import did_you_mean
    from align_env.feedback.params import ENGINE_PARAMS as ENGINE_TYPES, typed_params

    params = typed_params(spec.family, params, ENGINE_TYPES, raw=spec.raw)
    engine = params.pop("engine", "transformers")

    if engine not in ENGINES:
        raise did_you_mean("engine", engine, ENGINES)
    own = ENGINE_OPTIONS.get(engine, ENGINE_PARAMS[1:])
    foreign = sorted(k for k in params if k not in own and any(k in opts for opts in ENGINE_OPTIONS.values()))
    if foreign:
        raise AlignEnvError(f"annotator {spec.family!r}: engine {engine!r} takes no option {foreign[0]!r}; "
                            f"its options are {list(own)}")
    options = {k: params.pop(k) for k in own if k in params}
    if "api" in options:
        options["mode"] = options.pop("api")
    if engine == "transformers":
        # Annotators are prefill-bound (long prompts, few or no generated tokens). Measured on this 2-core CPU,
        # SmolLM2-135M forward of 8 x 290 tokens: fp32 37 s, bf16 86 s; bf16 only wins at decode (batch-1 steps
        # 92 ms vs 250 ms). So fp32 by default; `dtype=bfloat16` for generation-heavy judges.
        import torch

        name = str(options.get("dtype", "float32"))
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise AlignEnvError(f"annotator {spec.family!r}: parameter 'dtype' got {name!r:.80}; accepted: a torch "
                                "dtype name such as 'bfloat16' or 'float32'")
        options["dtype"] = getattr(torch, name)
    return engine, options, params


def _engine_for(spec: AnnotatorSpec, engine_name: str, options: dict):
    from align_env.engines import make_engine

    return make_engine(engine_name, spec.model, **options)


def _rubric(track: str | None) -> str:
    from align_env.tracks import rubric

    return rubric(track or "helpful")


def _family_params(spec: AnnotatorSpec, params: dict, cls) -> dict:
    return check_params(AnnotatorSpec(spec.family, spec.model, params, raw=spec.raw), cls)


def llm_judge(spec: AnnotatorSpec, track: str | None):
    from align_env.feedback.llm_judge import LLMJudge

    engine_name, options, params = _split_engine_params(spec)
    params = _family_params(spec, params, LLMJudge)
    return LLMJudge(_engine_for(spec, engine_name, options), _rubric(track), spec=str(spec), **params)


def self_judge(spec: AnnotatorSpec, track: str | None):
    """The agent's own model as judge: same code as llm_judge, engine bound later by the agent."""
    from align_env.feedback.llm_judge import LLMJudge

    params = dict(spec.params)
    params.pop("cache", None)
    params = _family_params(spec, params, LLMJudge)
    params.setdefault("mode", "pointwise")
    return LLMJudge(None, _rubric(track), spec=str(spec), **params)


def bind_self(annotator, policy):
    """Bind an unbound ``self`` judge (or one inside a cache or pool) to ``policy``'s current model.

    ``policy`` is anything with ``judge_engine()`` (:class:`agents.policy.Policy`). Other annotators are
    returned as they are; a ``self`` judge with no policy to bind is a clear error.
    """
    from align_env.feedback.llm_judge import LLMJudge

    targets = [annotator, getattr(annotator, "inner", None)] + list(getattr(annotator, "members", None) or [])
    for target in targets:
        if isinstance(target, LLMJudge) and target.engine is None:
            if policy is None or not hasattr(policy, "judge_engine"):
                raise AlignEnvError(f"annotator {target.spec!r} judges with the agent's own model, but this agent "
                                    "has none; use another annotator family")
            target.bind(policy.judge_engine())
    return annotator


def likelihood(spec: AnnotatorSpec, track: str | None):
    from align_env.feedback.likelihood import LikelihoodScorer

    engine_name, options, params = _split_engine_params(spec)
    params = _family_params(spec, params, LikelihoodScorer)
    return LikelihoodScorer(_engine_for(spec, engine_name, options), spec=str(spec), **params)


def embedding(spec: AnnotatorSpec, track: str | None):
    from align_env.feedback.embedding import EmbeddingSimilarity

    params = {k: v for k, v in spec.params.items() if k != "cache"}
    params = _family_params(spec, params, EmbeddingSimilarity)
    return EmbeddingSimilarity(spec.model, spec=str(spec), **params)


def reward_model(spec: AnnotatorSpec, track: str | None):
    from align_env.feedback.reward_model import RewardModel

    params = {k: v for k, v in spec.params.items() if k != "cache"}
    params = _family_params(spec, params, RewardModel)
    return RewardModel(spec.model, spec=str(spec), **params)


def pool(spec: AnnotatorSpec, track: str | None):
    """``pool?members=rules|smollm2-135m:likelihood&noise=0.1&seed=0`` (members' own '?'/'&' URL-encoded)."""
    from align_env.feedback import make_annotator
    from align_env.feedback.pool import AnnotatorPool

    params = {k: v for k, v in spec.params.items() if k != "cache"}
    members = str(params.pop("members", "")).split("|")
    if not any(m.strip() for m in members):
        raise AlignEnvError("pool needs members: pool?members=rules|smollm2-135m:likelihood")
    params = _family_params(spec, params, AnnotatorPool)
    return AnnotatorPool([make_annotator(m.strip(), track=track) for m in members], spec=str(spec), **params)
