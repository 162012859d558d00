"""The ``align-env`` command. With no subcommand it runs the demonstration on the embedded defaults."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from align_env.errors import AlignEnvError, did_you_mean
from align_env.redaction import neutralize


def _show(text: object = "") -> None:
    """Print text that may quote models, data or user input, with control and escape sequences neutralised."""
    print(neutralize(text))


def _cmd_envs(args) -> int:
    from align_env.registration import env_table

    rows = env_table()
    if args.json:
        _show(json.dumps(rows, indent=1))
        return 0
    _show(f"{'id':<26} {'track':<10} {'feedback':<28} {'default annotator':<18} deterministic")
    for r in rows:
        _show(f"{r['id']:<26} {r['track']:<10} {r['feedback']:<28} {r['annotator']:<18} {r['deterministic']}")
    return 0


def _cmd_tracks(args) -> int:
    from align_env.tracks import TRACKS, get_track

    rows = []
    for name, spec in TRACKS.items():
        track = get_track(name)
        rows.append(track.summary() | {"hub": spec.hub_sources})
    if args.json:
        _show(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        sizes = ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
        _show(f"{r['id']:<14} hash {r['hash']}  {sizes}\n  {r['description']}\n"
              f"  embedded in the package; hub: {r['hub']}")
    return 0


def _cmd_models(args) -> int:
    import time

    from align_env import models

    if args.action == "list":
        if args.names:
            raise AlignEnvError(f"models list takes no model names (got {args.names}); use models prepare NAME...")
        _show(f"{'name':<14} {'params':>12} {'package':<26} {'cached':<7} description")
        for e in models.CATALOGUE.values():
            cached = models.cache_entry_ok(models.cache_dir() / "models" / e.name)
            _show(f"{e.name:<14} {e.params:>12,} {e.package:<26} {'yes' if cached else 'no':<7} {e.description}")
        _show(f"cache: {models.cache_dir()}")
        return 0
    names = args.names or list(models.CATALOGUE)
    for name in names:  # every name is checked before any model is converted
        if name not in models.CATALOGUE:
            raise did_you_mean("model", name, models.CATALOGUE)
    for name in names:
        start = time.perf_counter()
        path = models.prepare(name)
        _show(f"{name}: {path} ({time.perf_counter() - start:.1f}s)")
    return 0


def _cmd_demo(args) -> int:
    from align_env.demo import run_demo

    run_demo(policy=args.policy, annotator=args.annotator, episodes=args.episodes, seed=args.seed,
             max_new_tokens=args.max_new_tokens)
    return 0


DEFAULT_ANNOTATORS = [
    "rules",
    "minilm-l6:embedding",
    "smollm2-135m:likelihood?mode=pmi",
    "smollm2-135m:llm_judge",
    "smollm2-135m:llm_judge?calibrate=content_free",
]


def _cmd_annotators(args) -> int:
    from benchmarks.annotator_eval import markdown_table, recommend, run

    results = run(args.annotators, args.tracks, Path(args.out), source=args.source, seed=args.seed,
                  max_pairs=args.max_pairs, progress=_show)
    _show()
    _show(markdown_table(results))
    for track, best in recommend(results).items():
        _show(f"{track}: chosen on the selection half: {best.annotator} (selection {best.selection_accuracy:.3f}); "
              f"report half {best.report_accuracy:.3f} [{best.report_ci_low:.2f}, {best.report_ci_high:.2f}], "
              f"n={best.report_pairs}")
    if args.write_ranking:
        from benchmarks.annotator_eval import collected, ranking_table

        rows = collected(Path(args.out), (args.source, args.seed, args.max_pairs))
        Path(args.write_ranking).write_text(json.dumps(ranking_table(rows), indent=1) + "\n", encoding="utf-8")
        _show(f"ranking of every result in {args.out}: {args.write_ranking}")
    _show(f"results: {args.out}/annotators.csv, annotators.json, annotators.md, annotators.png")
    return 0


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs -> ``{key: value}`` (values stay strings; the agent registry coerces them)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AlignEnvError(f"--set expects key=value, got {pair!r}")
        if key.strip() in out:
            raise AlignEnvError(f"--set gives {key.strip()!r} twice")
        out[key.strip()] = value
    return out


def _cmd_run(args) -> int:
    from benchmarks.runner import run_one

    result = run_one(args.agent, args.track, args.annotator, steps=args.steps, budget_prompts=args.budget_prompts,
                     budget_annotator_calls=args.budget_annotator_calls, num_envs=args.num_envs, seed=args.seed,
                     out_dir=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                     progress=not args.no_progress, overrides=_parse_sets(args.set))
    run_dir = result["run_dir"]
    if result.get("reused"):
        _show(f"this run had already finished in {run_dir}; nothing was recomputed")
    last = result.get("final_metrics") or {}
    shown = {k: last[k] for k in ("loss", "reward_margin", "reward_mean", "response_length") if last.get(k) is not None}
    _show(f"{result['step']} steps, {result['prompts_seen']} prompts, {result['annotator_calls']} annotator calls, "
          f"{result['abstentions']} abstentions, stopped by the {result['stop_reason']} budget; last step: "
          + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    _show(f"results: {run_dir}  (config.json, metrics.jsonl, result.json, "
          f"{result['final_checkpoint']}/agent)")
    return 0


def _cmd_eval(args) -> int:
    from benchmarks.evaluation import evaluate, markdown

    ev = evaluate(args.policies, reference=args.reference, evaluator=args.evaluator, track=args.track,
                  split=args.split, max_items=args.max_items, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, store=args.store, seed=args.seed, progress=_show)
    table = neutralize(markdown(ev))
    _show()
    _show(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table, encoding="utf-8")
        (out.with_suffix(".json")).write_text(json.dumps(ev.as_dict(), indent=1, default=str), encoding="utf-8")
        _show(f"tables: {out} (and {out.with_suffix('.json')})")
    _show(f"store: {args.store}")
    return 0


MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most RNGs take 32-bit seeds
MAX_COUNT = 2**31 - 1  # counts (steps, prompts, tokens) fit a signed 32-bit integer


def _int_text(text: str, what: str) -> int:
    """``text`` as an integer written in ASCII digits (no '1_000', no other scripts' digits), or a type error."""
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(f"expected {what}, got {neutralize(repr(text))}")
    return int(text)


def _positive_int(text: str) -> int:
    value = _int_text(text, "a positive integer")
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1..{MAX_COUNT}), got {value}")
    return value


