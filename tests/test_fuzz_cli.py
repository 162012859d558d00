"""Bad command lines get a clear error: exit status 2 and a message that names the argument, never a traceback.

A seeded generator builds bad argv for every subcommand (wrong types, negative, zero and huge numbers, nan and
inf, empty strings, odd Unicode and control characters, unknown flags, missing values, files where folders are
expected and the reverse, unknown names) and calls :func:`align_env.cli.main` in-process. Each case starts from
a command line that would pass validation and breaks one argument. The entry points of heavy work (building an
agent, training, answering, loading a model) are replaced by a guard, so a case that slips through validation
fails the test instead of starting it. Printed text is checked for raw control and escape sequences too.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from align_env.cli import MAX_COUNT, MAX_SEED, main
from align_env.redaction import neutralize

pytestmark = pytest.mark.timeout(120)

SEED = 20261203
CASES = 2000
RAW = ("\x1b", "\x07", "\r", "\x00", "\x9b", "\x08")  # must never reach the terminal as they are
EVIL = "ok \x1b[2J\x1b]0;pwned\x07 then\rover"


class Escaped(BaseException):
    """Raised by the guards: a bad command line got past validation into heavy work."""


def _guard(name: str):
    def guard(*args, **kwargs):
        raise Escaped(name)
    return guard


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder with a file, an empty folder and a run folder; heavy entry points guarded."""
    import agents.registry
    import align_env.demo
    import align_env.models
    import benchmarks.annotator_eval
    import benchmarks.evaluation
    import benchmarks.runner

    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("not a folder\n")
    Path("adir").mkdir()
    Path("rundir").mkdir()
    Path("rundir/metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                    for s in range(1, 5)))
    for module, attr in [(agents.registry, "make_agent"), (benchmarks.runner, "train"),
                         (benchmarks.evaluation, "ResultStore"), (benchmarks.annotator_eval, "run"),
                         (align_env.demo, "run_demo"), (align_env.models, "prepare"),
                         (align_env.models, "convert_gguf")]:
        monkeypatch.setattr(module, attr, _guard(f"{module.__name__}.{attr}"))
    return tmp_path


# -- the command lines that pass validation, and what each argument takes ----------------------------------
BASES = {
    "run": (["--agent", "initial", "--track", "helpful", "--steps", "2", "--num-envs", "2", "--out", "out-run",
             "--no-progress"], []),
    "demo": (["--episodes", "1", "--max-new-tokens", "4"], []),
    "annotators": (["--annotators", "rules", "--tracks", "helpful", "--max-pairs", "4", "--out", "ann"], []),
    "eval": (["--track", "helpful", "--max-items", "2", "--store", "r.sqlite"], ["best-of-n?n=2"]),
    "curves": (["--no-plot"], ["rundir"]),
    "models": ([], ["prepare", "smollm2-135m"]),
    "envs": (["--json"], []),
    "tracks": (["--json"], []),
}
ARGS = {  # (command, flag or positional name) -> kind of value
    ("run", "--agent"): "agent", ("run", "--track"): "track", ("run", "--annotator"): "annotator",
    ("run", "--steps"): "count", ("run", "--budget-prompts"): "count", ("run", "--budget-annotator-calls"): "count",
    ("run", "--num-envs"): "count", ("run", "--seed"): "seed", ("run", "--out"): "out_dir",
    ("run", "--checkpoint-every"): "count",
    ("demo", "--policy"): "empty", ("demo", "--annotator"): "annotator", ("demo", "--episodes"): "count",
    ("demo", "--seed"): "seed", ("demo", "--max-new-tokens"): "count",
    ("annotators", "--annotators"): "annotator", ("annotators", "--tracks"): "track",
    ("annotators", "--source"): "choice", ("annotators", "--max-pairs"): "count", ("annotators", "--seed"): "seed",
    ("annotators", "--out"): "out_dir", ("annotators", "--write-ranking"): "out_file",
    ("eval", "policies"): "policy", ("eval", "--reference"): "policy", ("eval", "--evaluator"): "annotator",
    ("eval", "--track"): "track", ("eval", "--split"): "choice", ("eval", "--max-items"): "count",
    ("eval", "--max-new-tokens"): "count", ("eval", "--temperature"): "temperature", ("eval", "--store"): "out_file",
    ("eval", "--seed"): "seed", ("eval", "--out"): "out_file",
    ("curves", "run_dir"): "run_dir", ("curves", "--windows"): "count",
    ("models", "action"): "choice",
}
NARGS_PLUS = {"--annotators", "--tracks", "--metrics"}

ODD = ["\x1b[2J", "\x1b]0;pwned\x07", "\r", "\x00", "\x7f", "\x9b", "\u202e", "\u2066", "\u200d", "\ufeff", "🦙",
       "e\u0301", "\udcff", "名前", "ｓ", "\u2028", "\t", " ", "Ω", "ß"]
FAMILIES = ("rules", "embedding", "likelihood", "llm_judge", "pool", "reward_model", "self")
FIXED = {
    "count": ["0", "-1", "-0", str(-MAX_COUNT), str(MAX_COUNT + 1), "9" * 40, "1.5", "1e3", "nan", "inf", "-inf",
              "+nan", "", " ", "abc", "0x10", "1_000", "١٢", "①", "１２", "2\x00", "3\x1b[2J", "--", "-", "1 2"],
    "seed": ["-1", "-7", str(MAX_SEED + 1), "9" * 30, "1.0", "nan", "inf", "", "seed", "٣", "0x1", "-inf"],
    "temperature": ["nan", "inf", "-inf", "-1", "-0.5", "1e999", "", "hot", "0,7", "NaN", "\x1b"],
    "track": ["", "sumarize", "Helpful", "summarize ", "ｓｕｍｍａｒｉｚｅ", "harmless\x00", "\x1b[2J", "tracks"],
    "annotator": ["", ":", "x:", "rulez", "smollm2-135m:llm_juge", "rules?a", "rules?=&=", "rules?zz=1",
                  "mdl:?x=1", "embedding", "mdl:rules", "\u202e", "rules\x1b[2J"],
    "agent": ["", ":", "online-dpp", "os:path", "os:getcwd", "collections:OrderedDict", "json:decoder.JSONDecoder",
              "agents.registry:AGENTS", "math:pi", "no_such_module_xyz:Agent", "json:", ":Agent", "os:nope",
              "agents.protocol:Transitions"],
    "out_dir": ["afile", "afile/sub", "afile/a/b", "", "a\x00b", "x" * 300],
    "out_file": ["adir", ".", "afile/x.md", "afile/a/b.md", "", "r\x00.sqlite", "y" * 300],
    "run_dir": ["nope", "./nope", "afile", "afile/x", "", "\x00", "z" * 300],
    "policy": ["./nope", "afile", "afile/run", "", "../no/such/run", "~/no/such/run-xyz"],
    "choice": ["", "hubb", "EVAL", "\x1b[2J", "名前"],
    "empty": ["", " ", "\t"],
}


def _junk(rng: random.Random, n: int | None = None) -> str:
    """A short random string of letters, digits, punctuation and odd characters; never starts with '-'."""
    pool = list("abcxyz019.:/?=&_~ ") + ODD
    text = "".join(rng.choice(pool) for _ in range(n or rng.randint(1, 12)))
    return "x" + text if text.startswith("-") else text


def _bad_value(rng: random.Random, kind: str) -> str:
    """A value that ``kind`` must reject: a fixed hard case, or random junk that cannot be valid."""
    if rng.random() < 0.6:
        return rng.choice(FIXED[kind])
    junk = _junk(rng)
    if kind in ("count", "seed", "temperature", "choice", "empty"):
        return {"count": junk + "x", "seed": junk + "s", "temperature": junk + "t", "choice": junk + "!",
                "empty": rng.choice(FIXED["empty"])}[kind]
    if kind == "track":
        return junk
    if kind == "annotator":  # no family name anywhere in it, so its family cannot be a known one
        return rng.choice(FIXED["annotator"]) if any(f in junk for f in FAMILIES) else junk + "\x1b"
    if kind == "agent":
        return rng.choice(["no_such_mod_", "os:", "json:", ""]) + junk.replace(":", "").replace(".", "") + "Q"
    if kind == "out_dir":
        return rng.choice(["afile/", "afile/d/"]) + junk.replace("\x00", "")
    if kind == "out_file":
        return rng.choice(["adir", "afile/" + junk.replace("\x00", ""), junk + "\x00"])
    if kind == "run_dir":
        return rng.choice(["no/", "afile/", "./nope-"]) + junk
    return rng.choice(["./nope-", "afile/", "../nowhere/"]) + junk  # policy


def _names(target: str) -> list[str]:
    """What an error message may call an argument: '--max-pairs', 'max-pairs', 'max_pairs', or 'run_dir'."""
    bare = target.lstrip("-")
    return [target, bare, bare.replace("-", "_")]


def _argv(command: str, flags: dict[str, list[str]], positionals: list[str]) -> list[str]:
    out = [command, *positionals]
    for flag, values in flags.items():
        out += [flag, *values]
    return out


def _base(command: str) -> tuple[dict[str, list[str]], list[str]]:
    opts, positionals = BASES[command]
    flags: dict[str, list[str]] = {}
    for token in opts:
        if token.startswith("--"):
            flags[token] = []
            current = token
        else:
            flags[current].append(token)
    return flags, list(positionals)


POSITIONAL_SLOT = {("eval", "policies"): 0, ("curves", "run_dir"): 0, ("models", "action"): 0}


def bad_value_case(rng: random.Random) -> tuple[list[str], list[str]]:
    (command, target), kind = rng.choice(sorted(ARGS.items()))
    flags, positionals = _base(command)
    value = _bad_value(rng, kind)
    if (command, target) in POSITIONAL_SLOT:
        if value.startswith("-"):
            value = "x" + value
        positionals[POSITIONAL_SLOT[command, target]] = value
        if command == "models" and value:  # 'models VALUE' must not read as 'models prepare'
            positionals = [value]
    elif target in NARGS_PLUS:
        good = flags.get(target, [])
        flags[target] = rng.sample([*good, value], k=len(good) + 1)
    else:
        flags[target] = [value]
    if command == "run" and target == "--budget-prompts":
        flags.pop("--steps")
    return _argv(command, flags, positionals), _names(target)


def unknown_flag_case(rng: random.Random) -> tuple[list[str], list[str]]:
    command = rng.choice(sorted(BASES))
    flags, positionals = _base(command)
    flag = rng.choice(["--zz", "-Z", "--zz-", "---"]) + _junk(rng).replace(" ", "")
    argv = _argv(command, flags, positionals)
    argv.insert(rng.choice([1, len(argv)]), flag)  # not between a flag and its value
    return argv, [neutralize(flag), "unrecognized arguments"]


def missing_value_case(rng: random.Random) -> tuple[list[str], list[str]]:
    (command, target), _ = rng.choice([kv for kv in sorted(ARGS.items()) if kv[0][1].startswith("--")])
    flags, positionals = _base(command)
    flags.pop(target, None)
    argv = _argv(command, flags, positionals)
    if rng.random() < 0.5:
        return argv + [target], _names(target)
    follower = [t for t in argv[1:] if t.startswith("--")]
    if not follower:
        return argv + [target], _names(target)
    at = argv.index(rng.choice(follower))
    return argv[:at] + [target] + argv[at:], _names(target)


def missing_required_case(rng: random.Random) -> tuple[list[str], list[str]]:
    command, target = rng.choice([("run", "--agent"), ("run", "--track"), ("eval", "policies"), ("curves", "run_dir")])
    flags, positionals = _base(command)
    if target.startswith("--"):
        flags.pop(target)
    else:
        positionals = []
    return _argv(command, flags, positionals), ["required", *_names(target)]


def semantic_case(rng: random.Random) -> tuple[list[str], list[str]]:
    """Valid syntax, bad meaning: checked after parsing, still before anything loads."""
    run = _argv("run", *_base("run"))
    no_steps = _argv("run", {k: v for k, v in _base("run")[0].items() if k != "--steps"}, [])
    cases = [
        (run + ["--set", "oops"], ["--set"]),
        (run + ["--set", "=1"], ["--set"]),
        (run + ["--set", "seed=1", "--set", "seed=2"], ["--set", "seed"]),
        (run + ["--set", f"nosuchfield{_junk(rng, 3)}=1"], ["config field"]),
        (run + ["--set", "max_new_tokens=" + _junk(rng) + "x"], ["max_new_tokens"]),
        (no_steps + ["--budget-prompts", "1"], ["budget_prompts"]),
        (no_steps, ["budget"]),
        (["eval", "online-dpo", "--track", "helpful"], ["online-dpo"]),
        (["eval", "initial", "--track", "helpful"], ["reference"]),
        (["eval", "best-of-n?n=2", "best-of-n?n=2", "--track", "helpful"], ["twice"]),
        (["eval", "best-of-n?n=2"], ["--track"]),
        (["eval", "best-of-n?n=2&seed=-1", "--track", "helpful"], ["seed"]),
        (["eval", "best-of-n?n=2&n=3", "--track", "helpful"], ["twice"]),
        (["eval", "no-such-agent" + _junk(rng, 2).replace("/", ""), "--track", "helpful"], ["agent"]),
        (["models", "prepare", "smollm2-135m", "smolm2" + _junk(rng, 2)], ["model"]),
        (["models", "list", "smollm2-135m"], ["models list"]),
        (["curves", "rundir", "--no-plot", "--metrics", "los"], ["metric 'los'"]),
        (["curves", "rundir", "--no-plot", "--metrics", "loss", _junk(rng) + "\x1b"], ["metric"]),
        (["curves", "adir"], ["metrics.jsonl"]),
        (["envs", "--json", _junk(rng).replace(" ", "") + "Q"], ["unrecognized arguments"]),
        (["tracks", "--json=" + _junk(rng)], ["--json"]),
        ([_junk(rng).replace(" ", "") + "Q"], ["command"]),
    ]
    return rng.choice(cases)


GENERATORS = [(bad_value_case, 0.62), (unknown_flag_case, 0.1), (missing_value_case, 0.1),
              (missing_required_case, 0.05), (semantic_case, 0.13)]


def run_case(argv: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
        except Escaped as exc:
            code = f"got past validation into {exc}"
        except Exception as exc:  # noqa: BLE001 - any other exception is the defect under test
            code = f"raised {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue()


def check(argv: list[str], names: list[str], code, out: str, err: str) -> str | None:
    """Why the outcome is wrong, or None."""
    if code != 2:
        return f"exit {code!r}"
    if "Traceback" in out + err:
        return "a traceback"
    if not any(n and n in err for n in names):
        return f"the message names none of {names}: {err[-300:]!r}"
    if any(c in out + err for c in RAW):
        return "raw control characters in the output"
    try:
        (out + err).encode("utf-8")
    except UnicodeEncodeError:
        return "unprintable (lone surrogate) text in the output"
    return None


def test_fuzzed_bad_command_lines_exit_2_with_a_message_naming_the_argument(sandbox):
    rng = random.Random(SEED)
    generators, weights = zip(*GENERATORS)
    failures, start = [], time.perf_counter()
    for _ in range(CASES):
        argv, names = rng.choices(generators, weights)[0](rng)
        problem = check(argv, names, *run_case(argv))
        if problem:
            failures.append(f"{argv!r}: {problem}")
    elapsed = time.perf_counter() - start
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:25])
    assert elapsed < 60, f"{CASES} cases took {elapsed:.1f}s"


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--agent", "os:path", "--track", "helpful", "--steps", "1"], "is a module, not an agent class"),
    (["run", "--agent", "os:getcwd", "--track", "helpful", "--steps", "1"], "not an agent class"),
    (["run", "--agent", "collections:OrderedDict", "--track", "helpful", "--steps", "1"], "has no act, save, load"),
    (["run", "--agent", "initial", "--track", "helpful", "--steps", "1", "--seed", "-3"], "argument --seed: a seed"),
    (["run", "--agent", "initial", "--track", "helpful", "--steps", "1", "--out", "afile"], "is an existing file"),
    (["run", "--agent", "initial", "--track", "helpful", "--steps", "1", "--out", "afile/run"], "which is a file"),
    (["run", "--agent", "initial", "--track", "helpful", "--num-envs", "0", "--steps", "1"], "argument --num-envs"),
    (["demo", "--episodes", "0"], "argument --episodes: expected a positive integer"),
    (["demo", "--max-new-tokens", "-4"], "argument --max-new-tokens"),
    (["annotators", "--max-pairs", "0"], "argument --max-pairs"),
    (["eval", "initial", "--max-items", "0"], "argument --max-items"),
    (["eval", "./no/such/run"], "argument policies: no such run folder"),
    (["eval", "initial", "--track", "helpful", "--out", "adir"], "argument --out: adir is a folder"),
    (["eval", "initial", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["curves", "nope"], "argument run_dir: no such run folder: nope"),
    (["curves", "afile"], "argument run_dir: afile is a file"),
    (["curves", "rundir", "--metrics", "los"], "unknown metric 'los'. Did you mean 'loss'"),
])
def test_each_kind_of_bad_argument_is_named(sandbox, argv, message):
    code, out, err = run_case(argv)
    assert code == 2 and message in err, err


