"""Typed declarations of the annotator families' spec parameters, and the check that applies them.

Each family declares ``name -> Param(type, range or choices)``; :func:`typed_params` turns the parsed spec
values into those types or raises an :class:`AlignEnvError` naming the family, the parameter, the value and
what is accepted. A family with no declaration (third-party) is checked against its factory's signature only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from align_env.errors import AlignEnvError

MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class Param:
    kind: type  # bool, int, float or str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    lo_open: bool = False  # lo itself excluded (e.g. temperature > 0)
    hi_open: bool = False

    def accepted(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        lo = "" if self.lo is None else f"{self.lo} {'<' if self.lo_open else '<='} "
        hi = "" if self.hi is None else f" {'<' if self.hi_open else '<='} {self.hi}"
        return f"{'an integer' if self.kind is int else 'a finite number'}{' with ' if lo or hi else ''}{lo}" \
               f"{'x' if lo or hi else ''}{hi}"

    def convert(self, value: Any) -> Any:
        """The value as this type, or ValueError."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if value in (0, 1) and not isinstance(value, float):
                return bool(value)
            raise ValueError
        if self.kind is str:
            out = ("true" if value else "false") if isinstance(value, bool) else value if isinstance(value, str) else (
                repr(value) if isinstance(value, float) else str(value))
            if self.choices and out not in self.choices:
                raise ValueError
            return out
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        else:
            value = float(value)
        if self.lo is not None and (value < self.lo or self.lo_open and value == self.lo):
            raise ValueError
        if self.hi is not None and (value > self.hi or self.hi_open and value == self.hi):
            raise ValueError
        return value


def _pos_int(hi: int = MAX_INT) -> Param:
    return Param(int, 1, hi)


TEMPERATURE = Param(float, 0.0, 1e6, lo_open=True)
SEED = Param(int, 0, 2**63 - 1)
CACHE = Param(str)  # memory | disk | off | a path; booleans map to memory/off

FAMILY_PARAMS: dict[str, dict[str, Param]] = {
    "rules": {"temperature": TEMPERATURE, "length_penalty": Param(float, 0.0, 100.0),
              "prefer": Param(str, choices=("short",)),
              "oracle": Param(bool)},
    "llm_judge": {"mode": Param(str, choices=("pairwise", "pointwise")), "suffix": Param(str),
                  "prompt_version": Param(str), "both_orders": Param(bool), "samples": _pos_int(1024),
                  "temperature": Param(float, 0.0, 100.0), "max_new_tokens": _pos_int(1_000_000),
                  "pointwise": Param(str, choices=("generate", "expected")), "seed": SEED,
                  "calibrate": Param(str, choices=("none", "content_free"))},
    "likelihood": {"mode": Param(str, choices=("pmi", "mean_logprob", "reconstruction")), "temperature": TEMPERATURE},
    "embedding": {"temperature": TEMPERATURE, "batch_size": _pos_int(4096), "max_length": _pos_int(1_000_000)},
    "reward_model": {"batch_size": _pos_int(4096), "max_length": _pos_int(1_000_000), "trust_remote_code": Param(bool)},
    "pool": {"noise": Param(float, 0.0, 0.5, hi_open=True), "seed": SEED,
             "combine": Param(str, choices=("route", "mean"))},
}
FAMILY_PARAMS["self"] = FAMILY_PARAMS["llm_judge"]

# Engine options that may appear in any model-backed family's spec (``?engine=openai&timeout=30``).
ENGINE_PARAMS: dict[str, Param] = {
    "engine": Param(str), "batch_size": _pos_int(4096), "dtype": Param(str), "base_url": Param(str),
    "api": Param(str, choices=("chat", "completions")), "timeout": Param(float, 0.0, 86400.0, lo_open=True),
    "max_retries": Param(int, 0, 100), "backoff": Param(float, 0.0, 3600.0), "max_concurrency": _pos_int(1024),
    "top_logprobs": _pos_int(100), "logprobs": Param(bool), "api_key_env": Param(str),
    "n_ctx": _pos_int(10_000_000), "n_threads": _pos_int(1024), "n_batch": _pos_int(10_000_000),
    "max_model_len": _pos_int(10_000_000), "gpu_memory_utilization": Param(float, 0.0, 1.0, lo_open=True),
}


def typed_value(family: str, key: str, value: Any, param: Param) -> Any:
    try:
        return param.convert(value)
    except (ValueError, TypeError, OverflowError):
        raise AlignEnvError(f"annotator {family!r}: parameter {key!r} got {value!r:.80}; accepted: "
                            f"{param.accepted()}") from None


def typed_params(family: str, params: dict[str, Any], declared: dict[str, Param] | None = None,
                 raw: dict[str, str] | None = None) -> dict[str, Any]:
    """``params`` converted to the family's declared types (undeclared keys are left to the caller's check).

    String parameters take the value as written (``raw``), so ``suffix=007`` stays ``"007"``, not ``7``."""
    declared = FAMILY_PARAMS.get(family, {}) if declared is None else declared
    raw = raw or {}
    out = {}
    for k, v in params.items():
        if k in declared:
            v = raw[k] if declared[k].kind is str and isinstance(raw.get(k), str) else v
            v = typed_value(family, k, v, declared[k])
        out[k] = v
    return out


def describe(family: str) -> dict[str, str]:
    """What each of the family's parameters accepts, for help texts and errors."""
    return {k: p.accepted() for k, p in FAMILY_PARAMS.get(family, {}).items()}
