"""The training loop (benchmarks.loop): metrics log, budgets, atomic checkpoints, kill-and-resume, finished runs.

Real parts only: the tiny random Llama of conftest, the built-in agents, the deterministic ``rules``
annotator, and a real SIGKILL on a real ``align-env run`` subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import align_env  # noqa: F401  (registers the envs)
from agents.registry import make_agent
from align_env.errors import AlignEnvError
from benchmarks import checkpoint as ckpt
from benchmarks import run_log
from benchmarks.loop import train
from benchmarks.runner import run_one

STEPS, NUM_ENVS, EVERY = 6, 2, 2
TIMING = ("seconds", "per_second", "rss_mb")  # measured times and memory: the only metrics allowed to differ


def dpo_args(tiny_lm_dir: str) -> dict:
    return dict(agent="online-dpo", track="summarize", annotator="rules", steps=STEPS, num_envs=NUM_ENVS, seed=3,
                checkpoint_every=EVERY, progress=False, overrides={"model": tiny_lm_dir, "max_new_tokens": 8})


def cli_args(tiny_lm_dir: str, out: Path) -> list[str]:
    return ["run", "--agent", "online-dpo", "--track", "summarize", "--annotator", "rules", "--steps", str(STEPS),
            "--num-envs", str(NUM_ENVS), "--seed", "3", "--checkpoint-every", str(EVERY), "--out", str(out),
            "--set", f"model={tiny_lm_dir}", "--set", "max_new_tokens=8", "--no-progress"]


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in records]


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    step, folder = ckpt.latest_checkpoint(run_dir)
    assert step == STEPS
    return load_file(folder / ckpt.AGENT_DIR / "adapter" / "adapter_model.safetensors")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = run_log.read(run_dir / "metrics.jsonl"), run_log.read(reference / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert deterministic(got) == deterministic(want)
    a, b = final_adapter(run_dir), final_adapter(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((run_dir / "result.json").read_text())["step"] == STEPS


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the CPU is shared, and subprocess and in-process runs then use the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_run(tiny_lm_dir, tmp_path_factory) -> Path:
    """An uninterrupted online-DPO run: the one every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_one(**dpo_args(tiny_lm_dir), out_dir=out)
    assert result["reused"] is False and result["stop_reason"] == "steps"
    return out


# -- env state -------------------------------------------------------------------------------------------
def test_vector_env_state_continues_the_same_prompts_and_rng():
    env = gym.make_vec("align_env/Helpful-v0", num_envs=7, vectorization_mode="vector_entry_point")
    env.reset(seed=5)
    actions = (["short"] * 7, ["a longer answer"] * 7)
    for _ in range(30):  # past several passes over the 150 prompts, so the order is mid-permutation
        env.step(actions)
    state = json.loads(json.dumps(env.get_state()))  # it is plain JSON data
    pending = env.current_observation()[0]
    after = [env.step(actions)[0]["prompt"] for _ in range(40)]

    fresh = gym.make_vec("align_env/Helpful-v0", num_envs=7, vectorization_mode="vector_entry_point")
    fresh.set_state(state)
    assert fresh.current_observation()[0] == pending
    assert [fresh.step(actions)[0]["prompt"] for _ in range(40)] == after
    with pytest.raises(AlignEnvError, match="num_envs"):
        gym.make_vec("align_env/Helpful-v0", num_envs=3, vectorization_mode="vector_entry_point").set_state(state)
    other = gym.make_vec("align_env/Summarize-v0", num_envs=7, vectorization_mode="vector_entry_point")
    with pytest.raises(AlignEnvError, match="split"):
        other.set_state(state)


def test_single_env_state_round_trip():
    env = gym.make("align_env/Harmless-v0").unwrapped
    env.reset(seed=1)
    state = json.loads(json.dumps(env.get_state()))
    after = [env.reset()[0]["prompt"] for _ in range(100)]
    fresh = gym.make("align_env/Harmless-v0").unwrapped
    fresh.set_state(state)
    assert [fresh.reset()[0]["prompt"] for _ in range(100)] == after


