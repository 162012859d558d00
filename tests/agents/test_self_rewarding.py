"""Self-rewarding (agents/self_rewarding.py): iterations, the self judge, monitoring only, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent
from align_env.errors import AlignEnvError
from align_env.testing import check_agent
from align_env.tracks import get_track
from tests.agents.test_agents import TRACK, _env, _mean_chars, _run, _snapshot

FAST = dict(max_new_tokens=12, judge_mode="expected", judge_eval_pairs=4, warmup_steps=0)


def _agent(model: str, annotator: str = "shorter", **config):
    config = FAST | config
    return make_agent("self-rewarding", track=TRACK, annotator=annotator, seed=0, model=model, **config)


# -- conformance ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(steps_per_iteration=1, iterations=4),
                                    dict(steps_per_iteration=2, iterations=3, lora=False, lr=1e-4),
                                    dict(judge="shorter", steps_per_iteration=1, iterations=2)])
def test_check_agent_passes_on_self_rewarding(eos_lm_dir, config):
    """steps_per_iteration=1: check_agent's steps cross iteration boundaries (fold, new reference) around its
    save/load; after the last iteration the agent only samples."""
    agent = _agent(eos_lm_dir, **config)
    check_agent(agent, _env("pairwise", num_envs=3))
    assert agent.iteration >= 1 and len(agent.history) == agent.iteration


def test_iteration_trains_with_the_previous_model_as_reference(eos_lm_dir):
    """After an iteration, the reference is M_{t+1}: reference and policy log-probabilities agree; the base
    weights changed (adapters folded in) and the reference is no longer M_0."""
    agent = _agent(eos_lm_dir, steps_per_iteration=2, iterations=2, lr=1e-3)
    pol = agent.policy
    items = get_track(TRACK).split("eval")[:3]
    prompts = [pol.prompt_ids(i.messages) for i in items]
    responses = [[pol.response_ids("short answer"), pol.response_ids("Yes. No. Maybe.")] for _ in items]
    ref0, _ = pol.logprobs(prompts, responses, reference=True)
    log, _ = _run(agent, _env("pairwise"), steps=2)
    assert log[-1]["iteration_iteration"] == 1 and log[-1]["iteration_pairs_kept"] > 0
    assert log[-1]["iteration_empty"] == 0 and np.isfinite(log[-1]["loss"])
    with torch.no_grad():
        now, _ = pol.logprobs(prompts, responses)
    ref1, _ = pol.logprobs(prompts, responses, reference=True)
    torch.testing.assert_close(ref1, now, rtol=1e-4, atol=1e-4)
    assert (ref1 - ref0).abs().max() > 1e-3
    assert all(float(m.lora_B["default"].weight.abs().max()) == 0.0 for m in _lora_layers(pol.model))


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


# -- the env's annotator is monitoring only --------------------------------------------------------------------
def test_no_env_verdict_reaches_the_updates(eos_lm_dir):
    """The same agent (same seed, a deterministic judge) against an env that prefers shorter answers and one that
    abstains on everything ends with bitwise the same weights and the same iteration logs."""
    runs = []
    for annotator in ("shorter", "shorter?abstain_every=1"):
        agent = _agent(eos_lm_dir, annotator=annotator, judge="shorter", steps_per_iteration=2, iterations=2, lr=1e-3)
        log, _ = _run(agent, _env("pairwise", annotator=annotator), steps=4)
        runs.append((agent, log))
    (a, log_a), (b, log_b) = runs
    assert any("env_agreement" in m for m in log_a) and not any("env_agreement" in m for m in log_b)
    sa, sb = _snapshot(a.policy.model), _snapshot(b.policy.model)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    drop = ("train_seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in a.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in b.history]
    assert sum(h["pairs_kept"] for h in a.history) > 0


def test_env_agreement_is_how_often_the_env_prefers_the_self_chosen_answer(eos_lm_dir):
    """With the judge = the env's own preference (shorter), every kept pair is (shorter, longer): agreement 1."""
    agent = _agent(eos_lm_dir, judge="shorter", steps_per_iteration=4, iterations=1)
    log, _ = _run(agent, _env("pairwise"), steps=2)
    assert [m["env_agreement"] for m in log if "env_agreement" in m] == [1.0, 1.0]


# -- learning, judge accuracy -----------------------------------------------------------------------------------
def test_iterations_move_the_policy_toward_what_the_judge_prefers(eos_lm_dir):
    """3 iterations x 4 steps x 4 prompts x N=4 candidates with a judge that scores shorter answers higher cut
    the held-out answer length by more than 40%; the candidates shrink iteration after iteration."""
    agent = _agent(eos_lm_dir, max_new_tokens=24, judge="shorter", steps_per_iteration=4, iterations=3, epochs=2,
                   train_batch=4)
    start = _mean_chars(agent)
    _run(agent, _env("pairwise"), steps=12)
    end = _mean_chars(agent)
    assert end < 0.6 * start, (start, end)
    lengths = [h["mean_length_chars"] for h in agent.history]
    assert len(lengths) == 3 and lengths[2] < lengths[0], lengths


