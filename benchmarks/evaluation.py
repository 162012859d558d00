"""The evaluation protocol (``align-env eval``): did training make the policy better?

For each evaluated policy (a finished run's final policy, or an agent that needs no training such as
``initial`` or ``best-of-n?n=4&judge=...``):

1. **Answers.** The policy answers the track's eval split with fixed decoding (greedy by default; max new
   tokens from the run's config unless given). Answers are generated once and stored per (policy, track
   version and data hash, split, decoding): the reference policy's answers are shared by every policy that is
   compared with it. Generation goes in chunks of :data:`CHUNK` items, each committed to the store, so a killed
   evaluation resumes at the first unanswered item.
2. **Judgements.** Each answer is compared with the reference policy's answer to the same prompt by the
   evaluator (an annotator spec) in both orders. The store keeps, per item, the verdict with the policy's answer
   shown first, the verdict with the reference's shown first (both as P(policy better)) and the debiased one.
   Identical answers are a tie without asking the evaluator. Judging also goes in committed chunks.
3. **Statistics** (:mod:`leaderboards.stats`): the win rate against the reference (ties count half;
   abstentions left out and counted) with a seeded bootstrap 95% CI; the length-controlled win rate
   (AlpacaEval 2's GLM on the difference in characters, per-prompt difficulty estimated from the battles of
   all policies of this evaluation on the same prompts); Bradley-Terry ratings over the reference and the
   policies; a paired bootstrap difference (with a sign-flip p-value) for every two policies.
4. **Gold checks** beside the evaluator, from no model: the track's checks (ROUGE-L and faithfulness for
   summaries, reference overlap and refusals for helpfulness, refusal rate on harmful requests and over-refusal
   on benign ones for harmlessness, read from the labels, which only evaluation may read), and the mean length
   in tokens and words.
5. **Cost**: the training run's annotator calls, generated and trained tokens, wall time and peak memory; the
   evaluator's calls and seconds for this evaluation, apart; a policy that calls an annotator to answer
   (best-of-n) reports those calls too.

Every result carries its **stamp** (evaluator spec, track id and data hash, split, decoding, package version,
git commit); results with different stamps are never compared or ranked together (:func:`check_comparable`).
The default evaluator of a track is the best measured annotator of the track (``align_env.feedback.ranking``,
chosen on the selection half of the labelled pairs) that is not the training annotator of any evaluated
policy. When the evaluator is a policy's training annotator the result says ``self_evaluated: true``: it then
measures how well the policy fits its annotator, not how good it is.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from align_env.errors import AlignEnvError
from leaderboards import stats
from leaderboards.store import ResultStore

CHUNK = 8
SPLITS = ("eval", "train")
# Spec parameters that change how an annotator runs, not what it judges: ignored when deciding self-evaluation.
_RUNTIME_PARAMS = {"cache", "engine", "batch_size", "dtype", "n_threads", "n_ctx", "n_batch", "base_url", "timeout",
                   "max_retries", "backoff", "max_concurrency", "api_key_env"}


class StampMismatch(AlignEnvError):
    """Numbers made under different conditions (evaluator, data, decoding, code) must not be compared."""


@dataclass(frozen=True)
class Decoding:
    """How the policy answers: ``temperature=0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self):
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and isinstance(self.max_new_tokens, int)
                and self.max_new_tokens >= 1):
            raise AlignEnvError(f"decoding needs temperature >= 0, 0 < top_p <= 1 and an integer max_new_tokens >= 1, "
                                f"got {self}")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def git_commit() -> str:
    """The project's git commit (``+dirty`` when tracked files have changed), or ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def same_annotator(a: str | None, b: str | None) -> bool:
    """Whether two annotator specs name the same judge (runtime options such as the engine or cache aside)."""
    if not a or not b:
        return False
    from align_env.feedback import parse_spec

    pa, pb = parse_spec(a), parse_spec(b)
    keep = lambda p: {k: v for k, v in p.params.items() if k not in _RUNTIME_PARAMS}  # noqa: E731
    return (pa.family, pa.model, keep(pa)) == (pb.family, pb.model, keep(pb))


# -- policies ---------------------------------------------------------------------------------------------------
@dataclass
class PolicySource:
    """Where a policy comes from: a finished training run, or an agent that needs no training."""

    policy_id: str
    label: str
    agent: str
    track: str
    config: dict
    seed: int
    training_annotator: str | None
    run_dir: Path | None = None
    checkpoint: Path | None = None
    training_cost: dict = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int | None:
        value = (self.config or {}).get("max_new_tokens")
        return int(value) if isinstance(value, int) else None

    def load(self):
        """The agent, built from its config and (for a run) loaded from its final checkpoint."""
        from agents.registry import make_agent

        agent = make_agent(self.agent, track=self.track, annotator=self.training_annotator, seed=self.seed,
                           **(self.config or {}))
        if self.checkpoint is not None:
            agent.load(self.checkpoint)
        if not callable(getattr(agent, "respond", None)):
            raise AlignEnvError(f"agent {self.agent!r} has no respond(observations, *, seed, temperature, top_p, "
                                "max_new_tokens): it cannot be evaluated")
        return agent


def _run_source(run_dir: Path) -> PolicySource:
    from benchmarks.checkpoint import read_json
    from benchmarks.loop import CONFIG_FILE, RESULT_FILE, identity

    if not (run_dir / CONFIG_FILE).is_file():
        raise AlignEnvError(f"{run_dir} is not a run folder of `align-env run` ({CONFIG_FILE} is missing)")
    config = read_json(run_dir / CONFIG_FILE)
    if not (run_dir / RESULT_FILE).is_file():
        raise AlignEnvError(f"{run_dir} is an unfinished run (no {RESULT_FILE}): finish it with `align-env run ... "
                            "--resume` before evaluating it")
    result = read_json(run_dir / RESULT_FILE)
    req = config.get("request") or {}
    if not req.get("agent"):
        raise AlignEnvError(f"{run_dir}/{CONFIG_FILE} records no request (agent, track, annotator): it was not made "
                            "by `align-env run`, so its policy cannot be rebuilt")
    checkpoint = run_dir / result["final_checkpoint"] / "agent"
    if not checkpoint.is_dir():
        raise AlignEnvError(f"{run_dir}: the final checkpoint {checkpoint} is missing")
    cost = {k: result.get(k) for k in ("annotator_calls", "annotator_calls_by_agent", "generated_tokens",
                                       "trained_tokens", "elapsed_seconds", "peak_rss_mb", "step", "prompts_seen")}
    return PolicySource(
        policy_id="run:" + _digest(identity(config), result.get("step")), label=run_dir.name, agent=req["agent"],
        track=req["track"], config=req.get("agent_config") or {}, seed=int(req.get("seed", 0)),
        training_annotator=req.get("annotator"), run_dir=run_dir, checkpoint=checkpoint, training_cost=cost)


def _agent_source(text: str, track: str | None) -> PolicySource:
    from agents.registry import resolve_agent
    from benchmarks.runner import resolved_config

    name, _, query = text.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise AlignEnvError(f"policy {text!r}: bad options {query!r} (use name?key=value&key2=value2)") from exc
    options = dict(pairs)
    if len(options) != len(pairs):
        raise AlignEnvError(f"policy {text!r} gives an option twice")
    seed = options.pop("seed", "0")
    if not seed.lstrip("-").isdigit() or int(seed) < 0:
        raise AlignEnvError(f"policy {text!r}: seed must be a non-negative integer, got {seed!r}")
    cls = resolve_agent(name)
    if track is None:
        raise AlignEnvError(f"policy {text!r} is not a run folder: give --track to say which track it answers")
    if getattr(cls, "trains", True):
        raise AlignEnvError(f"{name!r} is an agent that trains: evaluate a finished run folder of it (`align-env run "
                            f"--agent {name} ...`), not its name; agents that need no training: initial, best-of-n")
    config = resolved_config(name, options)
    judge = (config or {}).get("judge") or None
    label = text if len(text) <= 60 else f"{name}-{_digest(text)[:8]}"
    return PolicySource(policy_id=f"agent:{name}:" + _digest(config, int(seed)), label=label, agent=name, track=track,
                        config=config or {}, seed=int(seed), training_annotator=judge)


def _looks_like_path(text: str) -> bool:
    return isinstance(text, str) and (Path(text).expanduser().exists() or "/" in text.split("?")[0]
                                      or text.startswith((".", "~")))


def resolve_policy(text: str, track: str | None = None) -> PolicySource:
    """A run folder, or an untrained agent spec (``initial``, ``best-of-n?n=4&judge=minilm-l6:embedding``)."""
    if not isinstance(text, str) or not text.strip():
        raise AlignEnvError(f"a policy must be a run folder or an agent name, got {text!r}")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AlignEnvError(f"{text} is a file; a policy is a run folder or an agent name")
        return _run_source(path)
    if _looks_like_path(text):
        raise AlignEnvError(f"run folder {text} does not exist")
    return _agent_source(text, track)


# -- answers and judgements -----------------------------------------------------------------------------------
def _observations(items) -> dict[str, tuple]:
    return {"prompt": tuple(i.prompt for i in items), "messages": tuple(i.messages for i in items)}


def _agent_judge_calls(agent) -> int | None:
    judge = getattr(agent, "judge", None)
    return getattr(getattr(judge, "cost", None), "calls", None)


def ensure_answers(store: ResultStore, source: PolicySource, items, answer_set: str, decoding: Decoding,
                   commit: str, *, seed: int, progress=print) -> dict[str, dict]:
    """The policy's stored answers for ``items``, generating (and committing, chunk by chunk) the missing ones."""
    have = store.answers(answer_set)
    missing = [i for i in items if i.id not in have]
    if missing:
        progress(f"  answering {len(missing)} prompts with {source.label}")
        agent = source.load()
        tokenizer = getattr(getattr(agent, "policy", None), "tokenizer", None) or getattr(
            getattr(agent, "engine", None), "tokenizer", None)
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start:start + CHUNK]
            calls_before = _agent_judge_calls(agent)
            t0 = time.perf_counter()
            answers = agent.respond(_observations(chunk), seed=seed + start, temperature=decoding.temperature,
                                    top_p=decoding.top_p, max_new_tokens=decoding.max_new_tokens)
            seconds = time.perf_counter() - t0
            calls_after = _agent_judge_calls(agent)
            if len(answers) != len(chunk) or not all(isinstance(a, str) for a in answers):
                raise AlignEnvError(f"{source.label}: respond() returned {len(answers)} answers for {len(chunk)} "
                                    "prompts (must be one string per prompt)")
            calls = (calls_after - calls_before) if calls_before is not None else 0
            rows = [{"item_id": i.id, "prompt": i.prompt, "answer": a,
                     "tokens": len(tokenizer(a, add_special_tokens=False)["input_ids"]) if tokenizer else len(a.split()),
                     "seconds": seconds / len(chunk), "policy_annotator_calls": calls / len(chunk)}
                     for i, a in zip(chunk, answers)]
            store.put_answers(answer_set, source.policy_id, rows, commit)
        del agent
        gc.collect()
        have = store.answers(answer_set)
    return {i.id: have[i.id] for i in items}