def _seed(text: str) -> int:
    value = _int_text(text, "a non-negative integer seed")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be in 0..{MAX_SEED}, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {neutralize(repr(text))}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text.strip()!r}")
    return value


def _kind(path: Path, text: str) -> str:
    """``"missing"``, ``"folder"`` or ``"file"``; a path the system refuses (too long, no permission) is an error."""
    try:
        return "folder" if path.is_dir() else "file" if path.exists() else "missing"
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot use {neutralize(repr(text))}: {exc.strerror or exc}") from None


def _path(text: str) -> tuple[Path, str]:
    """``(path, kind)`` of a usable path text: not empty, no NUL, no existing file among its parent folders."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"a path cannot contain a NUL character: {neutralize(repr(text))}")
    path = Path(text).expanduser()
    blocked = next((p for p in path.parents if _kind(p, text) == "file"), None)
    if blocked is not None:
        raise argparse.ArgumentTypeError(f"{neutralize(text)} is inside {neutralize(blocked)}, which is a file")
    return path, _kind(path, text)


def _writable(path: Path, text: str) -> None:
    """The nearest existing folder at or above ``path`` lets this user create files."""
    folder = next(p for p in [path, *path.parents] if _kind(p, text) == "folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {neutralize(text)}: no permission to write in "
                                         f"{neutralize(folder)}")


def _out_dir(text: str) -> str:
    """An output folder: absent (it is created) or an existing folder, never a file; writable."""
    path, kind = _path(text)
    if kind == "file":
        raise argparse.ArgumentTypeError(f"{neutralize(text)} is an existing file, not a folder")
    _writable(path, text)
    return text


def _out_file(text: str) -> str:
    """An output file: absent or an existing file, never a folder; in a writable folder."""
    path, kind = _path(text)
    if kind == "folder":
        raise argparse.ArgumentTypeError(f"{neutralize(text)} is a folder; give a file name such as "
                                         f"{neutralize(path / 'eval.md')}")
    _writable(path.parent, text)
    return text


def _run_dir(text: str) -> str:
    """An existing run folder."""
    kind = _path(text)[1]
    if kind == "missing":
        raise argparse.ArgumentTypeError(f"no such run folder: {neutralize(text)}")
    if kind == "file":
        raise argparse.ArgumentTypeError(f"{neutralize(text)} is a file, not a run folder")
    return text


def _policy(text: str) -> str:
    """A run folder (it must exist) or an agent spec (checked when the evaluation resolves it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a run folder or an agent name, got an empty string")
    try:
        exists = "\x00" not in text and Path(text).exists()
    except OSError:  # e.g. a long agent spec: too long for a file name
        exists = False
    if exists or "/" in text.split("?")[0] or text.startswith((".", "~")):
        return _run_dir(text)
    return text


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a name, got an empty string")
    return text


def _argument_error(exc: AlignEnvError) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(neutralize(str(exc)))


def _track(text: str) -> str:
    from align_env.tracks import track_names

    if text not in (known := track_names()):
        raise _argument_error(did_you_mean("track", text, known))
    return text


def _annotator(text: str) -> str:
    """An annotator spec whose syntax and family are known and whose model is given where the family needs one;
    a ``rules`` spec is built (it loads nothing), so its parameters are checked too. Models are checked when
    they load."""
    from align_env.feedback import MODEL_FREE, NEEDS_MODEL, families, make_annotator, parse_spec

    try:
        spec = parse_spec(text)
        if spec.family not in (known := families()):
            raise did_you_mean("annotator family", spec.family, known)
        if spec.family in MODEL_FREE and spec.model or spec.family in NEEDS_MODEL and not spec.model:
            make_annotator(spec)  # raises the library's error for the combination
        if spec.family == "rules":
            make_annotator(spec)
    except AlignEnvError as exc:
        raise _argument_error(exc) from None
    return text


def _agent(text: str) -> str:
    """A built-in or plug-in agent name, or 'module:Class' naming an agent class."""
    from agents.registry import resolve_agent

    try:
        resolve_agent(text)
    except AlignEnvError as exc:
        raise _argument_error(exc) from None
    return text


def _cmd_curves(args) -> int:
    from benchmarks.curves import report

    _show(report(args.run_dir, args.metrics, args.windows, png=not args.no_plot))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its error messages (which quote the bad input) neutralised for the terminal."""

    def error(self, message: str):
        super().error(neutralize(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="align-env", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="a short demonstration on the embedded defaults (the default command)")
    demo.add_argument("--policy", type=_nonempty, default="smollm2-135m",
                      help="policy model: catalogue name, folder or hub id")
    demo.add_argument("--annotator", type=_annotator, default="rules", help="annotator spec '<model>:<family>[?k=v]'")
    demo.add_argument("--episodes", type=_positive_int, default=3, help="prompts per track")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--max-new-tokens", type=_positive_int, default=64)
    demo.set_defaults(func=_cmd_demo)

    envs = sub.add_parser("envs", help="list registered environment ids")
    envs.add_argument("--json", action="store_true")
    envs.set_defaults(func=_cmd_envs)

    tracks = sub.add_parser("tracks", help="each track's sources, split sizes and version hash")
    tracks.add_argument("--json", action="store_true")
    tracks.set_defaults(func=_cmd_tracks)

    mdl = sub.add_parser("models", help="list catalogue models, or prepare (convert and cache) them")
    mdl.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    mdl.add_argument("names", nargs="*", help="models to prepare (default: all)")
    mdl.set_defaults(func=_cmd_models)
    ann = sub.add_parser("annotators", help="score annotators against a track's labelled pairs")
    ann.add_argument("--annotators", nargs="+", type=_annotator, default=DEFAULT_ANNOTATORS, help="annotator specs")
    ann.add_argument("--tracks", nargs="+", type=_track, default=["summarize", "helpful", "harmless"])
    ann.add_argument("--source", default="embedded", choices=["embedded", "hub"])
    ann.add_argument("--max-pairs", type=_positive_int, default=None, help="the first N labelled pairs only")
    ann.add_argument("--seed", type=_seed, default=0, help="seeds which pairs show the chosen response first")
    ann.add_argument("--out", type=_out_dir, default="annotator-eval",
                     help="output folder (finished results are reused)")
    ann.add_argument("--write-ranking", type=_out_file, default=None, metavar="PATH",
                     help="also write the per-track ranking "
                     "(chosen on the selection half) of every result in --out, e.g. align_env/feedback/ranking.json")
    ann.set_defaults(func=_cmd_annotators)

    run = sub.add_parser("run", help="one training run: an agent on a track, judged by an annotator")
    run.add_argument("--agent", type=_agent, required=True,
                     help="agent name (online-dpo, offline-dpo, best-of-n, initial), "
                     "a plug-in name or 'module:Class'")
    run.add_argument("--track", type=_track, required=True, help="summarize, helpful or harmless")
    run.add_argument("--annotator", type=_annotator, default="rules", help="annotator spec '<model>:<family>[?k=v]'")
    run.add_argument("--steps", type=_positive_int, default=None, help="budget in steps (batches)")
    run.add_argument("--budget-prompts", type=_positive_int, default=None, help="budget in prompts (never exceeded)")
    run.add_argument("--budget-annotator-calls", type=_positive_int, default=None,
                     help="budget in annotator calls (stops at the first step that reaches it)")
    run.add_argument("--num-envs", type=_positive_int, default=8, help="prompts per step (the batch)")
    run.add_argument("--seed", type=_seed, default=0)
    run.add_argument("--out", type=_out_dir, default=None,
                     help="run folder (default: runs/<agent>-<track>-s<seed>-<hash of the "
                     "config>, so the same command finds the same folder)")
    run.add_argument("--checkpoint-every", type=_positive_int, default=10, help="steps between checkpoints")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="agent config field, e.g. --set model=smollm2-135m --set beta=0.1 (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue an unfinished run in the folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser("eval", help="did training help? win rates against a reference policy, LC win rate, "
                        "Bradley-Terry ratings, gold checks and cost, kept in a results store")
    ev.add_argument("policies", nargs="+", type=_policy, help="finished run folders, or untrained agents: 'initial', "
                    "'best-of-n?n=4&judge=minilm-l6:embedding'")
    ev.add_argument("--reference", type=_policy, default="initial",
                    help="the policy every answer is compared with (default: the "
                    "untrained initial policy; a run folder works too)")
    ev.add_argument("--evaluator", type=_annotator, default=None,
                    help="annotator spec of the judge (default: the best measured "
                    "annotator of the track that is not a training annotator of the policies)")
    ev.add_argument("--track", type=_track, default=None, help="needed when no run folder is given")
    ev.add_argument("--split", default="eval", choices=["eval", "train"],
                    help="prompts to answer: eval (default) or train")
    ev.add_argument("--max-items", type=_positive_int, default=None, help="the first N prompts of the split")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=None,
                    help="answer length cap (default: the runs' max_new_tokens)")
    ev.add_argument("--temperature", type=_temperature, default=0.0, help="decoding temperature (default 0: greedy)")
    ev.add_argument("--store", type=_out_file, default="results.sqlite",
                    help="the results store (SQLite file; created if absent)")
    ev.add_argument("--seed", type=_seed, default=0, help="seeds the bootstrap and any sampled decoding")
    ev.add_argument("--out", type=_out_file, default=None,
                    help="also write the tables to this Markdown file (and .json beside it)")
    ev.set_defaults(func=_cmd_eval)

    curves = sub.add_parser("curves", help="a run's learning curves: windowed means of its metrics, and a plot")
    curves.add_argument("run_dir", type=_run_dir, help="a run folder of `align-env run`")
    curves.add_argument("--metrics", nargs="+", default=None, help="metrics to show (default: the main ones)")
    curves.add_argument("--windows", type=_positive_int, default=4, help="consecutive windows of steps to average")
    curves.add_argument("--no-plot", action="store_true", help="do not write curves.png into the run folder")
    curves.set_defaults(func=_cmd_curves)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit status (2 for bad input: argparse's errors and :class:`AlignEnvError`)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv or ["demo"])
    except SystemExit as exc:  # argparse has printed the error (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except AlignEnvError as exc:
        from align_env.redaction import safe_text

        print(f"align-env: error: {safe_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
