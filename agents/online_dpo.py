"""``online-dpo``: direct alignment from online AI feedback (OAIF; Guo et al. 2024, arXiv 2402.04792).

The algorithm box (shared/reference/ALGORITHMS.md, section 1), one env step at a time::

    for each batch of prompts x:                                   # the env's batch (num_envs prompts)
        y1, y2 ~ pi_theta(. | x)                                   # act(): two samples from the CURRENT policy
        p = P(y1 better than y2 | x)                               # env.step(): the annotator, both orders
        (y+, y-) = (y1, y2) if p > 0.5 else (y2, y1)                # update(): hard label from the verdict
        L = mean over pairs of loss(h)                             # h = [log pi_theta(y+|x) - log pi_ref(y+|x)]
                                                                   #   - [log pi_theta(y-|x) - log pi_ref(y-|x)]
        theta <- optimizer step on L (after ``grad_accum`` updates)

with ``loss`` one of DPO ``-log sigma(beta h)``, IPO ``(h - 1/(2 beta))^2``, SLiC ``max(0, 1 - beta h)``
(:mod:`agents.losses`). No gradient flows through sampling or annotation. The reference pi_ref is the
initial policy: with LoRA the base model with adapters disabled, otherwise a frozen copy (:mod:`agents.policy`).

Which pairs enter the update:

* an abstained pair (``info["abstained"]`` or a NaN preference) is dropped and counted (``abstained``). This
  avoids the known pitfall of a public implementation, where a judge failure (-1) silently made the second
  answer the chosen one: an abstention never becomes a preference here;
* a tie (``p == 0.5`` exactly, e.g. two identical answers, or a rules annotator scoring both the same) is
  dropped and counted (``ties``): it says neither answer is better, and a hard label would be a coin flip;
* every other pair is used with the hard label ``p > 0.5``, as the paper does.

Not in the paper, for robustness: a non-finite loss or gradient skips the update (counted in
``nonfinite_skipped``); ``max_nonfinite`` of them in a row raise :class:`NonFiniteLossError` so the loop
stops with its last checkpoint intact.

Length control (the OAIF experiment): ``length_control`` is an instruction appended to the annotator's
prompt. The annotator lives in the environment, so the agent exposes the spec the environment must use as
``agent.annotator_spec`` (see :func:`with_length_control`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.losses import DEFAULT_BETA, LOSSES
from agents.policy import LoraSettings, Policy
from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError, did_you_mean

TRAINER_FILE = "trainer.pt"
OPTIMIZERS = ("adamw", "adafactor")


class NonFiniteLossError(AlignEnvError):
    """Too many non-finite losses or gradients in a row: the run should stop (its checkpoint is kept)."""


@dataclass
class OnlineDPOConfig:
    """OAIF settings. Defaults follow the paper unless a field's help says why not."""

    model: str = field(default="smollm2-135m", metadata={"help": "policy: catalogue name, local folder or hub id"})
    loss: str = field(default="dpo", metadata={
        "help": "direct-alignment loss: 'dpo', 'ipo' or 'slic' (OAIF uses all three)"})
    beta: float | None = field(default=None, metadata={
        "help": "loss temperature; None takes the OAIF default of the loss (dpo 0.1, ipo 1.0, slic 0.002)"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of the two responses (paper: 0.9)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (paper: none, 1.0)"})
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
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "clip the gradient norm (TRL's default 1.0; the paper does not say); None disables"})
    lora: bool = field(default=True, metadata={
        "help": "train LoRA adapters (reference = adapters disabled, no second copy) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast on CPU for sampling and log-probabilities (weights and optimizer stay fp32)"})
    length_control: str = field(default="", metadata={
        "help": "instruction appended to the annotator's prompt, e.g. 'Prefer the shorter answer.' (the OAIF "
                "length-control experiment); see with_length_control for what each annotator family takes"})
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
        checks = {"beta > 0": self.beta > 0, "temperature > 0": self.temperature > 0,
                  "0 < top_p <= 1": 0 < self.top_p <= 1,
                  "max_new_tokens >= 1": self.max_new_tokens >= 1, "lr > 0": self.lr > 0,
                  "warmup_steps >= 0": self.warmup_steps >= 0, "grad_accum >= 1": self.grad_accum >= 1,
                  "lora_r >= 1": self.lora_r >= 1, "max_nonfinite >= 1": self.max_nonfinite >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise AlignEnvError(f"online-dpo config: need {', '.join(bad)}")


# -- length control ---------------------------------------------------------------------------------------
def with_length_control(annotator: Any, instruction: str) -> Any:
    """The annotator spec with a length-control instruction added (returned unchanged when it is empty).

    * ``llm_judge``: the instruction becomes the judge prompt's ``suffix`` (as in the OAIF experiment);
    * ``rules``: it cannot read instructions; any instruction turns on its length preference (``prefer=short``);
    * other families and annotator objects take no instruction: an error says so.
    """
    if not instruction:
        return annotator
    from align_env.feedback import AnnotatorSpec, parse_spec

    if not isinstance(annotator, (str, AnnotatorSpec)):
        raise AlignEnvError("length_control needs an annotator spec string, not an annotator object")
    spec = parse_spec(annotator) if isinstance(annotator, str) else annotator
    if spec.family == "llm_judge":
        return str(AnnotatorSpec(spec.family, spec.model, {**spec.params, "suffix": instruction}))
    if spec.family == "rules":
        return str(AnnotatorSpec(spec.family, spec.model, {**spec.params, "prefer": "short"}))
    raise AlignEnvError(f"annotator family {spec.family!r} takes no length-control instruction; use llm_judge or rules")


# -- the optimisation part, shared with offline-dpo (composition) --------------------------------------------
def _warmup(warmup_steps: int, step: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def make_optimizer(params: list[torch.nn.Parameter], config: OnlineDPOConfig) -> torch.optim.Optimizer:
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

    def __init__(self, policy: Policy, config: OnlineDPOConfig):
        self.policy, self.config = policy, config
        self.loss_fn = LOSSES[config.loss]
        self.params = policy.trainable_parameters()
        self.optimizer = make_optimizer(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(_warmup, config.warmup_steps))
        self.micro_steps = self.optimizer_steps = self.nonfinite_run = self.nonfinite_total = 0

    def train(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if prompts:
            metrics = self._backward(prompts, chosen, rejected)
        self.micro_steps += 1
        if self.micro_steps % self.config.grad_accum == 0:
            metrics |= self._step()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["nonfinite_skipped"] = float(self.nonfinite_total)
        return metrics

    def _backward(self, prompts, chosen, rejected) -> dict[str, float]:
        policy, beta = self.policy, self.config.beta
        responses = [[c, r] for c, r in zip(chosen, rejected)]
        ref, _ = policy.logprobs(prompts, responses, reference=True)
        logp, tokens = policy.logprobs(prompts, responses)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta)
        loss = losses.mean()
        if not torch.isfinite(loss):
            self._nonfinite(f"loss {loss.item()}")
            return {}
        (loss / self.config.grad_accum).backward()
        self.nonfinite_run = 0
        return {
            "loss": loss.item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "implicit_kl": (logp.detach() - ref).mean().item(),
            "logprob_tokens": float(tokens),
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


def make_policy(config: OnlineDPOConfig, seed: int) -> Policy:
    lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha) if config.lora else None
    return Policy(config.model, lora=lora, seed=seed, bf16=config.bf16, max_new_tokens=config.max_new_tokens)


@dataclass
class _Sampled:
    """What act() produced, kept for update(): prompts, the two responses, whether each ended by itself."""

    messages: list
    a: list[str]
    b: list[str]
    ended: list[tuple[bool, bool]]
    lengths: list[int]
    seconds: float


# -- the agent --------------------------------------------------------------------------------------------
class OnlineDPO:
    """Online DPO / IPO / SLiC with online AI feedback (see the module docstring)."""

    name = "online-dpo"
    Config = OnlineDPOConfig
    feedback = "pairwise"

    def __init__(self, config: OnlineDPOConfig, *, track: str, annotator: Any = None, seed: int = 0):
        self.config, self.track, self.seed = config, track, int(seed)
        self.annotator_spec = with_length_control(annotator, config.length_control)  # what the env must judge with
        self.policy = make_policy(config, self.seed)
        self.trainer = PairTrainer(self.policy, config)
        self.rng = np.random.default_rng(self.seed)  # one draw per act() seeds that act's sampling
        self._last: _Sampled | None = None

    # -- acting -----------------------------------------------------------------------------------------
    def act(self, observations: dict[str, tuple]) -> tuple[list[str], list[str]]:
        """Two samples per prompt from the current policy: ``(responses_a, responses_b)``."""
        messages = list(observations["messages"])
        seed = int(self.rng.integers(2**31))
        start = time.perf_counter()
        gens = self.policy.sample(messages, n=2, temperature=self.config.temperature, top_p=self.config.top_p,
                                  seed=seed)
        seconds = time.perf_counter() - start
        self._last = _Sampled(
            messages, [g[0].text for g in gens], [g[1].text for g in gens],
            [(g[0].finish_reason == "stop", g[1].finish_reason == "stop") for g in gens],
            [x.tokens for g in gens for x in g], seconds)
        return list(self._last.a), list(self._last.b)

    def respond(self, observations: dict[str, tuple], *, seed: int = 0) -> list[str]:
        """One answer per prompt from the current policy (for evaluation; leaves the agent's RNG alone)."""
        gens = self.policy.sample(list(observations["messages"]), n=1, temperature=self.config.temperature,
                                  top_p=self.config.top_p, seed=seed)
        return [g[0].text for g in gens]

    # -- learning ---------------------------------------------------------------------------------------
    def update(self, transitions: Transitions) -> dict[str, float]:
        """Label each pair by its verdict, drop abstentions and ties, take one (micro-)step of the loss."""
        sampled, self._last = self._last, None
        _check_matches(sampled, transitions)
        prefs = transitions.preferences
        abstained = transitions.abstained | np.isnan(prefs)
        ties = ~abstained & (prefs == 0.5)
        prompts, chosen, rejected = [], [], []
        for i in np.flatnonzero(~abstained & ~ties):
            a_first = prefs[i] > 0.5
            (ca, cb), (ea, eb) = (sampled.a[i], sampled.b[i]), sampled.ended[i]
            win, win_end, lose, lose_end = (ca, ea, cb, eb) if a_first else (cb, eb, ca, ea)
            prompts.append(self.policy.prompt_ids(sampled.messages[i]))
            chosen.append(self.policy.response_ids(win, win_end))
            rejected.append(self.policy.response_ids(lose, lose_end))
        start = time.perf_counter()
        metrics = self.trainer.train(prompts, chosen, rejected)
        generated = sum(sampled.lengths)
        return metrics | {
            "pairs_used": float(len(prompts)),
            "abstained": float(abstained.sum()),
            "ties": float(ties.sum()),
            "response_length": float(np.mean(sampled.lengths)),
            "tokens_per_second": generated / max(sampled.seconds, 1e-9),
            "sample_seconds": sampled.seconds,
            "update_seconds": time.perf_counter() - start,
        }

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Adapters or weights, optimizer + scheduler (+ an unfinished accumulation's gradients), RNG, counters."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save(folder)
        self.trainer.save(folder)
        save_meta(folder, self.name, self.config,
                  {"rng": rng_state(self.rng), "seed": self.seed, "trainer": self.trainer.counters()})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = load_meta(folder, self.name, self.config, must_match=("model", "lora", "lora_r", "loss", "optimizer"))
        self.policy.load(folder)
        self.trainer.load(folder, state["trainer"])
        set_rng_state(self.rng, state["rng"])
        self._last = None


def _check_matches(sampled: _Sampled | None, transitions: Transitions) -> None:
    if sampled is None:
        raise AlignEnvError("update() without a preceding act(): the agent trains on the pairs it sampled itself")
    actions = transitions.actions
    if not (isinstance(actions, (tuple, list)) and len(actions) == 2
            and list(actions[0]) == sampled.a and list(actions[1]) == sampled.b):
        raise AlignEnvError("update() got actions that are not the ones this agent's last act() returned")
    if len(transitions.preferences) != len(sampled.a):
        raise AlignEnvError(f"update() got {len(transitions.preferences)} verdicts for {len(sampled.a)} pairs")