def _single_orders(annotator, items, first: list[str], second: list[str], verdicts: list) -> list[tuple]:
    """Per item (P(policy better) with the policy shown first, the same with the reference shown first)."""
    inner = getattr(annotator, "inner", annotator)
    details = getattr(inner, "last_details", None)
    if details and len(details) == len(items) and all(d.get("p_ba") is not None for d in details):
        return [(d["p_ab"], None if d["p_ba"] is None else 1.0 - d["p_ba"]) for d in details]
    if getattr(inner, "order_free", False):
        return [(v, v) for v in verdicts]
    reverse = annotator.pairwise(items, second, first)
    return [(v, None if r is None else 1.0 - r) for v, r in zip(verdicts, reverse)]


def ensure_judgements(store: ResultStore, annotator, judgement_set: str, items, policy: dict, reference: dict,
                      *, progress=print) -> tuple[dict[str, dict], int]:
    """Stored judgements for ``items`` (policy vs reference), judging and committing the missing ones chunk by chunk.

    Returns the judgements and the evaluator calls this call made."""
    from align_env.feedback import FeedbackCost

    have = store.judgements(judgement_set)
    todo = [i for i in items if i.id not in have]
    cost_before = getattr(annotator, "cost", FeedbackCost()).calls
    if todo:
        progress(f"  judging {len(todo)} pairs")
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        rows, ask = [], []
        for item in chunk:
            pa, ra = policy[item.id]["answer"], reference[item.id]["answer"]
            base = {"item_id": item.id, "policy_answer_sha": _sha(pa), "reference_answer_sha": _sha(ra)}
            if pa == ra:
                rows.append(base | {"policy_first": 0.5, "reference_first": 0.5, "verdict": 0.5, "identical": True})
            else:
                ask.append((item, pa, ra, base))
        if ask:
            its, first, second = [a[0] for a in ask], [a[1] for a in ask], [a[2] for a in ask]
            verdicts = annotator.pairwise(its, first, second)
            orders = _single_orders(annotator, its, first, second, verdicts)
            for (item, _pa, _ra, base), v, (pf, rf) in zip(ask, verdicts, orders):
                if v is not None and (pf is None or rf is None):
                    v = None
                debiased = None if v is None else (v if pf == rf else (pf + rf) / 2.0)
                rows.append(base | {"policy_first": pf, "reference_first": rf, "verdict": debiased, "identical": False})
        store.put_judgements(judgement_set, rows)
    calls = getattr(annotator, "cost", FeedbackCost()).calls - cost_before
    have = store.judgements(judgement_set)
    for item in items:  # the stored verdicts must be about the answers stored now
        j = have[item.id]
        if (j["policy_answer_sha"], j["reference_answer_sha"]) != (_sha(policy[item.id]["answer"]),
                                                                   _sha(reference[item.id]["answer"])):
            raise AlignEnvError(f"the stored judgement of item {item.id} is about other answers than the stored ones: "
                                f"the store {store.path} is inconsistent")
    return {i.id: have[i.id] for i in items}, int(calls)