# -- checkpoints and the log, without a model ------------------------------------------------------------
def test_checkpoint_write_is_atomic_and_keeps_the_last_two(tmp_path):
    def save(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"w" * 1000)

    for step in (2, 4, 6):
        ckpt.write_checkpoint(tmp_path, step, {"step": step}, save, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]

    def crash(folder: Path) -> None:  # the agent's save dies half-way through
        (folder / "weights.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(tmp_path, 8, {"step": 8}, crash, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]  # no step-8, nothing lost
    leftovers = [p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and all("step-00000008" in n for n in leftovers)
    assert ckpt.clean_partial(tmp_path) and sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir()) == [
        "step-00000004", "step-00000006"]
    assert ckpt.read_checkpoint_state(ckpt.latest_checkpoint(tmp_path)[1]) == {"step": 6}


def test_metrics_truncate_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with run_log.MetricsLog(path) as log:
        for step in range(1, 6):
            log.append({"step": step, "loss": float("nan") if step == 2 else 0.5, "n": np.int64(step)})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in run_log.read(path)] == [1, 2, 3, 4, 5]
    assert run_log.read(path)[1]["loss"] is None and run_log.read(path)[2]["n"] == 3
    assert run_log.truncate(path, 3) == 2
    assert [r["step"] for r in run_log.read(path)] == [1, 2, 3]
    assert path.read_text().endswith("}\n")
    with pytest.raises(AlignEnvError, match="steps 1..4"):
        run_log.truncate(path, 4)


# -- the loop with real agents ---------------------------------------------------------------------------
def test_metrics_log_has_one_record_per_step_with_the_loop_and_agent_keys(reference_run):
    records = run_log.read(reference_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    loop_keys = {"step", "prompts_seen", "annotator_calls", "annotator_tokens_in", "annotator_tokens_out",
                 "annotator_seconds", "abstentions", "abstentions_step", "reward_mean", "wall_seconds",
                 "elapsed_seconds", "generated_tokens", "trained_tokens", "peak_rss_mb"}
    agent_keys = {"response_length", "pairs_used", "abstained", "ties"}
    loss_keys = {"loss", "reward_margin", "implicit_kl"}  # only when some pair was not a tie
    for r in records:
        assert loop_keys | agent_keys <= r.keys()
        assert r["peak_rss_mb"] > 0 and r["generated_tokens"] > 0
        assert (r["pairs_used"] > 0) == (loss_keys <= r.keys())
        assert r["prompts_seen"] == NUM_ENVS * r["step"]
        assert r["annotator_calls"] == NUM_ENVS * r["step"]  # rules: one judgement per pair
        assert r["abstentions"] == 0 and r["wall_seconds"] > 0
        assert r["pairs_used"] + r["ties"] + r["abstained"] == NUM_ENVS
    assert all(-1 <= r["reward_mean"] <= 1 for r in records)
    assert sum(r["pairs_used"] for r in records) >= STEPS  # most steps trained
    assert [r["elapsed_seconds"] for r in records] == sorted(r["elapsed_seconds"] for r in records)
    assert [s for s, _ in ckpt.list_checkpoints(reference_run)] == [4, 6]
    result = json.loads((reference_run / "result.json").read_text())
    assert result["step"] == STEPS and result["prompts_seen"] == STEPS * NUM_ENVS
    assert result["final_checkpoint"] == "checkpoints/step-00000006"
    assert result["final_metrics"]["step"] == STEPS
    config = json.loads((reference_run / "config.json").read_text())
    assert config["agent"]["name"] == "online-dpo" and config["agent"]["config"]["max_new_tokens"] == 8
    assert config["env"] | {"track_hash": None} == {
        "id": "align_env/Summarize-v0", "track": "summarize-v0", "track_hash": None, "source": "embedded",
        "split": "train", "feedback": "pairwise", "annotator": "rules", "num_envs": NUM_ENVS}
    assert config["seed"] == 3 and config["budget"] == {"steps": STEPS, "prompts": None, "annotator_calls": None}
    assert config["version"] == align_env.__version__
    machine = config["machine"]  # the per-machine paths, recorded (not part of the run's identity)
    assert machine["kv_cache"] == "reserved" and machine["sampler"] == "merged LoRA copy"
    assert machine["allocator"].startswith(("glibc", "no trimming")) and machine["threads"] >= 1
    assert all(r["rss_mb"] > 0 for r in records)  # resident memory after each step, to tell growth from peaks


def test_training_changed_the_parameters(reference_run):
    """The resume checks below compare real training, not a policy that never moved."""
    first = load_file(ckpt.list_checkpoints(reference_run)[0][1] / "agent" / "adapter" / "adapter_model.safetensors")
    last = final_adapter(reference_run)
    moved = [n for n in last if not torch.equal(first[n], last[n])]
    assert moved and max((first[n] - last[n]).abs().max().item() for n in moved) > 0


def test_kill_and_resume_matches_the_uninterrupted_run(tiny_lm_dir, reference_run, tmp_path):
    """`align-env run` is SIGKILLed after step 3 (a checkpoint at step 2 exists), then resumed with --resume."""
    from align_env.cli import main

    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align_env.cli", *cli_args(tiny_lm_dir, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    try:
        while not any(r["step"] >= 3 for r in run_log.read(out / "metrics.jsonl")):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists()
    killed_at = max(r["step"] for r in run_log.read(out / "metrics.jsonl"))
    assert 3 <= killed_at < STEPS and ckpt.latest_checkpoint(out)[0] in (2, 4)

    assert main(cli_args(tiny_lm_dir, out)) == 2  # unfinished: refused without --resume
    assert main([*cli_args(tiny_lm_dir, out), "--resume"]) == 0
    assert_same_run(out, reference_run)


def test_crash_during_a_checkpoint_write_loses_nothing(tiny_lm_dir, reference_run, tmp_path, monkeypatch):
    """The process dies while writing the step-4 checkpoint: step 2 stays the latest, step 4 is redone."""
    out = tmp_path / "run"
    real_fsync, calls = ckpt.fsync_tree, []

    def dying_fsync(root):
        calls.append(root)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing the step-4 checkpoint")
        real_fsync(root)

    monkeypatch.setattr(ckpt, "fsync_tree", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        run_one(**dpo_args(tiny_lm_dir), out_dir=out)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / ckpt.CHECKPOINTS).iterdir())
    assert [r["step"] for r in run_log.read(out / "metrics.jsonl")] == [1, 2, 3, 4]

    monkeypatch.setattr(ckpt, "fsync_tree", real_fsync)
    run_one(**dpo_args(tiny_lm_dir), out_dir=out, resume=True)
    assert not any(p.name.startswith(".tmp-") for p in (out / ckpt.CHECKPOINTS).iterdir())
    assert_same_run(out, reference_run)


