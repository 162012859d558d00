"""PPO machinery for RLHF-style policy optimisation against a scalar reward (``docs/algorithms.md``, section 4).

Shared by any agent that optimises a causal-LM policy with PPO (RLSF-PPO first); none imports another agent.
With a response ``y = (y_1..y_T)`` to prompt ``x``, state ``s_t = (x, y_<t)``, the current policy pi_theta, the
rollout policy pi_old (the weights that sampled ``y``) and the reference pi_ref (the SFT policy):

* per-token reward (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020, eq. 1)::

      r_t = -kl_coef * (log pi_old(y_t|s_t) - log pi_ref(y_t|s_t))  +  [t = T] * score(x, y)

* GAE (Schulman et al. 2016, arXiv 1506.02438, eq. 16), with ``V_{T+1} = 0``::

      delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),     A_t = delta_t + gamma * lam * A_{t+1},     R_t = A_t + V(s_t)

* clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), ``rho_t = pi_theta / pi_old``::

      L_pi = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

* clipped value loss (as in the OpenAI baselines / TRL PPO)::

      V_clip = V_old + clip(V - V_old, -eps_v, eps_v),     L_V = 1/2 mean_t max((V - R)^2, (V_clip - R)^2)

* the loss of a minibatch ``L = L_pi + vf_coef * L_V - entropy_coef * H``; ``ppo_epochs`` passes over the
  rollout in shuffled minibatches of ``minibatch_size`` sequences;
* the KL coefficient is fixed, or adaptive (Ziegler et al. 2019, sec. 2.2) towards ``kl_target``::

      e = clip(KL / kl_target - 1, -0.2, 0.2),     kl_coef <- kl_coef * (1 + e * n / kl_horizon)

  with ``KL`` the rollout's mean summed per-sequence KL and ``n`` the rollout's number of sequences.

The value head is a linear layer on the policy's last hidden state (a shared backbone: with LoRA the value
loss also trains the adapters, as TRL's ``AutoModelForCausalLMWithValueHead`` did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agents.pair_trainer import NonFiniteLossError
from agents.policy import Policy, autocast
from align_env.errors import AlignEnvError

PPO_FILE = "ppo.pt"


# -- the equations ----------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the mean is added back with ``shift_mean=False``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return (white if shift_mean else white + mean) * mask


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, kl)``: per-token rewards ``-kl_coef * kl_t`` plus the score at each sequence's last token."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores * (mask.sum(-1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (``[B, T]``, right-padded; padding is 0, ``V`` past T is 0)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate ``L_pi`` and the fraction of tokens where the clipped term was the larger one."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss ``L_V`` and the fraction of tokens where the clipped error was the larger one."""
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(plain, clipped), mask), masked_mean((clipped > plain).float(), mask)


