"""RLSF-PPO (agents/rlsf.py) end to end on tiny random Llamas: the pipeline's stages, check_agent, kill and resume.

"big" is the tiny Llama whose answers end by themselves (``eos_lm_dir``), "small" the plain one; both are random,
so the numbers test the machinery (stages, counts, resumes), not alignment quality.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from agents import make_agent
from agents.rlsf import STAGES
from agents.stages import MANIFEST
from align_env.env import AlignVectorEnv
from align_env.errors import AlignEnvError
from align_env.testing import check_agent
from benchmarks import run_log
from benchmarks.runner import run_one

TRACK = "helpful"
TIMING = ("seconds", "per_second", "rss_mb")


def _config(big: str, small: str, work: Path, **extra) -> dict:
    config = dict(model=big, configurations=f"{big}|1|faithful; {big}|0|-; {small}|1|poor; {small}|0|-",
                  ranking_rules=f"model: {big} > {small}; shots: 1 > 0; demos: faithful > poor",
                  synth_prompts=4, rmsp_prompts=4, rmsp_n=2, max_new_tokens=8, rm_lr=1e-3, rm_epochs=2,
                  sft_epochs=1, sft_lr=1e-3, ppo_epochs=1, minibatch_size=2, lora_r=4, lora_alpha=8,
                  ppo_lr=1e-3, work_dir=str(work))
    return config | extra


@pytest.fixture
def config(eos_lm_dir, tiny_lm_dir, tmp_path):
    return _config(eos_lm_dir, tiny_lm_dir, tmp_path / "work")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_pipeline_saves_every_stage_and_check_agent_passes(config):
    agent = make_agent("rlsf-ppo", track=TRACK, annotator="shorter", seed=0, **config)
    check_agent(agent, AlignVectorEnv(num_envs=3, track=TRACK, feedback="scalar", annotator="shorter"))
    work = Path(config["work_dir"])
    for name in STAGES:
        assert (work / name / MANIFEST).is_file(), name
    s = agent.summary
    # 4 prompts x C(4, 2) = 24 configuration pairs, each kept or dropped by exactly one rule
    assert s["comparisons"]["pairs"] == 24
    assert s["comparisons"]["kept"] + sum(s["comparisons"]["dropped"].values()) == 24
    # big|0 vs small|1 (larger model, fewer shots) is the one same-rank pair per prompt, unless an answer is empty
    assert 0 < s["comparisons"]["dropped"]["same_rank"] <= 4
    assert s["reward_model"]["pairs"] == s["comparisons"]["kept"] and s["reward_model"]["report_pairs"] == 30
    assert 0.0 <= s["reward_model"]["report_accuracy"] <= 1.0
    assert s["rmsp"]["best_configuration"].endswith("|1|faithful") and s["rmsp"]["demonstrations"] == 4
    assert s["rmsp"]["kept_score"] >= s["rmsp"]["candidate_score"]  # the RM's pick is its best-scored candidate
    assert any("dropped per rule" in m for m in agent.messages)


def test_training_labels_need_no_annotator_calls(config, tmp_path):
    result = run_one("rlsf-ppo", TRACK, "shorter", steps=2, num_envs=2, seed=0, out_dir=tmp_path / "run",
                     checkpoint_every=1, progress=False, overrides=config)
    records = run_log.read(tmp_path / "run" / "metrics.jsonl")
    assert result["annotator_calls_by_agent"] == 0  # nothing the agent trained on came from an annotator
    assert result["annotator_calls"] == 2 * 2  # the env's monitoring judgements, counted apart
    for r in records:
        assert np.isfinite(r["kl"]) and np.isfinite(r["policy_loss"]) and r["rm_calls"] == 2
        assert "monitor_score" in r and "clip_fraction" in r and "entropy" in r and "value_loss" in r
    assert 0.0 <= records[0]["rm_report_accuracy"] <= 1.0


def test_a_kill_between_stages_resumes_to_the_same_outputs(eos_lm_dir, tiny_lm_dir, tmp_path, monkeypatch):
    straight = make_agent("rlsf-ppo", track=TRACK, seed=0, **_config(eos_lm_dir, tiny_lm_dir, tmp_path / "a"))
    straight.prepare()

    import agents.rlsf as rlsf

    real = rlsf.RLSFPPO._rmsp

    def killed(self, work):
        (work / "half-written.json").write_text("{")
        raise KeyboardInterrupt("killed during RMSP")

    monkeypatch.setattr(rlsf.RLSFPPO, "_rmsp", killed)
    cut = make_agent("rlsf-ppo", track=TRACK, seed=0, **_config(eos_lm_dir, tiny_lm_dir, tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        cut.prepare()
    assert not (tmp_path / "b" / "rmsp").exists()  # a half-written stage never takes the stage's name
    monkeypatch.setattr(rlsf.RLSFPPO, "_rmsp", real)
    again = make_agent("rlsf-ppo", track=TRACK, seed=0, **_config(eos_lm_dir, tiny_lm_dir, tmp_path / "b"))
    again.prepare()
    assert again.stages.recomputed == ["rmsp", "sft"]  # the first three stages were reused
    for name in STAGES:
        a, b = _digest(tmp_path / "a" / name), _digest(tmp_path / "b" / name)
        a.pop(MANIFEST), b.pop(MANIFEST)
        assert a == b, name
        assert {k: v for k, v in straight.summary[name].items() if k != "seconds"} == {
            k: v for k, v in again.summary[name].items() if k != "seconds"}, name

    # a corrupt stage output is recomputed, never read: the same bytes come back
    target = tmp_path / "b" / "comparisons" / "comparisons.json"
    target.write_text(target.read_text()[:40])
    third = make_agent("rlsf-ppo", track=TRACK, seed=0, **_config(eos_lm_dir, tiny_lm_dir, tmp_path / "b"))
    third.prepare()
    assert third.stages.recomputed[0] == "comparisons"
    assert any("corrupt" in m for m in third.messages)
    assert _digest(tmp_path / "a" / "sft") | {MANIFEST: ""} == _digest(tmp_path / "b" / "sft") | {MANIFEST: ""}


def test_a_kill_within_ppo_resumes_to_the_same_run(config, tmp_path, monkeypatch):
    args = dict(steps=4, num_envs=2, seed=0, checkpoint_every=1, progress=False, overrides=config)
    run_one("rlsf-ppo", TRACK, "shorter", out_dir=tmp_path / "ref", **args)

    import agents.rlsf as rlsf

    real, calls = rlsf.RLSFPPO.update, {"n": 0}

    def dies_at_third(self, transitions):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed in the third PPO update")
        return real(self, transitions)

    monkeypatch.setattr(rlsf.RLSFPPO, "update", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_one("rlsf-ppo", TRACK, "shorter", out_dir=tmp_path / "cut", **args)
    monkeypatch.setattr(rlsf.RLSFPPO, "update", real)
    run_one("rlsf-ppo", TRACK, "shorter", out_dir=tmp_path / "cut", resume=True, **args)

    def deterministic(path):
        return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in run_log.read(path)]

    ref, cut = deterministic(tmp_path / "ref" / "metrics.jsonl"), deterministic(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert ref == cut
    assert ref[-1]["ppo_optimizer_steps"] == 4  # training happened: one minibatch of 2 per step


def test_bad_configs_are_clear_errors(config):
    with pytest.raises(AlignEnvError, match="ranking rules contradict each other"):
        make_agent("rlsf-ppo", track=TRACK, **(config | {"ranking_rules": "shots: 1 > 0; shots: 0 > 1"}))
    with pytest.raises(AlignEnvError, match="order no two of the configurations"):
        make_agent("rlsf-ppo", track=TRACK, **(config | {"ranking_rules": "model: x > y"}))
    with pytest.raises(AlignEnvError, match="need rmsp_n >= 1, ppo_epochs >= 1|need ppo_epochs >= 1, rmsp_n >= 1"):
        make_agent("rlsf-ppo", track=TRACK, **(config | {"rmsp_n": 0, "ppo_epochs": 0}))


def test_loading_a_checkpoint_of_other_pipeline_outputs_is_refused(config, tmp_path):
    agent = make_agent("rlsf-ppo", track=TRACK, seed=0, **config)
    agent.prepare()
    agent.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "agent.json").read_text())
    meta["state"]["stage_keys"]["sft"] = "0" * 16
    (tmp_path / "ckpt" / "agent.json").write_text(json.dumps(meta))
    with pytest.raises(AlignEnvError, match="trained on other pipeline outputs"):
        make_agent("rlsf-ppo", track=TRACK, seed=0, **config).load(tmp_path / "ckpt")


def test_a_reward_model_that_outputs_nan_stops_ppo_with_a_clear_error(config):
    import torch

    from agents import Transitions
    from agents.reward_trainer import RewardModelNaNError

    agent = make_agent("rlsf-ppo", track=TRACK, seed=0, **config)
    env = AlignVectorEnv(num_envs=2, track=TRACK, feedback="scalar", annotator="shorter")
    obs, _ = env.reset(seed=0)
    agent.prepare()
    with torch.no_grad():
        agent.reward_model.model.score.weight.fill_(float("nan"))
    action = agent.act(obs)
    _, rewards, _, _, infos = env.step(action)
    with pytest.raises(RewardModelNaNError, match="non-finite scores.*the last checkpoint is kept"):
        agent.update(Transitions.from_vector_step(action, rewards, infos))
    assert agent.trainer.optimizer_steps == 0  # nothing was trained on the broken scores


def test_multi_turn_self_play_keeps_one_demonstration_per_assistant_turn(config):
    agent = make_agent("rlsf-ppo", track=TRACK, seed=0, **(config | {"rmsp_turns": 2}))
    agent.prepare()
    demos = json.loads((Path(config["work_dir"]) / "rmsp" / "demonstrations.json").read_text())
    assert len(demos) == 4 * 2 and agent.summary["rmsp"]["demonstrations"] == 8
    first, second = demos[:4], demos[4:]
    for a, b in zip(first, second):
        # turn 2 continues turn 1's dialogue: its kept answer, then a simulated user turn
        assert b["messages"][: len(a["messages"])] == a["messages"]
        assert b["messages"][len(a["messages"])] == {"role": "assistant", "content": a["response"]}
        assert b["messages"][-1]["role"] == "user" and b["messages"][-1]["content"]
