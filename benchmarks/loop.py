"""The training loop every agent uses: reset a batched env, then ``act -> step -> update`` until a budget is spent.

A run lives in one folder::

    out_dir/
      config.json        what was run: agent (name, class, config), env (id, track + hash, feedback,
                         annotator, num_envs), seed, budgets, package version. Written first.
      metrics.jsonl      one record per step (``step`` = 1, 2, ...): the agent's metrics plus the loop's
                         counters (prompts, annotator calls/tokens/seconds, abstentions, reward, wall time)
      checkpoints/step-NNNNNNNN/
        agent/           the agent's ``save()``
        state.json       loop counters, the env's sampler + RNG state and the pending prompts, and the
                         Python / NumPy / torch global RNG states
      result.json        the final summary. Written last: its presence marks the run finished.
      .lock              held (flock) while a process trains here: a second one is refused.

Budgets (any combination; the first one reached stops the run): ``steps``; ``budget_prompts`` (a step
runs only if the whole batch fits, so it is never exceeded); ``budget_annotator_calls`` (the run stops
at the end of the first step at which the count reaches the budget, so it may overshoot by less than
one step's calls; the exact count is in ``result.json``). Annotator calls are the env's judgements
(``info["feedback_cost"]``) plus those the agent made itself and reported as ``annotator_calls`` in
``update``'s metrics (best-of-n's selection, offline-dpo's up-front labelling); the latter are also
counted apart in ``annotator_calls_by_agent``. Annotator tokens and seconds are the env's only.

Starting a run in a folder (:func:`prepare_run_dir`):

* empty or new folder: a fresh run;
* a finished run of the same config: nothing is recomputed or overwritten; its ``result.json`` is
  returned (with ``"reused": true``), so re-running a sweep is cheap and safe;
* an unfinished run of the same config: refused unless ``resume=True``; then it continues from its last
  checkpoint (or from the start when it died before the first one), the metrics log is cut back to that
  checkpoint's step and continues: no step is logged twice or lost. With the same seed, the resumed run
  sees the same prompts in the same order and draws the same random numbers as an uninterrupted one.
  Checkpoints are verified against their checksums first: a corrupt one is set aside and the run resumes
  from the previous intact one, saying so; a missing or inconsistent metrics log is an error;
* a run of a different config, or a non-empty folder that holds no run: refused.

"Same config" compares everything in ``config.json`` except ``checkpoint_every``, ``keep_checkpoints``,
``version`` and ``created``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.protocol import Transitions
from align_env import memory
from align_env.errors import AlignEnvError
from benchmarks import checkpoint as ckpt
from benchmarks import run_log

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"
STATE_FORMAT = 1
NOT_IDENTITY = ("checkpoint_every", "keep_checkpoints", "version", "created", "machine")


# -- budgets and counters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """When a run stops: after ``steps`` steps, ``prompts`` prompts or ``annotator_calls`` annotator calls."""

    steps: int | None = None
    prompts: int | None = None
    annotator_calls: int | None = None

    def validate(self, num_envs: int) -> None:
        given = {k: v for k, v in asdict(self).items() if v is not None}
        if not given:
            raise AlignEnvError("give a budget: steps, budget_prompts or budget_annotator_calls")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AlignEnvError(f"budget {name} must be a positive integer, got {value!r}")
        if self.prompts is not None and self.prompts < num_envs:
            raise AlignEnvError(f"budget_prompts={self.prompts} is smaller than one batch (num_envs={num_envs})")

    def stop_reason(self, counters: Counters, num_envs: int) -> str | None:
        if self.steps is not None and counters.step >= self.steps:
            return "steps"
        if self.prompts is not None and counters.prompts_seen + num_envs > self.prompts:
            return "prompts"
        if self.annotator_calls is not None and counters.annotator_calls >= self.annotator_calls:
            return "annotator_calls"
        return None

    def max_steps(self, num_envs: int) -> int | None:
        bounds = [b for b in (self.steps, None if self.prompts is None else self.prompts // num_envs) if b]
        return min(bounds) if bounds else None


@dataclass
class Counters:
    """Cumulative counts of a run (restored from checkpoints)."""

    step: int = 0
    prompts_seen: int = 0
    annotator_calls: int = 0  # all judgements: the env's and those the agent asked for itself
    annotator_calls_by_agent: int = 0  # the agent's own (best-of-n's selection, offline-dpo's labelling)
    annotator_tokens_in: int = 0
    annotator_tokens_out: int = 0
    annotator_seconds: float = 0.0
    abstentions: int = 0
    elapsed_seconds: float = 0.0
    generated_tokens: int = 0  # tokens the agent sampled (its ``generated_tokens`` metric)
    trained_tokens: int = 0  # tokens run through the policy with gradient (its ``trained_tokens`` metric)
    peak_rss_mb: float = 0.0  # the largest resident memory of the training processes (a resumed run: the max of all)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss`` is in KB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


# -- global RNG state --------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch RNG states as JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- config and run folder ---------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def describe_run(agent: Any, env: Any, *, seed: int, budget: Budget, checkpoint_every: int,
                 keep_checkpoints: int, run_info: dict | None = None) -> dict[str, Any]:
    """The content of ``config.json`` (JSON data); ``run_info`` adds e.g. the agent's registry name."""
    import align_env

    venv = env.unwrapped
    cfg = getattr(agent, "config", None)
    agent_part = {"class": f"{type(agent).__module__}:{type(agent).__qualname__}",
                  "config": asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg}
    spec = getattr(venv, "spec", None)
    annotator = getattr(venv.annotator, "spec", None) or f"{type(venv.annotator).__module__}:" \
                                                          f"{type(venv.annotator).__qualname__}"
    summary = venv.track.summary()
    env_part = {"id": spec.id if spec is not None else None, "track": summary["id"], "track_hash": summary["hash"],
                "source": summary["source"], "split": venv.split, "feedback": venv.feedback,
                "annotator": annotator, "num_envs": venv.num_envs}
    config = {"agent": agent_part | dict((run_info or {}).get("agent", {})), "env": env_part, "seed": seed,
              "budget": asdict(budget), "checkpoint_every": checkpoint_every, "keep_checkpoints": keep_checkpoints,
              "version": align_env.__version__}
    config |= {k: v for k, v in (run_info or {}).items() if k != "agent"}
    config["machine"] = machine_paths(agent)
    return _jsonable(config)


