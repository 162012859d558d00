"""``align-env run``: one training run end to end on the tiny model, its default folder, its errors."""

from __future__ import annotations

import json
import re

import pytest

from align_env.cli import main
from benchmarks import run_log
from benchmarks.runner import default_out_dir, request


def run_args(tiny_lm_dir: str, *extra: str) -> list[str]:
    return ["run", "--agent", "initial", "--track", "helpful", "--steps", "2", "--num-envs", "2", "--no-progress",
            "--set", f"model={tiny_lm_dir}", "--set", "max_new_tokens=4", *extra]


def test_run_end_to_end_in_its_default_folder_and_a_rerun_reuses_it(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    """(The SIGKILL test in test_loop.py runs `python -m align_env.cli run` as a subprocess.)"""
    monkeypatch.chdir(tmp_path)
    assert main(run_args(tiny_lm_dir)) == 0
    first = capsys.readouterr().out
    assert "2 steps, 4 prompts, 4 annotator calls, 0 abstentions, stopped by the steps budget" in first
    folder = re.search(r"results: (\S+)", first).group(1)
    assert re.fullmatch(r"runs/initial-helpful-s0-[0-9a-f]{10}", folder)
    assert [r["step"] for r in run_log.read(tmp_path / folder / "metrics.jsonl")] == [1, 2]
    result = json.loads((tmp_path / folder / "result.json").read_text())
    assert result["status"] == "finished" and (tmp_path / folder / result["final_checkpoint"] / "agent").is_dir()
    metrics = (tmp_path / folder / "metrics.jsonl").read_bytes()

    assert main(run_args(tiny_lm_dir)) == 0  # the same command: found, not recomputed
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / folder / "metrics.jsonl").read_bytes() == metrics

    # --set strings and typed overrides name the same run; another seed is another folder
    req = dict(overrides={"model": tiny_lm_dir, "max_new_tokens": 4}, num_envs=2, seed=0, steps=2,
               budget_prompts=None, budget_annotator_calls=None)
    assert str(default_out_dir(request("initial", "helpful", "rules", **req))) == folder
    assert str(default_out_dir(request("initial", "helpful", "rules", **req | {"seed": 1}))) != folder


@pytest.mark.parametrize(("argv", "message"), [
    (["--agent", "online-dpp"], "unknown agent 'online-dpp'. Did you mean 'online-dpo'"),
    (["--track", "sumarize"], "unknown track 'sumarize'. Did you mean 'summarize'"),
    (["--annotator", "rulez"], "unknown annotator family 'rulez'. Did you mean 'rules'"),
    (["--set", "temprature=0.5"], "no config field 'temprature'. Did you mean 'temperature'"),
    (["--set", "max_new_tokens=many"], "max_new_tokens' expects int"),
    (["--set", "oops"], "--set expects key=value"),
    (["--steps", "0"], "argument --steps: expected a positive integer"),
    (["--budget-prompts", "1"], "smaller than one batch"),
])
def test_bad_input_gets_a_clear_error(argv, message, tmp_path, capsys):
    base = {"--agent": "initial", "--track": "summarize", "--steps": "2", "--out": str(tmp_path / "r")}
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in base:
            base[flag] = value
    args = ["run", *[x for kv in base.items() for x in kv], "--num-envs", "4"]
    if argv[0] not in base:
        args += argv
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was started


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"num_envs": 0}, "num_envs must be a positive integer"),
    ({"checkpoint_every": 0}, "checkpoint_every must be a positive integer"),
    ({"out_dir": "afile"}, "afile is a file"),
    ({"out_dir": "afile/run"}, "afile is a file"),
])
def test_run_one_checks_its_arguments_before_anything_loads(kwargs, message, tmp_path, monkeypatch):
    """The library entry point (not only the CLI) rejects these before the agent is built."""
    import agents.registry
    from align_env.errors import AlignEnvError
    from benchmarks.runner import run_one

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(agents.registry, "make_agent", lambda *a, **k: pytest.fail("the agent was built"))
    with pytest.raises(AlignEnvError, match=message):
        run_one("initial", "helpful", steps=1, **kwargs)


def test_an_agent_spec_must_name_an_agent_class():
    from agents.registry import resolve_agent
    from align_env.errors import AlignEnvError

    with pytest.raises(AlignEnvError, match="is a module, not an agent class"):
        resolve_agent("os:path")
    with pytest.raises(AlignEnvError, match="is a function, not an agent class"):
        resolve_agent("json:dumps")
    with pytest.raises(AlignEnvError, match="class JSONDecoder is not an agent class; it has no act, update, save"):
        resolve_agent("json:JSONDecoder")