def test_a_finished_run_is_never_overwritten(tiny_lm_dir, reference_run, tmp_path):
    before = digest(reference_run)
    again = run_one(**dpo_args(tiny_lm_dir), out_dir=reference_run, resume=True)
    assert again["reused"] is True and again["step"] == STEPS
    with pytest.raises(AlignEnvError, match="different config.*steps: 6 -> 7"):
        run_one(**(dpo_args(tiny_lm_dir) | {"steps": 7}), out_dir=reference_run)
    with pytest.raises(AlignEnvError, match="different config.*beta"):
        run_one(**dpo_args(tiny_lm_dir) | {"overrides": {"model": tiny_lm_dir, "max_new_tokens": 8, "beta": 0.5}},
                out_dir=reference_run)
    assert digest(reference_run) == before
    # train() itself (no runner) refuses a different config, before touching anything
    agent = make_agent("initial", track="summarize", seed=3, model=tiny_lm_dir, feedback="pairwise")
    env = gym.make_vec("align_env/Summarize-v0", num_envs=NUM_ENVS, vectorization_mode="vector_entry_point")
    with pytest.raises(AlignEnvError, match="different config"):
        train(agent, env, out_dir=reference_run, steps=STEPS, seed=3, progress=False)
    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(AlignEnvError, match="holds no align-env run"):
        train(agent, env, out_dir=stranger, steps=1, progress=False)
    assert digest(reference_run) == before and sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]