def machine_paths(agent: Any) -> dict[str, Any]:
    """The paths this machine took where the best one differs by machine (decoding, packed weights, allocator):
    recorded in ``config.json``, not part of a run's identity (a run may resume on another machine)."""
    policy = getattr(agent, "policy", None)
    paths = dict(policy.paths) if isinstance(getattr(policy, "paths", None), dict) else {}
    return {"allocator": memory.allocator(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()} | paths


def identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON values (``path: old -> new``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def refuse_foreign(out_dir: Path) -> None:
    """A folder that holds files but no run is someone else's: never write into it."""
    if out_dir.is_dir() and not (out_dir / CONFIG_FILE).exists() and any(
            not (p.name.startswith(".tmp-") or p.name == LOCK_FILE) for p in out_dir.iterdir()):
        raise AlignEnvError(f"{out_dir} is not empty and holds no align-env run (no {CONFIG_FILE}); "
                            "choose a new or empty output folder")


@contextmanager
def exclusive(out_dir: Path):
    """Hold ``out_dir/.lock`` (an flock, freed by the OS even on SIGKILL): two processes never train in one folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlignEnvError(f"another process is training in {out_dir} right now") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_run_dir(out_dir: Path, config: dict[str, Any], resume: bool) -> str:
    """Decide what to do with ``out_dir`` (see the module docstring): "fresh", "resume" or "finished"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / CONFIG_FILE
    if cfg_path.exists():
        diff = differences(identity(ckpt.read_json(cfg_path)), identity(config))
        if diff:
            raise AlignEnvError(f"{out_dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                                "choose another output folder")
        if (out_dir / RESULT_FILE).exists():
            return "finished"
        if not resume:
            last = ckpt.latest_checkpoint(out_dir)
            where = f"its last checkpoint is step {last[0]}" if last else "it has no checkpoint yet"
            raise AlignEnvError(f"{out_dir} holds an unfinished run of this config ({where}); pass resume=True "
                                "(align-env run --resume) to continue it, or choose another output folder")
        return "resume"
    refuse_foreign(out_dir)
    ckpt.write_json_atomic(cfg_path, config | {"created": datetime.now(timezone.utc).isoformat()})
    return "fresh"


# -- the loop ----------------------------------------------------------------------------------------
def _record(counters: Counters, rewards: np.ndarray, abstained: np.ndarray, wall: float,
            metrics: dict[str, float]) -> dict[str, Any]:
    loop = asdict(counters) | {"abstentions_step": int(abstained.sum()), "reward_mean": float(np.mean(rewards)),
                               "wall_seconds": wall}
    agent = {(f"agent_{k}" if k in loop else k): v for k, v in metrics.items()}
    return loop | agent


def _summary(out_dir: Path, counters: Counters, reason: str, final: Path) -> dict[str, Any]:
    records = run_log.read(out_dir / run_log.METRICS_FILE)
    tail = records[-10:]
    counters_keys = set(asdict(counters))
    numeric = sorted({k for r in tail for k, v in r.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in counters_keys})
    means = {k: float(np.mean([r[k] for r in tail if isinstance(r.get(k), (int, float))])) for k in numeric}
    steps_per_second = counters.step / counters.elapsed_seconds if counters.elapsed_seconds > 0 else None
    return asdict(counters) | {"status": "finished", "stop_reason": reason, "steps_per_second": steps_per_second,
                               "final_checkpoint": str(final.relative_to(out_dir)),
                               "final_metrics": records[-1] if records else None, "mean_last_10_steps": means}


def _start(venv: Any, seed: int) -> tuple[dict, Counters]:
    seed_everything(seed)
    obs, _ = venv.reset(seed=seed)
    return obs, Counters()


def _restore(agent: Any, venv: Any, folder: Path, config: dict[str, Any], seed: int) -> tuple[dict, Counters]:
    """Load a checkpoint into the agent, the env and the global RNGs; returns the pending batch and the counters."""
    state = ckpt.read_checkpoint_state(folder)
    if state.get("format") != STATE_FORMAT or state.get("agent_class") != config["agent"]["class"]:
        raise AlignEnvError(f"checkpoint {folder} was written by {state.get('agent_class')!r} (format "
                            f"{state.get('format')}), not by {config['agent']['class']!r}")
    agent.load(folder / ckpt.AGENT_DIR)
    venv.reset(seed=seed)  # initialises the env; set_state then replaces its RNG, prompt order and pending batch
    venv.set_state(state["env"])
    restore_rng(state["rng"])
    return venv.current_observation()[0], Counters(**state["counters"])


def _count(counters: Counters, cost: Any, metrics: dict[str, float], abstained: np.ndarray, num_envs: int,
           wall: float) -> None:
    """Add one step to the counters; the agent's own ``annotator_calls`` metric is taken out of ``metrics``."""
    by_agent = metrics.pop("annotator_calls", 0) or 0
    by_agent = int(by_agent) if math.isfinite(by_agent) else 0
    counters.step += 1
    counters.prompts_seen += num_envs
    counters.annotator_calls += int(cost.calls) + by_agent
    counters.annotator_calls_by_agent += by_agent
    counters.annotator_tokens_in += int(cost.tokens_in)
    counters.annotator_tokens_out += int(cost.tokens_out)
    counters.annotator_seconds += float(cost.seconds)
    counters.abstentions += int(abstained.sum())
    counters.elapsed_seconds += wall
    for key in ("generated_tokens", "trained_tokens"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            setattr(counters, key, getattr(counters, key) + int(value))
    counters.peak_rss_mb = max(counters.peak_rss_mb, peak_rss_mb())


def _progress(total: int | None, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    keys = ("loss", "reward_margin", "reward_mean", "annotator_calls", "abstentions")
    return {k: f"{record[k]:.3g}" if isinstance(record[k], float) else str(record[k])
            for k in keys if record.get(k) is not None}


def train(agent: Any, env: Any, *, out_dir: str | Path, steps: int | None = None, budget_prompts: int | None = None,
          budget_annotator_calls: int | None = None, checkpoint_every: int = 10, keep_checkpoints: int = 2,
          seed: int = 0, resume: bool = False, progress: bool = True, run_info: dict | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``agent`` on the batched ``env`` until a budget is spent; returns the run's ``result.json`` data.

    ``on_step(record)`` is called after each step is logged (and checkpointed, when due). See the module
    docstring for the folder layout, budgets and resume semantics.
    """
    venv = env.unwrapped
    budget = Budget(steps, budget_prompts, budget_annotator_calls)
    budget.validate(venv.num_envs)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise AlignEnvError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if getattr(agent, "feedback", venv.feedback) != venv.feedback:
        raise AlignEnvError(f"the agent acts for {agent.feedback!r} feedback but the env gives {venv.feedback!r}")
    out_dir = Path(out_dir)
    refuse_foreign(out_dir)
    with exclusive(out_dir):
        return _train(agent, env, venv, out_dir, budget, checkpoint_every, keep_checkpoints, seed, resume, progress,
                      run_info, on_step)


def _train(agent, env, venv, out_dir, budget, checkpoint_every, keep_checkpoints, seed, resume, progress, run_info,
           on_step) -> dict[str, Any]:
    config = describe_run(agent, env, seed=seed, budget=budget, checkpoint_every=checkpoint_every,
                          keep_checkpoints=keep_checkpoints, run_info=run_info)
    mode = prepare_run_dir(out_dir, config, resume)
    if mode == "finished":
        return ckpt.read_json(out_dir / RESULT_FILE) | {"reused": True, "run_dir": str(out_dir)}

    ckpt.clean_partial(out_dir)
    metrics_path = out_dir / run_log.METRICS_FILE
    last = ckpt.latest_intact_checkpoint(out_dir) if mode == "resume" else None
    obs, counters = _restore(agent, venv, last[1], config, seed) if last else _start(venv, seed)
    if mode == "resume":
        run_log.truncate(metrics_path, counters.step, asdict(counters))

    def save_checkpoint() -> Path:
        state = {"format": STATE_FORMAT, "agent_class": config["agent"]["class"], "step": counters.step,
                 "counters": asdict(counters), "env": venv.get_state(), "rng": capture_rng()}
        return ckpt.write_checkpoint(out_dir, counters.step, state, agent.save, keep=keep_checkpoints)

    bar = _progress(budget.max_steps(venv.num_envs), counters.step, progress)
    try:
        with run_log.MetricsLog(metrics_path) as log:
            while (reason := budget.stop_reason(counters, venv.num_envs)) is None:
                start = time.perf_counter()
                actions = agent.act(obs)
                memory.trim()  # each phase's freed buffers go back before the next (align_env.memory)
                next_obs, rewards, _terminated, _truncated, info = env.step(actions)
                memory.trim()
                metrics = dict(agent.update(Transitions.from_vector_step(actions, rewards, info)) or {})
                memory.trim()
                metrics["rss_mb"] = memory.resident_mb()  # after the step: growth here is a leak, not a peak
                wall = time.perf_counter() - start
                abstained = np.asarray(info["abstained"], dtype=bool)
                _count(counters, info["feedback_cost"], metrics, abstained, venv.num_envs, wall)
                record = _record(counters, rewards, abstained, wall, metrics)
                log.append(record)
                obs = next_obs
                if counters.step % checkpoint_every == 0:
                    start = time.perf_counter()
                    save_checkpoint()
                    counters.elapsed_seconds += time.perf_counter() - start
                bar.set_postfix(_postfix(record), refresh=False)
                bar.update(1)
                if on_step is not None:
                    on_step(record)
    finally:
        bar.close()
    last = ckpt.latest_checkpoint(out_dir)
    final = last[1] if last is not None and last[0] == counters.step else save_checkpoint()
    result = _summary(out_dir, counters, reason, final)
    ckpt.write_json_atomic(out_dir / RESULT_FILE, result)
    return result | {"reused": False, "run_dir": str(out_dir)}