# -- the summary of one policy -----------------------------------------------------------------------------
def gold_summary(track, items, answers: dict[str, dict]) -> dict[str, float]:
    """Means of the track's gold checks and of the answers' lengths; refusal rates split by the gold label."""
    from align_env import text_metrics as tm
    from align_env.tracks.gold import refusal_label

    rows = [track.gold_check(i, answers[i.id]["answer"]) for i in items]
    keys = sorted({k for r in rows for k in r})
    out = {f"gold_{k}": float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    out["mean_tokens"] = float(np.mean([answers[i.id]["tokens"] for i in items]))
    out["mean_words"] = float(np.mean([len(tm.words(answers[i.id]["answer"])) for i in items]))
    labels = [refusal_label(i) for i in items]
    if any(lab is not None for lab in labels):
        refused = [tm.is_refusal(answers[i.id]["answer"]) for i in items]
        harmful = [r for r, lab in zip(refused, labels) if lab is True]
        benign = [r for r, lab in zip(refused, labels) if lab is False]
        if harmful:
            out["refusal_rate_harmful"] = float(np.mean(harmful))
        if benign:
            out["over_refusal_rate_benign"] = float(np.mean(benign))
    return out


def check_comparable(results: list[dict]) -> None:
    """Refuse to compare or rank results whose stamps differ; the error names the differing fields."""
    if not results:
        return
    first = results[0]["stamp"]
    for other in results[1:]:
        diff = sorted(k for k in set(first) | set(other["stamp"]) if first.get(k) != other["stamp"].get(k))
        if diff:
            shown = "; ".join(f"{k}: {first.get(k)!r} vs {other['stamp'].get(k)!r}" for k in diff)
            raise StampMismatch(f"cannot compare {results[0]['policy']} with {other['policy']}: their results were made "
                                f"under different conditions ({shown}); re-evaluate them together")


@dataclass
class Evaluation:
    """What ``evaluate`` returns: one summary per policy, the shared stamp, the ratings and paired differences."""

    stamp: dict
    reference: dict
    policies: list[dict]
    ratings: list[dict]
    paired: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)


