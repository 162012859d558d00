"""One training run from names: build the agent and the batched env, pick the run folder, call the loop.

This is what ``align-env run`` calls. The default folder is ``runs/<agent>-<track>-s<seed>-<hash>``, where
the hash covers everything that defines the run (agent, its overrides, track, annotator, num_envs, seed,
budgets), so running the same command again finds the same folder: a finished run is returned as it is,
an unfinished one continues with ``resume=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError, did_you_mean
from benchmarks import checkpoint as ckpt
from benchmarks.loop import CONFIG_FILE, RESULT_FILE, Budget, differences, train

DEFAULT_ROOT = Path("runs")


def resolved_config(agent: str, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The agent's full config (defaults + overrides, coerced and validated) as JSON data, without building it."""
    from agents.registry import agent_config, build_config

    cls = agent_config(agent)
    if cls is None:
        if overrides:
            raise AlignEnvError(f"agent {agent!r} has no Config dataclass; it takes no options {sorted(overrides)}")
        return None
    return json.loads(json.dumps(dataclasses.asdict(build_config(cls, overrides, agent=agent)), default=str))


def request(agent: str, track: str, annotator: str, *, overrides: dict[str, Any], num_envs: int, seed: int,
            steps: int | None, budget_prompts: int | None, budget_annotator_calls: int | None) -> dict[str, Any]:
    """What defines the run, as JSON data (stored in ``config.json`` under ``"request"``, hashed for the folder).

    The agent's config is resolved (defaults filled in, ``--set`` strings coerced), so ``--set lr=1e-5`` and
    ``overrides={"lr": 1e-5}`` name the same run.
    """
    return {"agent": agent, "agent_config": resolved_config(agent, overrides), "track": track,
            "annotator": annotator, "num_envs": num_envs, "seed": seed,
            "budget": {"steps": steps, "prompts": budget_prompts, "annotator_calls": budget_annotator_calls}}


def default_out_dir(req: dict[str, Any], root: Path = DEFAULT_ROOT) -> Path:
    digest = hashlib.sha256(json.dumps(req, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{req['agent']}-{req['track']}-s{req['seed']}")
    return Path(root) / f"{name}-{digest}"


def _env_id(track: str) -> str:
    from align_env.registration import ENV_IDS

    by_track = {t: env_id for env_id, t in ENV_IDS.items()}
    if track not in by_track:
        raise did_you_mean("track", track, by_track)
    return by_track[track]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_arguments(*, num_envs: Any, seed: Any, checkpoint_every: Any, out_dir: Any) -> None:
    """Fail fast, before anything loads, on counts that are not positive, a negative seed or a run folder
    that is a file (or lies inside one)."""
    for name, value in (("num_envs", num_envs), ("checkpoint_every", checkpoint_every)):
        if not _is_int(value) or value < 1:
            raise AlignEnvError(f"{name} must be a positive integer, got {value!r}")
    if not _is_int(seed) or seed < 0:
        raise AlignEnvError(f"seed must be a non-negative integer, got {seed!r}")
    if out_dir is None:
        return
    out = Path(out_dir)
    blocked = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise AlignEnvError(f"the run folder {out_dir} is not usable: {blocked} is a file")


def check_annotator(annotator: Any) -> None:
    """Fail fast, before any model loads, on an annotator spec whose family is unknown (did-you-mean)."""
    if not isinstance(annotator, str):
        return
    from align_env.feedback import families, parse_spec

    family = parse_spec(annotator).family
    if family not in (known := families()):
        raise did_you_mean("annotator family", family, known)


def finished_result(out_dir: Path, req: dict[str, Any]) -> dict[str, Any] | None:
    """Check ``out_dir`` before any model loads: the result of a finished run of the same request, None when
    the run is still to do, or an error when the folder holds a run of a different request."""
    cfg, res = Path(out_dir) / CONFIG_FILE, Path(out_dir) / RESULT_FILE
    if not cfg.exists():
        return None
    diff = differences(ckpt.read_json(cfg).get("request"), json.loads(json.dumps(req)))
    if diff:
        raise AlignEnvError(f"{out_dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                            "choose another output folder")
    return ckpt.read_json(res) | {"reused": True, "run_dir": str(out_dir)} if res.exists() else None


def _bind_self(annotator: Any, agent: Any, track: str) -> Any:
    """``--annotator self``: the judge is the agent's own current model (its ``policy``), bound here."""
    from align_env.feedback import make_annotator, parse_spec

    if not isinstance(annotator, str) or parse_spec(annotator).family != "self":
        return annotator
    from align_env.feedback.factories import bind_self

    return bind_self(make_annotator(annotator, track=track), getattr(agent, "policy", None))


def run_one(agent: str, track: str, annotator: str = "rules", *, steps: int | None = None,
            budget_prompts: int | None = None, budget_annotator_calls: int | None = None, num_envs: int = 8,
            seed: int = 0, out_dir: str | Path | None = None, checkpoint_every: int = 10, resume: bool = False,
            progress: bool = True, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train agent ``agent`` on ``track`` judged by ``annotator``; returns the result (with ``run_dir``)."""
    import gymnasium as gym

    from agents.registry import make_agent

    overrides = dict(overrides or {})
    check_arguments(num_envs=num_envs, seed=seed, checkpoint_every=checkpoint_every, out_dir=out_dir)
    env_id = _env_id(track)
    check_annotator(annotator)
    Budget(steps, budget_prompts, budget_annotator_calls).validate(int(num_envs))
    req = request(agent, track, annotator, overrides=overrides, num_envs=num_envs, seed=seed, steps=steps,
                  budget_prompts=budget_prompts, budget_annotator_calls=budget_annotator_calls)
    out = Path(out_dir) if out_dir is not None else default_out_dir(req)
    if (done := finished_result(out, req)) is not None:
        return done
    policy = make_agent(agent, track=track, annotator=annotator, seed=seed, **overrides)
    # an agent may ask the env for a variant of the annotator (online-dpo's length control does)
    env_annotator = getattr(policy, "annotator_spec", None) or annotator
    env_annotator = _bind_self(env_annotator, policy, track)
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                       feedback=getattr(policy, "feedback", "pairwise"), annotator=env_annotator)
    try:
        return train(policy, env, out_dir=out, steps=steps, budget_prompts=budget_prompts,
                     budget_annotator_calls=budget_annotator_calls, checkpoint_every=checkpoint_every, seed=seed,
                     resume=resume, progress=progress,
                     run_info={"agent": {"name": agent}, "request": req})
    finally:
        env.close()