def test_an_output_path_in_a_folder_without_write_permission_is_refused(sandbox, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: Path(path).resolve() != (sandbox / "adir").resolve())
    for argv, message in [(["run", "--agent", "initial", "--track", "helpful", "--steps", "1", "--out", "adir/a/b"],
                           "argument --out: cannot write adir/a/b: no permission to write in adir"),
                          (["eval", "initial", "--track", "helpful", "--store", "adir/r.sqlite"],
                           "argument --store: cannot write adir/r.sqlite")]:
        code, out, err = run_case(argv)
        assert code == 2 and message in err, err


@pytest.mark.parametrize("argv", [
    ["run", "--agent", "initial", "--track", "helpful", "--steps", "-1"],
    ["curves", "/no/such/run/folder"],
])
def test_as_a_subprocess_bad_input_exits_2_without_a_traceback(argv, tmp_path):
    root = str(Path(__file__).resolve().parents[1])  # this checkout, not another install of align_env
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "align_env.cli", *argv], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "align-env" in proc.stderr and "argument" in proc.stderr


# -- text from models and data is neutralised on the terminal ------------------------------------------------
def _assert_neutralised(text: str) -> None:
    assert not any(c in text for c in RAW), repr(text)
    assert "\\x1b[2J" in text and "\\x07" in text and "\\r" in text  # shown, not interpreted