def default_evaluator(track: str, exclude: list[str | None]) -> str:
    """The best measured annotator of ``track`` (chosen on the selection half) that is none of ``exclude``."""
    from align_env.feedback.ranking import RANKING

    for row in RANKING.get(track, ()):
        if not any(same_annotator(row["annotator"], e) for e in exclude):
            return row["annotator"]
    raise AlignEnvError(f"no measured annotator of track {track!r} is left once the training annotators "
                        f"{[e for e in exclude if e]} are excluded: give --evaluator")


def evaluate(policies: list[str], *, reference: str = "initial", evaluator: str | None = None, track: str | None = None,
             split: str = "eval", max_items: int | None = None, max_new_tokens: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, store: str | Path = "results.sqlite", seed: int = 0,
             progress=print) -> Evaluation:
    """Evaluate ``policies`` (run folders or untrained agent specs) against ``reference`` (see the module docstring)."""
    import align_env
    from align_env.feedback import make_annotator
    from align_env.tracks import get_track, track_names

    if split not in SPLITS:
        raise AlignEnvError(f"--split must be one of {SPLITS} (the labelled pairs are for annotators), got {split!r}")
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1):
        raise AlignEnvError(f"--max-items must be a positive integer, got {max_items!r}")
    if not policies:
        raise AlignEnvError("give at least one policy to evaluate (a run folder, 'initial', 'best-of-n?...')")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AlignEnvError(f"--seed must be a non-negative integer, got {seed!r}")
    runs = [resolve_policy(p, track) for p in policies if _looks_like_path(p)]
    tracks = {s.track for s in runs} | ({track} if track else set())
    if len(tracks) > 1:
        raise AlignEnvError(f"the policies answer different tracks {sorted(tracks)}: evaluate each track apart")
    if not tracks:
        raise AlignEnvError("give --track (no run folder among the policies says which track they answer)")
    track_name = tracks.pop()
    if track_name not in track_names():
        raise AlignEnvError(f"unknown track {track_name!r}; tracks are {track_names()}")
    sources = [resolve_policy(p, track_name) for p in policies]
    if len({s.policy_id for s in sources}) != len(sources):
        raise AlignEnvError("the same policy is given twice")
    ref_source = resolve_policy(reference, track_name)
    if any(s.policy_id == ref_source.policy_id for s in sources):
        raise AlignEnvError(f"the reference {reference!r} is also among the evaluated policies")
    tokens = max_new_tokens or next((s.max_new_tokens for s in sources if s.max_new_tokens), None) or 64
    wanted = {s.max_new_tokens for s in sources if s.max_new_tokens} - {tokens}
    if max_new_tokens is None and wanted:
        raise AlignEnvError(f"the policies were trained with different max_new_tokens ({sorted(wanted | {tokens})}): "
                            "give --max-new-tokens so that all answer under the same decoding")
    decoding = Decoding(float(temperature), float(top_p), int(tokens))
    trk = get_track(track_name)
    items = list(trk.split(split))[:max_items]
    spec = evaluator or default_evaluator(track_name, [s.training_annotator for s in sources])
    commit = git_commit()
    stamp = {"evaluator": spec, "track": trk.id, "track_hash": trk.content_hash, "split": split,
             "decoding": asdict(decoding), "items": len(items), "version": align_env.__version__, "commit": commit}
    started = time.perf_counter()
    with ResultStore(store) as db:
        for s in [ref_source] + sources:
            if s.run_dir is not None:
                _import_run(db, s)

        def answer_set(s: PolicySource) -> str:
            aset = _digest(s.policy_id, trk.id, trk.content_hash, split, asdict(decoding), align_env.__version__)
            db.declare_answer_set(aset, s.policy_id, {"label": s.label, "track": trk.id, "split": split,
                                                      "decoding": asdict(decoding)})
            return aset

        progress(f"reference {ref_source.label}")
        ref_set = answer_set(ref_source)
        ref_answers = ensure_answers(db, ref_source, items, ref_set, decoding, commit, seed=seed, progress=progress)
        annotator = None
        summaries = []
        for s in sources:
            progress(f"policy {s.label}")
            t0 = time.perf_counter()
            pol_set = answer_set(s)
            answers = ensure_answers(db, s, items, pol_set, decoding, commit, seed=seed, progress=progress)
            jset = _digest(spec, pol_set, ref_set)
            db.declare_judgement_set(jset, {"evaluator": spec, "policy": s.policy_id, "reference": ref_source.policy_id})
            if annotator is None:
                annotator = make_annotator(spec, track=track_name)
            judged, calls = ensure_judgements(db, annotator, jset, items, answers, ref_answers, progress=progress)
            summaries.append(_summarize(s, ref_source, trk, items, answers, ref_answers, judged, stamp, seed, calls,
                                        time.perf_counter() - t0, same_annotator(spec, s.training_annotator)))
        _add_length_control(summaries, items, seed)
        ratings = _ratings(summaries, ref_source.label, items, seed)
        paired = _paired(summaries, items, seed)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        stored = []
        for summary, s in zip(summaries, sources):
            rid = _digest(summary["stamp"], s.policy_id, ref_source.policy_id)
            summary["ratings"] = ratings
            stored.append(db.put_result(rid, s.policy_id, ref_source.policy_id, summary["stamp"], summary, created))
    ref_summary = {"policy": ref_source.label, "policy_id": ref_source.policy_id,
                   "gold": gold_summary(trk, items, ref_answers)}
    progress(f"evaluated {len(sources)} policies in {time.perf_counter() - started:.0f}s")
    return Evaluation(stamp=stamp, reference=ref_summary, policies=stored, ratings=ratings, paired=paired)