class KLController:
    """Fixed (``target=None``) or adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2; see the module doc)."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init), target, int(horizon)

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n / self.horizon


# -- settings ---------------------------------------------------------------------------------------------
@dataclass
class PPOSettings:
    """PPO settings (defaults: TRL's PPO / Ziegler et al. unless the help says why not)."""

    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout (TRL: 4)"})
    minibatch_size: int = field(default=2, metadata={"help": "sequences per PPO minibatch (one optimizer step each)"})
    clip_range: float = field(default=0.2, metadata={"help": "eps of the clipped surrogate (PPO paper: 0.2)"})
    clip_range_value: float = field(default=0.2, metadata={"help": "eps_v of the value clipping (TRL: 0.2)"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss (TRL: 0.1)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus (RLHF practice: 0)"})
    gamma: float = field(default=1.0, metadata={"help": "discount (RLHF practice: 1, episodes are one answer)"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (TRL: 0.95)"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial KL coefficient beta (TRL: 0.05)"})
    kl_target: float | None = field(default=None, metadata={
        "help": "adaptive KL: target summed per-sequence KL in nats (Ziegler et al.: 6); None keeps beta fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon in sequences (Ziegler: 10000)"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages per rollout (TRL: yes)"})
    ppo_lr: float = field(default=1e-4, metadata={
        "help": "learning rate of the PPO phase (LoRA adapters + value head; TRL's 1.41e-5 is for full weights)"})
    ppo_max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient-norm clip; None disables"})
    max_nonfinite: int = field(default=10, metadata={"help": "non-finite minibatch losses in a row that stop a run"})

    def check_ppo(self) -> list[str]:
        """The names of the violated conditions (the caller raises one error naming them all)."""
        checks = {"ppo_epochs >= 1": self.ppo_epochs >= 1, "minibatch_size >= 1": self.minibatch_size >= 1,
                  "clip_range > 0": self.clip_range > 0, "clip_range_value > 0": self.clip_range_value > 0,
                  "vf_coef >= 0": self.vf_coef >= 0, "0 <= gamma <= 1": 0 <= self.gamma <= 1,
                  "0 <= lam <= 1": 0 <= self.lam <= 1, "kl_coef >= 0": self.kl_coef >= 0,
                  "kl_target > 0 or None": self.kl_target is None or self.kl_target > 0,
                  "kl_horizon >= 1": self.kl_horizon >= 1, "ppo_lr > 0": self.ppo_lr > 0,
                  "max_nonfinite >= 1": self.max_nonfinite >= 1}
        return [name for name, ok in checks.items() if not ok]


# -- the model side ---------------------------------------------------------------------------------------
class ValueHead(torch.nn.Module):
    """``V(s_t) = w . h_t + b`` on the policy's last hidden state (seeded small initial weights)."""

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1), generator=gen)
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def _rows(prompts, responses, pad: int):
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    t_max = max(1, max(len(r) for r in responses))
    index = torch.zeros((len(rows), t_max), dtype=torch.long)
    targets = torch.full((len(rows), t_max), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t_max))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
        attn[i, : len(rows[i])] = 1
        index[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        targets[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1.0
    return ids, attn, index, targets, mask


def token_forward(model, value_head: ValueHead | None, prompts, responses, pad: int, bf16: bool = False):
    """Per response token: ``log pi(y_t|s_t)``, ``V(s_t)`` (None without a head), entropy of pi(.|s_t); and the mask.

    Each prompt+response is one right-padded row; position ``len(prompt) - 1 + t`` holds the state ``s_t``.
    """
    ids, attn, index, targets, mask = _rows(prompts, responses, pad)
    with autocast(bf16):
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=value_head is not None)
    logits = out.logits.float().gather(1, index.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
    logsm = F.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logsm.exp() * logsm).sum(-1) * mask
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1]
        hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        values = value_head(hidden) * mask
    return logp, values, entropy, mask


@dataclass
class Rollout:
    """A batch of sampled responses with what PPO needs from the moment they were sampled (all ``[B, T]``)."""

    prompts: list
    responses: list
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor


class PPOTrainer:
    """PPO epochs over rollouts of a :class:`agents.policy.Policy` with a value head (see the module docstring).

    The reference is the policy's own (LoRA: adapters disabled; full fine-tuning: the frozen copy), so a policy
    built on the SFT weights gets the KL to pi_SFT. ``step(prompts, responses, scores)`` makes one rollout's
    update; its state (value head, optimizer, KL coefficient, minibatch RNG, counters) goes into ``ppo.pt``.
    """

    def __init__(self, policy: Policy, settings: PPOSettings, seed: int = 0):
        self.policy, self.s = policy, settings
        hidden = policy.model.config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden, seed)
        self.params = policy.trainable_parameters() + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.ppo_lr, weight_decay=0.0)
        self.kl = KLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        self.rng = np.random.default_rng([seed, 7])  # minibatch order, apart from any sampling stream
        self.rollouts = self.optimizer_steps = self.nonfinite_run = self.nonfinite_total = 0

    def _forward(self, prompts, responses, *, reference: bool = False, with_value: bool = True):
        pol = self.policy
        if reference:
            with torch.no_grad(), pol.reference_model() as ref:
                return token_forward(ref, None, prompts, responses, pol.pad_id, pol.bf16)
        return token_forward(pol.model, self.value_head if with_value else None, prompts, responses, pol.pad_id,
                             pol.bf16)

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], responses: list[list[int]],
                scores: torch.Tensor) -> tuple[Rollout, dict[str, float]]:
        """Old log-probs, values and reference log-probs of the sampled tokens; rewards, GAE, returns."""
        old_logp, old_values, entropy, mask = self._forward(prompts, responses)
        ref_logp, _, _, _ = self._forward(prompts, responses, reference=True)
        rewards, kl = token_rewards(scores.float(), old_logp, ref_logp, mask, self.kl.value)
        advantages, returns = gae(rewards, old_values, mask, self.s.gamma, self.s.lam)
        if self.s.whiten_advantages and mask.sum() > 1:
            advantages = masked_whiten(advantages, mask)
        seq_kl = kl.sum(-1)
        stats = {"score": scores.mean().item(), "kl": seq_kl.mean().item(),
                 "non_score_reward": (-self.kl.value * seq_kl).mean().item(),
                 "reward": (scores - self.kl.value * seq_kl).mean().item(), "kl_coef": self.kl.value,
                 "entropy": masked_mean(entropy, mask).item(), "response_tokens": float(mask.sum().item()),
                 "value_mean": masked_mean(old_values, mask).item()}
        return Rollout(prompts, responses, old_logp, old_values, advantages, returns, mask), stats

    def step(self, prompts: list[list[int]], responses: list[list[int]], scores) -> dict[str, float]:
        """One PPO update on one rollout: ``ppo_epochs`` x shuffled minibatches, then the KL controller."""
        if not prompts:
            raise AlignEnvError("PPO step without responses")
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise AlignEnvError(f"PPO got non-finite reward scores {scores.tolist()}; the reward model is broken")
        batch, stats = self.rollout(prompts, responses, scores)
        log: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                       "value_clip_fraction", "approx_kl", "grad_norm")}
        self._trained_tokens = 0
        n, size = len(prompts), min(self.s.minibatch_size, len(prompts))
        for _ in range(self.s.ppo_epochs):
            order = self.rng.permutation(n)
            for start in range(0, n, size):
                idx = [int(i) for i in order[start : start + size]]
                self._minibatch(batch, idx, log)
        self.rollouts += 1
        self.kl.update(stats["kl"], n)
        return stats | {k: float(np.mean(v)) for k, v in log.items() if v} | {
            "ppo_optimizer_steps": float(self.optimizer_steps), "nonfinite_skipped": float(self.nonfinite_total),
            "trained_tokens": float(self._trained_tokens)}

    def _minibatch(self, batch: Rollout, idx: list[int], log: dict[str, list[float]]) -> None:
        logp, values, entropy, _ = self._forward([batch.prompts[i] for i in idx], [batch.responses[i] for i in idx])
        self._trained_tokens += sum(len(batch.prompts[i]) + len(batch.responses[i]) for i in idx)
        t = logp.shape[1]
        mask, old_logp = batch.mask[idx, :t], batch.old_logp[idx, :t]
        pg, clipfrac = policy_loss(logp, old_logp, batch.advantages[idx, :t], mask, self.s.clip_range)
        vf, vclipfrac = value_loss(values, batch.old_values[idx, :t], batch.returns[idx, :t], mask,
                                   self.s.clip_range_value)
        loss = pg + self.s.vf_coef * vf - self.s.entropy_coef * masked_mean(entropy, mask)
        if not torch.isfinite(loss):
            self._nonfinite(f"loss {loss.item()}")
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.s.ppo_max_grad_norm or math.inf)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(f"gradient norm {norm.item()}")
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self.nonfinite_run = 0
        log["policy_loss"].append(pg.item())
        log["value_loss"].append(vf.item())
        log["clip_fraction"].append(clipfrac.item())
        log["value_clip_fraction"].append(vclipfrac.item())
        log["approx_kl"].append(masked_mean(0.5 * (logp.detach() - old_logp) ** 2, mask).item())
        log["grad_norm"].append(norm.item())

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        if self.nonfinite_run >= self.s.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_run} non-finite PPO minibatches in a row (last: {what}); "
                                     "stopping. Lower ppo_lr; the last checkpoint is intact.")

    # -- checkpoint ---------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        torch.save({"value_head": self.value_head.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "kl_coef": self.kl.value, "rng": self.rng.bit_generator.state,
                    "counters": [self.rollouts, self.optimizer_steps, self.nonfinite_run, self.nonfinite_total]},
                   Path(folder) / PPO_FILE)

    def load(self, folder: Path) -> None:
        path = Path(folder) / PPO_FILE
        if not path.is_file():
            raise AlignEnvError(f"{folder} holds no PPO state ({PPO_FILE} is missing)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.value_head.load_state_dict(state["value_head"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise AlignEnvError(f"{folder}: PPO optimizer state does not fit this agent's parameters: {exc}") from exc
        self.kl.value = float(state["kl_coef"])
        self.rng.bit_generator.state = state["rng"]
        self.rollouts, self.optimizer_steps, self.nonfinite_run, self.nonfinite_total = state["counters"]
