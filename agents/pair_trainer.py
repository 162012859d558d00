"""The pair-update machinery of the direct-alignment agents: a policy, an optimizer, and one DPO-family step.

Every agent that learns from (prompt, chosen, rejected) pairs (online DPO, offline DPO, SAIL, self-rewarding)
uses this module; none imports another agent. It holds:

* :class:`PairTrainingConfig`: the optimisation settings those agents share (model, loss, beta, lr,
  optimizer, warm-up, accumulation, clipping, LoRA, precision); each agent's config extends it;
* :func:`make_policy` and :func:`make_optimizer`;
* :class:`PairTrainer`: one update of ``loss(h)`` (:mod:`agents.losses`) on token ids, with gradient
  accumulation, clipping, a linear warm-up and a non-finite guard, and its checkpoint state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from agents.losses import DEFAULT_BETA, LOSSES
from agents.policy import LoraSettings, Policy
from align_env import memory
from align_env.errors import AlignEnvError, did_you_mean

TRAINER_FILE = "trainer.pt"
OPTIMIZERS = ("adamw", "adafactor")


class NonFiniteLossError(AlignEnvError):
    """Too many non-finite losses or gradients in a row: the run should stop (its checkpoint is kept)."""


@dataclass
class PairTrainingConfig:
    """Optimisation settings shared by the pair-trained agents. Defaults follow OAIF unless a help says why not."""

    model: str = field(default="smollm2-135m", metadata={"help": "policy: catalogue name, local folder or hub id"})
    loss: str = field(default="dpo", metadata={
        "help": "direct-alignment loss: 'dpo', 'ipo' or 'slic' (OAIF uses all three)"})
    beta: float | None = field(default=None, metadata={
        "help": "loss temperature; None takes the OAIF default of the loss (dpo 0.1, ipo 1.0, slic 0.002)"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "most tokens per response (paper: not stated; 64 keeps CPU steps short, TL;DRs fit)"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate; None picks 5e-5 with LoRA, 5e-7 for full fine-tuning. The paper's 5e-7 "
                "(Adafactor, full fine-tuning of PaLM 2) is the full fine-tuning value; LoRA adapters start at "
                "zero and need about 100x more to move in a few hundred steps"})
    optimizer: str = field(default="adamw", metadata={
        "help": "'adamw' (torch, no weight decay by default) or 'adafactor' (transformers' Adafactor with a fixed "
                "lr, the paper's optimizer)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay of the optimizer"})
    warmup_steps: int = field(default=10, metadata={
        "help": "linear warm-up in optimizer steps, then constant lr. Paper: 150 in runs of thousands of steps; "
                "10 suits the 10^1-10^3-step runs this project makes on CPU"})
    grad_accum: int = field(default=1, metadata={
        "help": "update() calls (env steps) per optimizer step; the effective batch is num_envs * grad_accum "
                "pairs (paper: 128)"})
    micro_pairs: int = field(default=0, metadata={
        "help": "pairs per forward/backward inside one update (0: all at once). Bounds the update's memory "
                "(activations and vocab-wide logits of a micro-batch only); gradients are accumulated so the "
                "update equals the full-batch one to float tolerance"})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "clip the gradient norm (TRL's default 1.0; the paper does not say); None disables"})
    lora: bool = field(default=True, metadata={
        "help": "train LoRA adapters (reference = adapters disabled, no second copy) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast on CPU for sampling and log-probabilities (weights and optimizer stay fp32)"})
    bf16_base: bool = field(default=False, metadata={
        "help": "with LoRA and bf16: keep the frozen base weights in bf16 (autocast casts them to these values "
                "anyway, so the update is the same numbers) for about 0.5 GB less at SmolLM2-135M; the merged "
                "sampling copy rounds W + BA from the bf16 W. Not for agents that fold adapters into the "
                "reference (self-rewarding)"})
    max_nonfinite: int = field(default=10, metadata={
        "help": "non-finite losses/gradients in a row that stop the run (each one is skipped and counted)"})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise did_you_mean("loss", self.loss, LOSSES)
        if self.optimizer not in OPTIMIZERS:
            raise did_you_mean("optimizer", self.optimizer, OPTIMIZERS)
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.loss]
        if self.lr is None:
            self.lr = 5e-5 if self.lora else 5e-7
        self.require({"beta > 0": self.beta > 0, "max_new_tokens >= 1": self.max_new_tokens >= 1, "lr > 0": self.lr > 0,
                      "warmup_steps >= 0": self.warmup_steps >= 0, "grad_accum >= 1": self.grad_accum >= 1,
                      "micro_pairs >= 0": self.micro_pairs >= 0,
                      "bf16_base only with lora and bf16": not self.bf16_base or (self.lora and self.bf16),
                      "lora_r >= 1": self.lora_r >= 1, "max_nonfinite >= 1": self.max_nonfinite >= 1})

    def require(self, checks: dict[str, bool]) -> None:
        """Raise one error naming every failed condition (``{"lr > 0": ok, ...}``)."""
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise AlignEnvError(f"{type(self).__name__}: need {', '.join(bad)}")


def _warmup(warmup_steps: int, step: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def make_optimizer(params: list[torch.nn.Parameter], config: PairTrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.lr, weight_decay=config.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class PairTrainer:
    """One direct-alignment update on (prompt, chosen, rejected) token ids, with accumulation and clipping.

    ``train(...)`` is called once per agent update (a micro-step); every ``grad_accum`` micro-steps the
    optimizer and the warm-up schedule step. Its state (optimizer, scheduler, counters, gradients accumulated
    in an unfinished cycle) goes into ``trainer.pt`` so a resumed run continues identically.
    """

    def __init__(self, policy: Policy, config: PairTrainingConfig):
        self.policy, self.config = policy, config
        self.loss_fn = LOSSES[config.loss]
        self.params = policy.trainable_parameters()
        self.optimizer = make_optimizer(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(_warmup, config.warmup_steps))
        self.micro_steps = self.optimizer_steps = self.nonfinite_run = self.nonfinite_total = 0

    def train(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]) -> dict[str, float]:
        """One micro-step of ``loss(h)`` on the pairs (none: the step still counts toward accumulation)."""
        return self.train_pairs(len(prompts), lambda pairs: self._pair_loss(prompts[pairs], chosen[pairs],
                                                                              rejected[pairs]))

    def train_pairs(self, n: int,
                    compute: Callable[[slice], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:
        """One micro-step of a loss that is a mean over ``n`` pairs: ``compute(pairs)`` returns ``(mean loss over
        those pairs with gradient, metrics)``. With ``micro_pairs`` the forward/backward runs ``micro_pairs``
        pairs at a time (:meth:`_train_chunked`); otherwise once over ``slice(0, n)``."""
        size = self.config.micro_pairs
        if size and n > size:
            return self._train_chunked(n, compute, size)
        return self.train_with(partial(compute, slice(0, n)) if n else None)

    def train_with(self, compute: Callable[[], tuple[torch.Tensor, dict[str, float]]] | None) -> dict[str, float]:
        """One micro-step of any loss: ``compute()`` returns ``(mean loss with gradient, metrics)``.

        Losses that are not a mean over pairs use this (a loss that is, as SAIL's, uses :meth:`train_pairs`,
        which also bounds memory); accumulation, clipping, warm-up, the non-finite guard and the checkpoint
        state are the same as for :meth:`train`.
        """
        metrics: dict[str, float] = {}
        if compute is not None:
            metrics = self._backward(compute)
        self.micro_steps += 1
        if self.micro_steps % self.config.grad_accum == 0:
            metrics |= self._step()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["nonfinite_skipped"] = float(self.nonfinite_total)
        return metrics

    def flush(self) -> dict[str, float]:
        """Step on the gradients of an unfinished accumulation cycle now (before the reference changes)."""
        if self.micro_steps % self.config.grad_accum == 0:
            return {}
        self.micro_steps += self.config.grad_accum - self.micro_steps % self.config.grad_accum
        return self._step()

    def _train_chunked(self, n: int, compute, size: int) -> dict[str, float]:
        """:meth:`train_pairs` with forward/backward on ``size`` pairs at a time, each chunk's loss weighted by
        its share of the batch, so the gradients sum to those of the full-batch mean loss."""
        saved = [None if p.grad is None else p.grad.clone() for p in self.params]
        total, sums, finite = 0.0, {}, True
        for lo in range(0, n, size):
            sl = slice(lo, min(lo + size, n))
            loss, metrics = compute(sl)
            k = sl.stop - sl.start
            if not torch.isfinite(loss):
                finite = False
                self._nonfinite(f"loss {loss.item()}")
                break
            (loss * (k / n) / self.config.grad_accum).backward()
            memory.trim()  # this chunk's activations go back before the next chunk (align_env.memory)
            total += loss.item() * k / n
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + (v if key == "trained_tokens" else v * k / n)
        if not finite:  # as the full-batch path: no gradient from this update
            for p, g in zip(self.params, saved):
                p.grad = g
            sums = None
        else:
            self.nonfinite_run = 0
        return self.train_with(None) | ({"loss": total} | sums if sums is not None else {})

    def _backward(self, compute) -> dict[str, float]:
        loss, metrics = compute()
        if not torch.isfinite(loss):
            self._nonfinite(f"loss {loss.item()}")
            return {}
        (loss / self.config.grad_accum).backward()
        self.nonfinite_run = 0
        return {"loss": loss.item()} | metrics

    def _pair_loss(self, prompts, chosen, rejected) -> tuple[torch.Tensor, dict[str, float]]:
        policy, beta = self.policy, self.config.beta
        responses = [[c, r] for c, r in zip(chosen, rejected)]
        ref, _ = policy.logprobs(prompts, responses, reference=True)
        logp, tokens = policy.logprobs(prompts, responses)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta)
        return losses.mean(), {
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "implicit_kl": (logp.detach() - ref).mean().item(),
            "trained_tokens": float(tokens),
        }

    def _step(self) -> dict[str, float]:
        out = {}
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(f"gradient norm {norm.item()}")
            return out
        out["grad_norm"] = norm.item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return out

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        if self.nonfinite_run >= self.config.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_run} non-finite updates in a row (last: {what}); stopping. "
                                     "Lower lr or check the model's dtype; the last checkpoint is intact.")

    # -- checkpoint ---------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {"micro_steps": self.micro_steps, "optimizer_steps": self.optimizer_steps,
                "nonfinite_run": self.nonfinite_run, "nonfinite_total": self.nonfinite_total}

    def save(self, folder: Path) -> None:
        grads = {i: p.grad for i, p in enumerate(self.params) if p.grad is not None}
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "grads": grads}, folder / TRAINER_FILE)

    def load(self, folder: Path, counters: dict[str, int]) -> None:
        path = folder / TRAINER_FILE
        if not path.is_file():
            raise AlignEnvError(f"{folder} holds no optimizer state ({TRAINER_FILE} is missing)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise AlignEnvError(f"{folder}: optimizer state does not fit this agent's parameters: {exc}") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.zero_grad(set_to_none=True)
        for i, grad in state["grads"].items():
            self.params[int(i)].grad = grad.clone()
        for key, value in counters.items():
            setattr(self, key, int(value))


def make_policy(config: PairTrainingConfig, seed: int) -> Policy:
    lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha) if config.lora else None
    return Policy(config.model, lora=lora, seed=seed, bf16=config.bf16, max_new_tokens=config.max_new_tokens,
                  bf16_base=config.bf16_base)