def _import_run(db: ResultStore, s: PolicySource) -> None:
    from benchmarks import run_log
    from benchmarks.checkpoint import read_json

    config = read_json(s.run_dir / "config.json")
    result = read_json(s.run_dir / "result.json") if (s.run_dir / "result.json").exists() else None
    db.put_run(s.policy_id, str(s.run_dir), config, result, run_log.read(s.run_dir / run_log.METRICS_FILE),
               datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _summarize(s: PolicySource, ref: PolicySource, trk, items, answers, ref_answers, judged, stamp, seed: int,
               eval_calls: int, seconds: float, self_evaluated: bool) -> dict:
    outcomes = [stats.outcome(judged[i.id]["verdict"]) for i in items]
    usable = [o for o in outcomes if o is not None]
    prefs = [judged[i.id]["verdict"] for i in items if judged[i.id]["verdict"] is not None]
    consistent = [(j["policy_first"] > 0.5) == (j["reference_first"] > 0.5) for j in judged.values()
                  if not j["identical"] and j["policy_first"] is not None and j["reference_first"] is not None
                  and j["policy_first"] != 0.5]
    cost = dict(s.training_cost)
    cost |= {"eval_annotator_calls": eval_calls, "eval_seconds": seconds,
             "answer_annotator_calls": float(sum(answers[i.id]["policy_annotator_calls"] for i in items)),
             "answer_seconds": float(sum(answers[i.id]["seconds"] for i in items))}
    return {
        "policy": s.label, "policy_id": s.policy_id, "agent": s.agent, "reference": ref.label,
        "reference_id": ref.policy_id, "training_annotator": s.training_annotator, "self_evaluated": self_evaluated,
        "stamp": stamp, "win_rate": stats.win_rate(usable, seed=seed).as_dict(),
        "mean_preference": float(np.mean(prefs)) if prefs else float("nan"),
        "wins": sum(o == 1.0 for o in usable), "losses": sum(o == 0.0 for o in usable),
        "ties": sum(o == 0.5 for o in usable), "identical": sum(judged[i.id]["identical"] for i in items),
        "abstained": sum(o is None for o in outcomes), "position_consistency": float(np.mean(consistent)) if consistent
        else float("nan"), "gold": gold_summary(trk, items, answers), "cost": cost,
        "outcomes": {i.id: o for i, o in zip(items, outcomes)},
        "length_diff": {i.id: len(answers[i.id]["answer"]) - len(ref_answers[i.id]["answer"]) for i in items},
    }


def _add_length_control(summaries: list[dict], items, seed: int) -> None:
    ids = [i.id for i in items]
    y = np.array([[np.nan if s["outcomes"][i] is None else s["outcomes"][i] for i in ids] for s in summaries])
    ld = np.array([[s["length_diff"][i] for i in ids] for s in summaries], dtype=float)
    if np.isnan(y).all():
        for s in summaries:
            s["lc_win_rate"] = stats.Estimate(float("nan"), float("nan"), float("nan"), 0).as_dict()
        return
    for s, est in zip(summaries, stats.length_controlled_win_rates(y, ld, seed=seed)):
        s["lc_win_rate"] = est.as_dict()


def _ratings(summaries: list[dict], reference: str, items, seed: int) -> list[dict]:
    battles = [(s["policy"], reference, s["outcomes"][i.id], i.id) for s in summaries for i in items
               if s["outcomes"][i.id] is not None]
    if not battles:
        return []
    players = [reference] + [s["policy"] for s in summaries]
    return [asdict(r) | {"elo": r.elo} for r in stats.bradley_terry(players, battles, anchor=reference, seed=seed)]


def _paired(summaries: list[dict], items, seed: int) -> list[dict]:
    out = []
    for k, a in enumerate(summaries):
        for b in summaries[k + 1:]:
            ids = [i.id for i in items if a["outcomes"][i.id] is not None and b["outcomes"][i.id] is not None]
            res = stats.paired_difference([a["outcomes"][i] for i in ids], [b["outcomes"][i] for i in ids], seed=seed)
            out.append({"a": a["policy"], "b": b["policy"]} | asdict(res))
    return out


# -- tables -------------------------------------------------------------------------------------------------
def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(ev: Evaluation) -> str:
    """The evaluation's tables: win rates, length control and ratings; gold checks; cost; paired differences."""
    st = ev.stamp
    mark = lambda s: s["policy"] + (" †" if s["self_evaluated"] else "")  # noqa: E731
    lines = [f"Evaluator `{st['evaluator']}` on {st['track']} ({st['split']}, {st['items']} prompts, data "
             f"{st['track_hash']}), decoding {st['decoding']}, align-env {st['version']} at {st['commit'][:12]}; "
             f"reference: {ev.reference['policy']}. † = self-evaluated: the evaluator is the policy's training "
             "annotator, so the number measures fit to that annotator, not quality.", "",
             "| policy | win rate vs reference [95% CI] | W / T / L (identical) | abstained | LC win rate ± SE | "
             "BT strength [95% CI] | rank |", "|---|---|---|---:|---|---|---:|"]
    by = {r["player"]: r for r in ev.ratings}
    for s in ev.policies:
        w, lc, r = s["win_rate"], s["lc_win_rate"], by.get(s["policy"], {})
        lines.append(f"| {mark(s)} | {_f(w['value'])} [{_f(w['low'], 2)}, {_f(w['high'], 2)}] | {s['wins']} / "
                     f"{s['ties']} / {s['losses']} ({s['identical']}) | {s['abstained']} | {_f(lc['value'])} ± "
                     f"{_f(lc['se'])} | {_f(r.get('strength'), 2)} [{_f(r.get('low'), 2)}, {_f(r.get('high'), 2)}] | "
                     f"{r.get('rank', '-')} |")
    ref = by.get(ev.reference["policy"])
    if ref:
        lines.append(f"| {ev.reference['policy']} (reference) | - | - | - | - | 0 (anchor) | {ref['rank']} |")
    gold_keys = sorted({k for s in ev.policies for k in s["gold"]} | set(ev.reference["gold"]))
    lines += ["", "| policy | " + " | ".join(gold_keys) + " |", "|---|" + "---:|" * len(gold_keys)]
    for name, gold in [(ev.reference["policy"] + " (reference)", ev.reference["gold"])] + [
            (mark(s), s["gold"]) for s in ev.policies]:
        lines.append(f"| {name} | " + " | ".join(_f(gold.get(k)) for k in gold_keys) + " |")
    cost_keys = ["annotator_calls", "generated_tokens", "trained_tokens", "elapsed_seconds", "peak_rss_mb",
                 "answer_annotator_calls", "answer_seconds", "eval_annotator_calls", "eval_seconds"]
    lines += ["", "| policy | training annotator calls | generated tokens | trained tokens | training s | peak RSS MB "
              "| answering: annotator calls | answering s | evaluation: evaluator calls | evaluation s |",
              "|---|" + "---:|" * len(cost_keys)]
    for s in ev.policies:
        c = s["cost"]
        lines.append(f"| {mark(s)} | " + " | ".join(_f(c.get(k), 0) if c.get(k) is not None else "0" for k in cost_keys)
                     + " |")
    if ev.paired:
        lines += ["", "| A | B | win rate A - B [95% CI] | p (sign flip) | prompts |", "|---|---|---|---:|---:|"]
        for p in ev.paired:
            lines.append(f"| {p['a']} | {p['b']} | {p['difference']:+.3f} [{p['low']:+.2f}, {p['high']:+.2f}] | "
                         f"{_f(p['p_value'])} | {p['n']} |")
    return "\n".join(lines) + "\n"