def test_demo_prints_model_answers_neutralised(monkeypatch, capsys):
    """An answer with escape sequences (clear screen, set the window title) and a carriage return."""
    from align_env.engines import transformers_engine

    class Fake:
        def generate(self, prompts, *, n, **kwargs):
            return [[SimpleNamespace(text=EVIL), SimpleNamespace(text=EVIL + " longer")] for _ in prompts]

    monkeypatch.setattr(transformers_engine.TransformersEngine, "from_name", classmethod(lambda cls, name: Fake()))
    assert main(["demo", "--episodes", "1", "--max-new-tokens", "4", "--policy", "p\x1b[31m"]) == 0
    out = capsys.readouterr().out
    _assert_neutralised(out)
    assert "\\x1b[31m" in out


def test_cli_tables_neutralise_model_and_data_text(sandbox, monkeypatch, capsys):
    """eval's tables, annotators' tables, run's summary and curves' metric names, all quoting outside text."""
    import benchmarks.annotator_eval as ae
    import benchmarks.evaluation as evaluation
    import benchmarks.runner as runner

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: SimpleNamespace(as_dict=lambda: {"x": EVIL}))
    monkeypatch.setattr(evaluation, "markdown", lambda ev: f"| {EVIL} |\n")
    assert main(["eval", "initial", "--track", "helpful", "--out", "t.md"]) == 0
    _assert_neutralised(capsys.readouterr().out)
    assert "\x1b" not in Path("t.md").read_text()

    monkeypatch.setattr(ae, "run", lambda *a, progress, **k: progress(EVIL) or [])
    monkeypatch.setattr(ae, "markdown_table", lambda results: f"| {EVIL} |\n")
    assert main(["annotators", "--tracks", "helpful", "--annotators", "rules"]) == 0
    _assert_neutralised(capsys.readouterr().out)

    done = {"run_dir": f"runs/{EVIL}", "step": 1, "prompts_seen": 2, "annotator_calls": 2, "abstentions": 0,
            "stop_reason": "steps", "final_checkpoint": "c", "final_metrics": {}}
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: done)
    assert main(["run", "--agent", "initial", "--track", "helpful", "--steps", "1"]) == 0
    _assert_neutralised(capsys.readouterr().out)

    Path("rundir/metrics.jsonl").write_text(json.dumps({"step": 1, EVIL: 1.0}) + "\n")
    assert main(["curves", "rundir", "--no-plot", "--metrics", EVIL]) == 0
    _assert_neutralised(capsys.readouterr().out)


def test_error_messages_quoting_user_input_are_neutralised(sandbox, capsys):
    for argv in (["run", "--agent", EVIL, "--track", "helpful", "--steps", "1"], ["eval", f"./{EVIL}"],
                 ["curves", "rundir", "--metrics", EVIL], [EVIL], ["run", "--agent", "initial", "--track", EVIL]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert not any(c in err for c in RAW), (argv, err)