def test_judge_accuracy_is_logged_per_iteration_on_the_report_half(eos_lm_dir):
    """A judge that prefers shorter answers: its logged accuracy is the share of report-half pairs whose chosen
    answer is shorter (ties 0.5), computed here independently, at the start and end of each iteration."""
    agent = _agent(eos_lm_dir, judge="shorter", steps_per_iteration=1, iterations=2, judge_eval_pairs=30)
    _run(agent, _env("pairwise"), steps=2)
    pairs = get_track(TRACK).report_pairs
    expected = float(np.mean([1.0 if len(p.chosen) < len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected)
                              else 0.0 for p in pairs]))
    assert [h["iteration"] for h in agent.history] == [1, 2]
    for h in agent.history:
        assert h["judge_accuracy_start"] == h["judge_accuracy_end"] == pytest.approx(expected)
    self_judged = _agent(eos_lm_dir, steps_per_iteration=1, iterations=2)
    log, _ = _run(self_judged, _env("pairwise"), steps=2)
    for h in self_judged.history:  # the model's own judgement: a number per iteration
        assert 0.0 <= h["judge_accuracy_end"] <= 1.0 and "mean_length_tokens" in h
    assert log[1]["iteration_judge_accuracy_start"] == log[0]["iteration_judge_accuracy_end"]


def test_eft_uses_the_selection_half_only_and_lowers_its_loss(eos_lm_dir):
    agent = _agent(eos_lm_dir, eft=True, eft_epochs=3, lr=1e-3, steps_per_iteration=1, iterations=1)
    track = get_track(TRACK)
    examples = agent.eft_examples()
    assert len(examples) == 2 * len(track.selection_pairs)
    (metrics,), _ = _run(agent, _env("pairwise"), steps=1)
    assert metrics["eft_examples"] == len(examples) and metrics["eft_loss_last"] < metrics["eft_loss_first"]
    report = {p.chosen for p in track.report_pairs} | {p.rejected for p in track.report_pairs}
    selection = {p.chosen for p in track.selection_pairs} | {p.rejected for p in track.selection_pairs}
    decoded = [agent.policy.tokenizer.decode(prompt) for prompt, _ in examples]
    only_report = report - selection
    assert only_report and not any(r in text for r in only_report for text in decoded)  # no report-half response
    assert len(agent.folded) == 2  # EFT, then iteration 1, each folded into the base


# -- bad input --------------------------------------------------------------------------------------------------
def test_a_judge_that_never_scores_keeps_nothing_and_says_so(eos_lm_dir):
    """The tiny random model never writes "Score: s": every judgement is unparseable, the iteration keeps no pair,
    warns, trains nothing, and the next iteration starts (no crash, no endless loop)."""
    agent = _agent(eos_lm_dir, judge_mode="generate", judge_samples=2, judge_max_new_tokens=6,
                   steps_per_iteration=1, iterations=2, judge_eval_pairs=2)
    before = _snapshot(agent.policy.model)
    with pytest.warns(RuntimeWarning, match="iteration 1 kept no pair .* 16 unparseable judgements"):
        log, _ = _run(agent, _env("pairwise", num_envs=2), steps=1)
    assert log[0]["iteration_empty"] == 1 and log[0]["iteration_pairs_kept"] == 0
    assert log[0]["iteration_unparseable"] == 2 * 4 * 2 and log[0]["iteration_unscored_prompts"] == 2
    assert "loss" not in log[0]
    after = _snapshot(agent.policy.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.warns(RuntimeWarning, match="iteration 2 kept no pair"):
        log, _ = _run(agent, _env("pairwise", num_envs=2), steps=2)
    assert agent.done and log[-1]["pairs_kept"] == 0


def test_bad_self_rewarding_configs_are_clear_errors(eos_lm_dir):
    with pytest.raises(AlignEnvError, match="n_candidates >= 2 to form a pair \\(got 1\\)"):
        _agent(eos_lm_dir, n_candidates=1)
    with pytest.raises(AlignEnvError, match="judge_mode"):
        _agent(eos_lm_dir, judge_mode="guess")
    with pytest.raises(AlignEnvError, match="iterations >= 1"):
        _agent(eos_lm_dir, iterations=0)
    with pytest.raises(AlignEnvError, match="eft_rejected_score < eft_chosen_score"):
        _agent(eos_lm_dir, eft_chosen_score=1, eft_rejected_score=3)


# -- resume -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [True, False])
def test_resumed_self_rewarding_ends_with_the_same_parameters(eos_lm_dir, tmp_path, lora):
    """5 steps straight vs 3 steps (one iteration folded, one half collected), save, a fresh agent loads, 2 more."""
    config = dict(steps_per_iteration=2, iterations=3, lr=1e-3, lora=lora)
    straight = _agent(eos_lm_dir, **config)
    _run(straight, _env("pairwise"), steps=5)
    first = _agent(eos_lm_dir, **config)
    env = _env("pairwise")
    _, obs = _run(first, env, steps=3)
    first.save(tmp_path / "ckpt")
    del first
    resumed = _agent(eos_lm_dir, **config)
    resumed.load(tmp_path / "ckpt")
    _run(resumed, env, steps=2, obs=obs)
    a, b = _snapshot(straight.policy.model), _snapshot(resumed.policy.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    drop = ("train_seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in straight.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in resumed.history]
    assert len(resumed.history) == 2


# -- the `self` annotator family ----------------------------------------------------------------------------------
def test_annotator_self_judges_with_the_agents_own_model_in_a_run(eos_lm_dir, tmp_path):
    """`align-env run --annotator self`: the runner binds the judge to the agent's current model (a pointwise
    judge scores each answer of a pair: two calls per pair)."""
    from benchmarks.runner import run_one

    result = run_one("online-dpo", TRACK, "self?pointwise=expected", steps=2, num_envs=2, out_dir=tmp_path / "run",
                     progress=False, overrides={"model": eos_lm_dir, "max_new_tokens": 8})
    assert result["step"] == 2 and result["annotator_calls"] == 2 * 4 and result["abstentions"] == 0
    with pytest.raises(AlignEnvError, match="judges with the agent's own model, but this agent has none"):
        from align_env.feedback import make_annotator
        from align_env.feedback.factories import bind_self

        bind_self(make_annotator("self", track=TRACK), None)
