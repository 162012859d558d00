"""``micro_pairs`` bounds an update's memory without changing it: same loss, metrics and gradients."""

from __future__ import annotations

import pytest
import torch

from agents.pair_trainer import PairTrainer, PairTrainingConfig, make_policy


def _batch(seed: int = 0, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = lambda lo, hi: torch.randint(3, 60, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return [ids(4, 12) for _ in range(n)], [ids(1, 9) for _ in range(n)], [ids(1, 9) for _ in range(n)]


def _update(model_dir, micro_pairs: int, loss: str = "dpo", **settings):
    config = PairTrainingConfig(model=str(model_dir), loss=loss, grad_accum=2, micro_pairs=micro_pairs, **settings)
    torch.manual_seed(0)
    policy = make_policy(config, seed=0)
    with torch.no_grad():  # adapters off zero so that policy and reference differ
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    trainer = PairTrainer(policy, config)
    metrics = trainer.train(*_batch())  # grad_accum=2: no optimizer step, gradients stay for comparison
    return metrics, [p.grad.clone() for p in trainer.params]


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("micro_pairs", [1, 2])
def test_micro_pairs_give_the_full_batch_update(eos_lm_dir, micro_pairs, loss):
    full, full_grads = _update(eos_lm_dir, 0, loss)
    chunked, chunked_grads = _update(eos_lm_dir, micro_pairs, loss)
    assert set(full) == set(chunked)
    for key in full:
        assert chunked[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(full_grads, chunked_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("micro_pairs", [0, 2])
def test_bf16_base_gives_the_same_update(eos_lm_dir, micro_pairs):
    """Frozen base weights stored in bf16 are what bf16 autocast casts them to: the same loss and gradients."""
    plain, plain_grads = _update(eos_lm_dir, micro_pairs, bf16=True)
    stored, stored_grads = _update(eos_lm_dir, micro_pairs, bf16=True, bf16_base=True)
    assert set(plain) == set(stored)
    for key in plain:
        assert stored[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
    for a, b in zip(plain_grads, stored_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_bf16_base_is_refused_where_it_would_change_numbers(eos_lm_dir):
    from align_env.errors import AlignEnvError

    with pytest.raises(AlignEnvError, match="bf16_base only with lora and bf16"):
        PairTrainingConfig(model=str(eos_lm_dir), bf16_base=True)
    policy = make_policy(PairTrainingConfig(model=str(eos_lm_dir), bf16=True, bf16_base=True), seed=0)
    dtypes = {n: p.dtype for n, p in policy.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "base_layer" in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n} == {torch.float32}
    with pytest.raises(AlignEnvError, match="round most of them away"):
        policy.merge_adapters()