def test_two_processes_never_train_in_one_folder(initial_agent, tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    env = gym.make_vec("align_env/Summarize-v0", num_envs=2, vectorization_mode="vector_entry_point")
    with open(out / ".lock", "a") as held:  # another process's lock (flock is per open file, so this counts)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AlignEnvError, match="another process is training"):
            train(initial_agent, env, out_dir=out, steps=1, progress=False)
    assert train(initial_agent, env, out_dir=out, steps=1, progress=False)["step"] == 1


# -- budgets ---------------------------------------------------------------------------------------------
class HalfAbstaining:
    """A real third-party annotator: the rules verdict, except that it abstains on every other item."""

    spec, deterministic = "test:half-abstaining", True

    def __init__(self):
        from align_env.feedback import make_annotator

        self.inner, self.nones = make_annotator("rules", track="summarize"), 0

    def pairwise(self, prompts, a, b):
        verdicts = self.inner.pairwise(prompts, a, b)
        out = [None if i % 2 else v for i, v in enumerate(verdicts)]
        self.nones += sum(v is None for v in out)
        return out

    def score(self, prompts, responses):
        raise NotImplementedError


@pytest.fixture(scope="module")
def initial_agent(tiny_lm_dir):
    return make_agent("initial", track="summarize", seed=0, model=tiny_lm_dir, feedback="pairwise", max_new_tokens=4)


def test_budget_in_annotator_calls_stops_the_run(initial_agent, tmp_path):
    env = gym.make_vec("align_env/Summarize-v0", num_envs=4, vectorization_mode="vector_entry_point")
    result = train(initial_agent, env, out_dir=tmp_path / "calls", budget_annotator_calls=10, steps=100, progress=False)
    assert (result["stop_reason"], result["step"], result["annotator_calls"]) == ("annotator_calls", 3, 12)
    assert len(run_log.read(tmp_path / "calls" / "metrics.jsonl")) == 3


def test_budget_in_prompts_is_never_exceeded(initial_agent, tmp_path):
    env = gym.make_vec("align_env/Summarize-v0", num_envs=4, vectorization_mode="vector_entry_point")
    result = train(initial_agent, env, out_dir=tmp_path / "prompts", budget_prompts=10, progress=False)
    assert (result["stop_reason"], result["step"], result["prompts_seen"]) == ("prompts", 2, 8)
    with pytest.raises(AlignEnvError, match="give a budget"):
        train(initial_agent, env, out_dir=tmp_path / "none", progress=False)
    with pytest.raises(AlignEnvError, match="smaller than one batch"):
        train(initial_agent, env, out_dir=tmp_path / "small", budget_prompts=3, progress=False)


def test_abstentions_are_counted_from_the_env(initial_agent, tmp_path):
    annotator = HalfAbstaining()
    env = gym.make_vec("align_env/Summarize-v0", num_envs=4, vectorization_mode="vector_entry_point",
                       annotator=annotator)
    result = train(initial_agent, env, out_dir=tmp_path / "abst", steps=3, progress=False)
    records = run_log.read(tmp_path / "abst" / "metrics.jsonl")
    assert [r["abstentions_step"] for r in records] == [2, 2, 2]
    assert result["abstentions"] == annotator.nones == 6
    config = json.loads((tmp_path / "abst" / "config.json").read_text())
    assert config["env"]["annotator"] == "test:half-abstaining"


def test_annotator_calls_the_agent_makes_itself_count_toward_the_budget(tiny_lm_dir, tmp_path):
    """best-of-2 judges one pair per prompt at act time, the scalar env scores the chosen answer: 2 + 2 per step."""
    agent = make_agent("best-of-n", track="summarize", annotator="rules", seed=0, model=tiny_lm_dir, n=2,
                       max_new_tokens=4)
    env = gym.make_vec("align_env/Summarize-v0", num_envs=2, vectorization_mode="vector_entry_point",
                       feedback="scalar")
    result = train(agent, env, out_dir=tmp_path / "bon", budget_annotator_calls=10, progress=False)
    assert (result["step"], result["annotator_calls"], result["annotator_calls_by_agent"]) == (3, 12, 6)
    records = run_log.read(tmp_path / "bon" / "metrics.jsonl")
    assert [r["annotator_calls"] for r in records] == [4, 8, 12]
    assert "agent_annotator_calls" not in records[0]


def test_curves_average_windows_of_a_real_metrics_log(tmp_path, capsys):
    from align_env.cli import main
    from benchmarks import curves, run_log

    with run_log.MetricsLog(tmp_path / run_log.METRICS_FILE) as log:
        for step in range(1, 11):
            log.append({"step": step, "reward_margin": float(step), "loss": 1.0 / step,
                        "response_length": None if step == 3 else 10.0})
    rows = {r["metric"]: r for r in curves.table(curves.load(tmp_path), windows=2)}
    assert rows["reward_margin"]["windows"] == [3.0, 8.0] and rows["reward_margin"]["change"] == 5.0
    assert rows["response_length"]["windows"] == [10.0, 10.0]  # a missing value is skipped, not zero
    assert "implicit_kl" not in rows
    assert main(["curves", str(tmp_path), "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "steps 1-5" in out and "+5" in out and (tmp_path / "curves.png").stat().st_size > 1000
    assert main(["curves", str(tmp_path / "nope")]) == 2
    assert "argument run_dir: no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["curves", str(tmp_path / "empty")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_curves_report_malformed_lines_by_number_and_label_windows_by_step(tmp_path, capsys):
    """Malformed lines are left out with a warning naming their line numbers; the valid ones are shown, and
    the windows are labelled by the steps they hold (here a log that starts at step 11)."""
    from align_env.cli import main

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(11, 21)]
    lines[2] = "{not json"
    lines[5] = json.dumps([1, 2])
    lines.insert(7, json.dumps({"step": "x", "loss": 0.5}))
    lines.insert(8, json.dumps({"step": 12, "loss": 0.5}))  # a step seen before
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo', encoding="utf-8")
    assert main(["curves", str(tmp_path), "--windows", "2", "--no-plot"]) == 0
    out, err = capsys.readouterr()
    assert "4 malformed line(s) left out: line 3: not JSON" in err and "line 6: a JSON list" in err
    assert "line 8: step 'x' is not a positive integer" in err and "line 9: step 12 again" in err
    assert "line 12" not in err  # the torn last line of a run still writing is not a problem
    assert "steps 11-15" in out and "steps 17-20" in out and "loss" in out  # steps 13 and 16 left out

    assert main(["curves", str(tmp_path), "--metrics", "los"]) == 2
    assert "unknown metric 'los'. Did you mean 'loss'" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("garbage\n", encoding="utf-8")
    assert main(["curves", str(tmp_path)]) == 2
    assert "line 1: not JSON" in (err := capsys.readouterr().err) and "holds no complete step" in err


# -- corrupt checkpoints and logs at resume --------------------------------------------------------------
def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy_unfinished(reference: Path, dest: Path) -> Path:
    """The reference run as if killed after its last checkpoint (result.json removed)."""
    import shutil

    shutil.copytree(reference, dest)
    (dest / "result.json").unlink()
    return dest


@pytest.mark.parametrize("damage", ["flip_adapter", "truncate_optimizer", "agent_json_wrong_type",
                                    "state_is_a_folder"])
def test_resume_falls_back_to_the_previous_intact_checkpoint(tiny_lm_dir, reference_run, tmp_path, capsys, damage):
    """Step 6 is damaged: the resume says so, sets it aside, redoes steps 5-6 from step 4: the same numbers."""
    out = _copy_unfinished(reference_run, tmp_path / "run")
    newest = out / ckpt.CHECKPOINTS / "step-00000006"
    if damage == "flip_adapter":
        _flip_middle_byte(newest / ckpt.AGENT_DIR / "adapter" / "adapter_model.safetensors")
    elif damage == "truncate_optimizer":
        target = newest / ckpt.AGENT_DIR / "trainer.pt"  # the optimizer's state
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "agent_json_wrong_type":
        weights = newest / ckpt.AGENT_DIR / "adapter" / "adapter_model.safetensors"
        (newest / ckpt.AGENT_DIR / "agent.json").write_bytes(weights.read_bytes())
    else:
        (newest / ckpt.STATE_FILE).unlink()
        (newest / ckpt.STATE_FILE).mkdir()
    run_one(**dpo_args(tiny_lm_dir), out_dir=out, resume=True)
    err = capsys.readouterr().err
    assert "step-00000006" in err and "resuming from the previous intact checkpoint, step 4" in err
    assert {"flip_adapter": "adapter_model.safetensors does not match its SHA-256",
            "truncate_optimizer": "trainer.pt is truncated", "agent_json_wrong_type": "agent.json is longer than",
            "state_is_a_folder": "state.json is a folder"}[damage] in err
    assert (out / ckpt.CHECKPOINTS / "corrupt-step-00000006").is_dir()
    assert_same_run(out, reference_run)


def test_resume_without_an_intact_checkpoint_or_with_a_lost_log_is_an_error(tiny_lm_dir, reference_run, tmp_path):
    out = _copy_unfinished(reference_run, tmp_path / "none")
    for _, folder in ckpt.list_checkpoints(out):
        (folder / ckpt.STATE_FILE).write_text("{}")  # same kind of file, other content
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint to resume from"):
        run_one(**dpo_args(tiny_lm_dir), out_dir=out, resume=True)

    out = _copy_unfinished(reference_run, tmp_path / "lost")
    (out / "metrics.jsonl").unlink()
    with pytest.raises(AlignEnvError, match=r"metrics.jsonl is missing but the checkpoint is at step 6"):
        run_one(**dpo_args(tiny_lm_dir), out_dir=out, resume=True)
    assert not (out / "result.json").exists()

    out = _copy_unfinished(reference_run, tmp_path / "edited")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = "not json at all"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(AlignEnvError, match=r"malformed lines \(line 3: not JSON"):
        run_one(**dpo_args(tiny_lm_dir), out_dir=out, resume=True)

    out = _copy_unfinished(reference_run, tmp_path / "foreign")
    records = run_log.read(out / "metrics.jsonl")
    records[-1]["annotator_calls"] += 5
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(AlignEnvError, match=r"record of step 6 disagrees with the checkpoint on annotator_calls"):
        run_one(**dpo_args(tiny_lm_dir), out_dir=out, resume=True)
