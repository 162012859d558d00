"""Agent registry: names -> lazy ``"module:Class"`` targets, third-party plug-ins, and ``make_agent``.

An agent is found, in this order, as

1. a built-in name (:data:`AGENTS`: ``initial``, ``online-dpo``, ``offline-dpo``, ``best-of-n``, ``sail``,
   ``self-rewarding``, ``rlsf-ppo``);
2. an entry point of the group ``align_env.agents`` (``name = "package.module:Class"`` in the plug-in's
   ``pyproject.toml``; a built-in name is never shadowed by a plug-in);
3. a dotted spec ``"package.module:Class"`` given directly.

An unknown name raises :class:`align_env.errors.UnknownNameError` with did-you-mean suggestions.

The construction contract, the same for every agent class ``Cls``::

    Cls.Config                       # a dataclass; each field has metadata["help"]; validation in __post_init__
    Cls(config, *, track: str, annotator: str | object | None, seed: int)

``track`` is the track name the agent trains on, ``annotator`` the annotator spec of the environment (agents
that judge by themselves, such as ``best-of-n`` or ``offline-dpo`` labelling its set up front, build their
own copy from it), ``seed`` seeds every random choice the agent makes. A plug-in class without ``Config``
is built as ``Cls(track=..., annotator=..., seed=...)`` and takes no config overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from importlib.metadata import entry_points
from typing import Any

from align_env.errors import AlignEnvError, did_you_mean

ENTRY_POINT_GROUP = "align_env.agents"

AGENTS: dict[str, str] = {
    "initial": "agents.initial:InitialPolicy",
    "online-dpo": "agents.online_dpo:OnlineDPO",
    "offline-dpo": "agents.offline_dpo:OfflineDPO",
    "best-of-n": "agents.best_of_n:BestOfN",
    "sail": "agents.sail:SAIL",
    "rlsf-ppo": "agents.rlsf:RLSFPPO",
    "self-rewarding": "agents.self_rewarding:SelfRewarding",
}


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in AGENTS}


def agent_names() -> list[str]:
    """Built-in and plug-in agent names."""
    return sorted(AGENTS) + sorted(_plugins())


def _import(target: str, name: str) -> type:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise AlignEnvError(f"agent target {target!r} must look like 'package.module:Class'")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise AlignEnvError(f"agent {name!r}: cannot import module {module!r} ({exc})") from exc
    except Exception as exc:  # a plug-in module that fails on import: say which, no traceback
        raise AlignEnvError(f"agent {name!r}: importing module {module!r} failed "
                            f"({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [a for a in dir(obj) if not a.startswith("_")]
            raise did_you_mean(f"attribute of {module}", part, public)
        obj = getattr(obj, part)
    return check_agent_class(obj, name)


AGENT_METHODS = ("act", "update", "save", "load")


def check_agent_class(obj: Any, name: str) -> type:
    """``obj`` if it is a class with the protocol's methods; otherwise an error that says what it is."""
    if not isinstance(obj, type):
        kind = "a module" if isinstance(obj, types.ModuleType) else f"a {type(obj).__name__}"
        raise AlignEnvError(f"agent {name!r} is {kind}, not an agent class (a class with {', '.join(AGENT_METHODS)})")
    missing = [m for m in AGENT_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise AlignEnvError(f"agent {name!r}: class {obj.__qualname__} is not an agent class; it has no "
                            f"{', '.join(missing)} (see agents/protocol.py)")
    return obj


def resolve_agent(name: str) -> type:
    """The agent class for a built-in name, a plug-in name or a ``"module:Class"`` spec."""
    if not isinstance(name, str) or not name.strip():
        raise AlignEnvError(f"agent name must be a non-empty string, got {name!r}")
    if name in AGENTS:
        return _import(AGENTS[name], name)
    plugins = _plugins()
    if name in plugins:
        return _import(plugins[name], name)
    if ":" in name:
        return _import(name, name)
    raise did_you_mean("agent", name, sorted(AGENTS) + sorted(plugins))


def agent_config(name: str) -> type | None:
    """The ``Config`` dataclass of an agent (None for a plug-in without one)."""
    return getattr(resolve_agent(name), "Config", None)


def configs() -> dict[str, type]:
    """``{name: Config}`` for the built-in agents (for help screens and suite validation)."""
    return {name: agent_config(name) for name in AGENTS}


def config_help(name: str) -> list[tuple[str, str, Any, str]]:
    """``(field, type, default, help)`` per config field of an agent."""
    cls = agent_config(name)
    if cls is None:
        return []
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f.name, str(f.type), default, f.metadata.get("help", "")))
    return rows


# -- config building --------------------------------------------------------------------------------------
def _coerce(value: str, annotation: Any, key: str) -> Any:
    """A string from a command line or a YAML suite -> the field's type (bool, int, float, str, None)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if isinstance(annotation, (types.UnionType, typing._UnionGenericAlias)):  # type: ignore[attr-defined]
        text = " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(annotation))
    kinds = [t.strip() for t in text.split("|")]
    low = value.strip().lower()
    if "None" in kinds and low in ("none", "null", ""):
        return None
    if "bool" in kinds:
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
    for kind, cast in (("int", int), ("float", float)):
        if kind in kinds:
            try:
                return cast(value)
            except ValueError:
                pass
    if "str" in kinds or any(k.startswith("Literal") for k in kinds):
        return value
    raise AlignEnvError(f"config field {key!r} expects {text}, got {value!r}")


def build_config(cls: type, overrides: dict[str, Any], agent: str = "agent") -> Any:
    """``cls(**overrides)`` with unknown keys reported (did-you-mean, all valid fields) and strings coerced."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise AlignEnvError(
                f"agent {agent!r} has no config field {key!r}.{hint} Valid fields: {', '.join(fields)}.")
        values[key] = _coerce(value, fields[key].type, key) if isinstance(value, str) else value
    try:
        return cls(**values)
    except TypeError as exc:
        raise AlignEnvError(f"agent {agent!r}: bad config {values}: {exc}") from exc


def make_agent(name: str, *, track: str, annotator: Any = None, seed: int = 0, **config_overrides: Any):
    """Build an agent: ``make_agent("online-dpo", track="summarize", annotator="rules", seed=0, lr=1e-5)``.

    ``name`` is a built-in name, a plug-in name (entry-point group ``align_env.agents``) or ``"module:Class"``.
    ``config_overrides`` set fields of the agent's ``Config`` (strings are coerced to the field's type, so
    command-line values work); an unknown key is an error that lists the valid fields.
    """
    cls = resolve_agent(name)
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        if config_overrides:
            raise AlignEnvError(
                f"agent {name!r} has no Config dataclass; it takes no options {sorted(config_overrides)}")
        return cls(track=track, annotator=annotator, seed=int(seed))
    if not dataclasses.is_dataclass(config_cls):
        raise AlignEnvError(f"agent {name!r}: {config_cls!r} (its Config) must be a dataclass")
    config = build_config(config_cls, config_overrides, agent=name)
    return cls(config, track=track, annotator=annotator, seed=int(seed))
