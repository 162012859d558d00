"""The direct-alignment losses: against the equations evaluated by hand, and against TRL 1.16's DPOTrainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from agents.losses import DEFAULT_BETA, LOSSES, dpo_loss, ipo_loss, slic_loss

# Fixed log-probabilities: policy chosen, policy rejected, reference chosen, reference rejected.
PC = [-10.0, -3.0, -25.5, -7.0]
PR = [-12.0, -2.0, -20.0, -7.0]
RC = [-11.0, -3.5, -24.0, -6.0]
RR = [-11.5, -1.0, -21.0, -8.0]


def _h(i: int) -> float:
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def _tensors():
    return [torch.tensor(x, dtype=torch.float64) for x in (PC, PR, RC, RR)]


def test_losses_match_the_equations_on_fixed_tensors():
    # h for these numbers, worked out by hand, so a wrong sign or order shows.
    assert [_h(i) for i in range(4)] == [1.5, 1.5, -2.5, -2.0]
    for name, fn, beta, formula in [
        ("dpo", dpo_loss, 0.1, lambda h, b: -math.log(1.0 / (1.0 + math.exp(-b * h)))),
        ("ipo", ipo_loss, 1.0, lambda h, b: (h - 1.0 / (2.0 * b)) ** 2),
        ("slic", slic_loss, 0.002, lambda h, b: max(0.0, 1.0 - b * h)),
        ("slic-active", slic_loss, 0.5, lambda h, b: max(0.0, 1.0 - b * h)),
    ]:
        losses, chosen, rejected = fn(*_tensors(), beta=beta)
        for i in range(4):
            assert losses[i].item() == pytest.approx(formula(_h(i), beta), rel=1e-12), (name, i)
            assert chosen[i].item() == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-12)
            assert rejected[i].item() == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-12)
    # The hinge is inactive above its margin: beta * h >= 1.
    assert slic_loss(*_tensors(), beta=1.0)[0][0].item() == 0.0
    assert DEFAULT_BETA == {"dpo": 0.1, "ipo": 1.0, "slic": 0.002} and set(LOSSES) == {"dpo", "ipo", "slic"}


def test_loss_gradients_follow_h():
    """DPO and SLiC always push h up (chosen up, rejected down) where active; IPO pulls h to 1 / (2 beta)."""
    for name, fn in LOSSES.items():
        beta = 0.5 if name == "slic" else DEFAULT_BETA[name]
        pc, pr, rc, rr = _tensors()
        pc.requires_grad_(True)
        pr.requires_grad_(True)
        fn(pc, pr, rc, rr, beta=beta)[0].sum().backward()
        assert torch.equal(pc.grad, -pr.grad), name  # the loss depends on h only
        active = pc.grad != 0
        assert active.any(), name
        if name == "ipo":
            expected = torch.sign(torch.tensor([_h(i) - 1 / (2 * beta) for i in range(4)], dtype=torch.float64))
            assert torch.equal(torch.sign(pc.grad), expected)
        else:
            assert (pc.grad[active] < 0).all(), name  # gradient descent raises log pi(y+)


def test_rewards_are_detached():
    pc, pr, rc, rr = _tensors()
    pc.requires_grad_(True)
    _, chosen, _ = dpo_loss(pc, pr, rc, rr)
    assert not chosen.requires_grad


@pytest.fixture(scope="module")
def trl_case(eos_lm_dir, tmp_path_factory):
    """A policy whose weights differ from its reference, a batch of real prompts and responses, TRL's trainer."""
    pytest.importorskip("trl")
    from agents.policy import Policy
    from align_env.tracks import get_track

    policy = Policy(eos_lm_dir, lora=None, max_new_tokens=24)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = get_track("helpful").split("train")[:3]
    texts = [("Boil it.", "Put the egg in cold water, heat it and wait."), ("Yes", "No, never"), ("short", "")]
    prompts = [policy.prompt_ids(i.messages) for i in items]
    chosen = [policy.response_ids(c, ended=True) for c, _ in texts]
    rejected = [policy.response_ids(r, ended=k != 1) for k, (_, r) in enumerate(texts)]
    return policy, prompts, chosen, rejected, tmp_path_factory.mktemp("trl")


def _trl_loss(policy, prompts, chosen, rejected, loss_type: str, beta: float, out_dir) -> float:
    """TRL 1.16 DPOTrainer._compute_loss on the same token ids: rows [chosen..., rejected...], right-padded."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    spans = [len(p) for p in prompts] * 2
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), policy.pad_id, dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, spans)):
        ids[i, : len(row)] = torch.tensor(row)
        att[i, : len(row)] = 1
        comp[i, start: len(row)] = 1
    args = DPOConfig(output_dir=str(out_dir), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
                     bf16=False, max_length=None)
    data = Dataset.from_dict({"prompt": ["x"], "chosen": [" a"], "rejected": [" b"]})
    trainer = DPOTrainer(model=copy.deepcopy(policy.model), ref_model=copy.deepcopy(policy.reference), args=args,
                         train_dataset=data, processing_class=policy.tokenizer)
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, {"input_ids": ids, "attention_mask": att, "completion_mask": comp},
                                     False).item()


def _our_logprobs(policy, prompts, chosen, rejected):
    responses = [[c, r] for c, r in zip(chosen, rejected)]
    with torch.no_grad():
        logp, _ = policy.logprobs(prompts, responses)
        ref, _ = policy.logprobs(prompts, responses, reference=True)
    return logp.double(), ref.double()


def test_dpo_and_slic_match_trl(trl_case):
    policy, prompts, chosen, rejected, out = trl_case
    logp, ref = _our_logprobs(policy, prompts, chosen, rejected)
    h = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
    assert h.abs().max() > 0.5  # the policy differs from its reference, so the comparison has teeth
    for ours, trl_name, beta in [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 1.0), ("slic", "hinge", 0.3)]:
        mine = LOSSES[ours](logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=beta)[0].mean().item()
        theirs = _trl_loss(policy, prompts, chosen, rejected, trl_name, beta, out)
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-5), (ours, beta)


def test_ipo_matches_trl_with_per_token_log_ratios(trl_case):
    """TRL's DPOTrainer IPO divides each sequence's log-ratio by its completion length (EOS included);
    ours takes sums, so it is fed the per-token means to compare."""
    policy, prompts, chosen, rejected, out = trl_case
    logp, ref = _our_logprobs(policy, prompts, chosen, rejected)
    lengths = torch.tensor([[len(c), len(r)] for c, r in zip(chosen, rejected)], dtype=torch.float64).clamp(min=1)
    lp, rf = logp / lengths, ref / lengths
    for beta in (1.0, 0.1):
        mine = ipo_loss(lp[:, 0], lp[:, 1], rf[:, 0], rf[:, 1], beta=beta)[0].mean().item()
        theirs = _trl_loss(policy, prompts, chosen, rejected, "ipo", beta, out)
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-5), beta
        summed = ipo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=beta)[0].mean().item()
        assert abs(summed - theirs) > 1e-3  # the two forms differ here: the length normalisation matters
