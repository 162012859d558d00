"""``sail``: self-improving efficient online alignment (SAIL; Ding et al. 2024, arXiv 2406.15567).

SAIL maximises ``J(theta) = E_{x; y1, y2 ~ pi_theta(.|x); (y+, y-) ~ P(.|y1, y2)} [log sigma(beta h)]``
(``docs/algorithms.md``, section 2). Because the responses are drawn from ``pi_theta``, its gradient has a
score-function term besides the DPO gradient. The algorithm box, one env step at a time::

    for each batch of prompts x_1..x_B:                                  # the env's batch (num_envs prompts)
        route_i ~ Multinomial(mix_pr, mix_pp, mix_dp, 1 - sum)            # act(): per example, seeded
        PR, PP:  y1, y2 ~ pi_theta(. | x_i)                               #   two samples of the current policy
        DP, DPO: (x_i, y1, y2) <- next pair of the offline set            #   (the track's labelled pairs)
        PR:      (y+, y-) from the env's annotator (its verdict on y1, y2) # env.step(): only PR pairs are judged
        PP, DP:  (y+, y-) = (y1, y2) w.p. sigma(beta h12), else swapped   # update(): the policy labels itself
        DPO:     (y+, y-) = (chosen, rejected) of the offline pair
        loss_i = -log sigma(beta h_i)                                     # every route
               - c_sq_i / 2 * (log sigma(beta h_i))^2                     # PP (pp_coef), DP (rho)
               - c_sf_i * sg(log sigma(beta h_i)) * (log pi(y1|x) + log pi(y2|x))   # PR (gamma), PP (pp_coef)
        theta <- optimizer step on mean_i loss_i (after ``grad_accum`` updates)

with ``h12 = [log pi_theta(y1|x) - log pi_ref(y1|x)] - [log pi_theta(y2|x) - log pi_ref(y2|x)]`` and ``h_i``
the same margin in the labelled order. ``pi_ref`` is the initial policy (as in online DPO).

The variants (the official code's names in brackets) are mixes of routes:

* ``variant="pr"`` [DPR]: mix_pr 0.3, gamma 0.3: annotator labels plus the score-function term;
* ``variant="pp"`` [DPP]: mix_pp 0.3, pp_coef 0.2: self-labels, the squared term and the score-function term;
* ``variant="dp"`` [DDP]: mix_dp 0.4, rho 0.2: offline responses relabelled by the policy, the squared term;

the rest of each batch is plain DPO on the offline pairs. Any ``mix_*`` given explicitly replaces the
variant's default (so ``mix_pr=0.2, mix_pp=0.2`` routes to both); the mix must sum to at most 1. The paper
names one coefficient per variant; here it weights every extra term of its variant (PP's squared term and
its score-function term both take ``pp_coef``). With all coefficients 1, the expected update of each route
is exactly the gradient of its ``J`` (tested by enumeration in ``tests/agents/test_sail.py``).

The score-function term is implemented as the equation: the per-example loss term
``-sg(log sigma(beta h)) * (log pi(y1|x) + log pi(y2|x))``, whose gradient is the REINFORCE estimate of the
part of ``grad J`` that comes from sampling ``y1, y2``. The official code instead adds it through backward
hooks that rescale the gradient of the log-probabilities by a factor divided by the detached
log-probability, which is not literally ``log sigma * grad log pi``; this module does not follow that form.

Annotator calls. The env judges what ``act`` returns, so the agent hands the env a
:class:`agents.label_requests.RequestedLabels` wrapper of the run's annotator as ``annotator_spec``: only
PR-routed pairs reach the annotator. Self-labelled pairs (PP, DP) and offline pairs cost no call.
``update`` counts each kind apart (``annotator_labelled``, ``self_labelled_online``, ``self_labelled_offline``,
``offline_pairs``, and their running totals), and the loop's ``annotator_calls`` is the env's cost. An
abstained or tied PR verdict is dropped and counted, as in online DPO.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agents.label_requests import RequestedLabels
from agents.pair_trainer import PairTrainer, PairTrainingConfig, make_policy
from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError, did_you_mean

PR, PP, DP, OFFLINE = 0, 1, 2, 3
ROUTES = ("pr", "pp", "dp", "offline")
VARIANTS = ("pr", "pp", "dp")
BASELINES = {"none": 0.0, "half": math.log(0.5)}  # subtracted from sg(log sigma(beta h)) in the score-function term
PAPER_MIX = {"pr": 0.3, "pp": 0.3, "dp": 0.4}  # Ding et al. 2024, default mix ratio per variant


@dataclass
class SAILConfig(PairTrainingConfig):
    """The shared pair-training settings (DPO, beta 0.1) plus SAIL's routing mix and coefficients."""

    variant: str = field(default="pp", metadata={
        "help": "'pr' (annotator labels + score-function term), 'pp' (self-labels, no annotator calls for them), "
                "'dp' (offline pairs relabelled by the policy): sets the default mix (paper: 0.3 / 0.3 / 0.4)"})
    mix_pr: float | None = field(default=None, metadata={
        "help": "share of examples routed to SAIL-PR; None: 0.3 when variant='pr', else 0"})
    mix_pp: float | None = field(default=None, metadata={
        "help": "share of examples routed to SAIL-PP; None: 0.3 when variant='pp', else 0"})
    mix_dp: float | None = field(default=None, metadata={
        "help": "share of examples routed to SAIL-DP; None: 0.4 when variant='dp', else 0. The remainder "
                "1 - mix_pr - mix_pp - mix_dp is plain DPO on the offline pairs"})
    gamma: float = field(default=0.3, metadata={"help": "SAIL-PR: weight of the score-function term (paper 0.3)"})
    pp_coef: float = field(default=0.2, metadata={
        "help": "SAIL-PP: weight of the squared log-sigmoid term and of the score-function term (paper 0.2)"})
    rho: float = field(default=0.2, metadata={"help": "SAIL-DP: weight of the squared log-sigmoid term (paper 0.2)"})
    baseline: str = field(default="none", metadata={
        "help": "what the score-function term's weight is measured from: 'none' (the equation, sg(log sigma(beta "
                "h))) or 'half' (sg(log sigma(beta h)) - log(1/2), i.e. relative to h = 0; the same expected "
                "gradient, lower variance; not in the paper)"})
    temperature: float = field(default=0.9, metadata={
        "help": "sampling temperature of the two online responses (paper: not stated; as online-dpo)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise did_you_mean("SAIL variant", self.variant, VARIANTS)
        if self.baseline not in BASELINES:
            raise did_you_mean("SAIL score-function baseline", self.baseline, BASELINES)
        for route in VARIANTS:
            name = f"mix_{route}"
            if getattr(self, name) is None:
                setattr(self, name, PAPER_MIX[route] if route == self.variant else 0.0)
        total = self.mix_pr + self.mix_pp + self.mix_dp
        self.require({
            "loss='dpo' (SAIL's objective is the DPO likelihood)": self.loss == "dpo",
            "0 <= mix_pr <= 1": 0 <= self.mix_pr <= 1, "0 <= mix_pp <= 1": 0 <= self.mix_pp <= 1,
            "0 <= mix_dp <= 1": 0 <= self.mix_dp <= 1,
            f"mix_pr + mix_pp + mix_dp <= 1 (got {total:g})": total <= 1 + 1e-9,
            "gamma >= 0": self.gamma >= 0, "pp_coef >= 0": self.pp_coef >= 0, "rho >= 0": self.rho >= 0,
            "temperature > 0": self.temperature > 0, "0 < top_p <= 1": 0 < self.top_p <= 1})

    @property
    def weights(self) -> np.ndarray:
        """Routing probabilities over (pr, pp, dp, offline DPO)."""
        mix = np.array([self.mix_pr, self.mix_pp, self.mix_dp], dtype=np.float64)
        return np.append(mix, max(0.0, 1.0 - mix.sum()))


def sail_losses(logp: torch.Tensor, ref: torch.Tensor, sign: torch.Tensor, route: torch.Tensor, *, beta: float,
                gamma: float, pp_coef: float, rho: float, baseline: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example SAIL losses (to minimise) and ``log sigma(beta h)`` (detached).

    ``logp``/``ref``: ``[n, 2]`` summed log-probabilities of ``(y1, y2)`` under the policy (with gradient) and
    the reference; ``sign``: ``+1`` where ``y1`` is the preferred response, ``-1`` where ``y2`` is; ``route``:
    ``PR``, ``PP``, ``DP`` or ``OFFLINE`` per example; ``baseline``: a constant subtracted from the detached
    ``log sigma(beta h)`` in the score-function term (0: the equation). See the module docstring for the terms.
    """
    h = sign * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1]))
    log_sig = F.logsigmoid(beta * h)
    score_function = (log_sig.detach() - baseline) * (logp[:, 0] + logp[:, 1])
    squared = 0.5 * log_sig ** 2
    c_sf = gamma * (route == PR).to(logp.dtype) + pp_coef * (route == PP).to(logp.dtype)
    c_sq = pp_coef * (route == PP).to(logp.dtype) + rho * (route == DP).to(logp.dtype)
    return -(log_sig + c_sq * squared + c_sf * score_function), log_sig.detach()


@dataclass(frozen=True)
class OfflinePair:
    messages: list
    chosen: str
    rejected: str


@dataclass
class _Routed:
    """What act() produced, kept for update()."""

    route: np.ndarray
    messages: list
    a: list[str]
    b: list[str]
    ended: list[tuple[bool, bool]]
    lengths: list[int]
    seconds: float


class SAIL:
    """SAIL-PR / PP / DP with per-example routing (see the module docstring)."""

    name = "sail"
    Config = SAILConfig
    feedback = "pairwise"

    def __init__(self, config: SAILConfig, *, track: str, annotator: Any = None, seed: int = 0):
        from align_env.feedback import make_annotator
        from align_env.feedback.factories import bind_self

        self.config, self.track, self.seed = config, track, int(seed)
        self.policy = make_policy(config, self.seed)
        self.trainer = PairTrainer(self.policy, config)
        self.rng = np.random.default_rng(self.seed)
        self.labels: RequestedLabels | None = None
        if annotator is not None:
            self.labels = RequestedLabels(bind_self(make_annotator(annotator, track=track), self.policy))
        self.annotator_spec = self.labels  # the env judges through it: only PR pairs reach the annotator
        self.data: list[OfflinePair] | None = None
        self.order, self.cursor, self.epochs = np.arange(0), 0, 0
        self.totals = {"annotator_labelled": 0, "annotator_requested": 0, "self_labelled": 0, "offline_pairs": 0}
        self._last: _Routed | None = None

    # -- the offline set ---------------------------------------------------------------------------------
    def _next_offline(self) -> OfflinePair:
        if self.data is None:
            from align_env.tracks import get_track

            self.data = [OfflinePair(p.item.messages, p.chosen, p.rejected) for p in get_track(self.track).pairs]
            if not self.data:
                raise AlignEnvError(f"sail: track {self.track!r} has no labelled pairs for its DP/DPO routes")
        if self.cursor >= len(self.order):
            if len(self.order):
                self.epochs += 1
            self.order, self.cursor = self.rng.permutation(len(self.data)), 0
        pair = self.data[int(self.order[self.cursor])]
        self.cursor += 1
        return pair

    # -- acting -----------------------------------------------------------------------------------------
    def act(self, observations: dict[str, tuple]) -> tuple[list[str], list[str]]:
        """Route each prompt; two policy samples for the online routes, an offline pair for the others."""
        messages = list(observations["messages"])
        route = self.rng.choice(len(ROUTES), size=len(messages), p=self.config.weights)
        seed = int(self.rng.integers(2**31))
        online = [i for i, r in enumerate(route) if r in (PR, PP)]
        start = time.perf_counter()
        gens = self.policy.sample([messages[i] for i in online], n=2, temperature=self.config.temperature,
                                  top_p=self.config.top_p, seed=seed) if online else []
        seconds = time.perf_counter() - start
        a, b, ended, train_messages = [""] * len(messages), [""] * len(messages), [(True, True)] * len(messages), \
            list(messages)
        for i, g in zip(online, gens):
            a[i], b[i], ended[i] = g[0].text, g[1].text, (g[0].finish_reason == "stop", g[1].finish_reason == "stop")
        for i in (i for i, r in enumerate(route) if r in (DP, OFFLINE)):
            pair = self._next_offline()
            a[i], b[i], train_messages[i] = pair.chosen, pair.rejected, pair.messages
        self._last = _Routed(route, train_messages, a, b, ended, [x.tokens for g in gens for x in g], seconds)
        if self.labels is not None:
            self.labels.request(a, b, [r == PR for r in route])
        return list(a), list(b)

    def respond(self, observations: dict[str, tuple], *, seed: int = 0, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """One answer per prompt from the current policy, for evaluation (``temperature=0`` is greedy; None keeps
        the training settings). Leaves the agent's RNG alone."""
        gens = self.policy.sample(list(observations["messages"]), n=1,
                                  temperature=self.config.temperature if temperature is None else temperature,
                                  top_p=self.config.top_p if top_p is None else top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
        return [g[0].text for g in gens]

    # -- learning ---------------------------------------------------------------------------------------
    def update(self, transitions: Transitions) -> dict[str, float]:
        """Label each routed pair (annotator, policy or offline label), then one (micro-)step of the SAIL loss."""
        routed, self._last = self._last, None
        _check_matches(routed, transitions)
        route, prefs = routed.route, transitions.preferences
        is_pr = route == PR
        abstained = is_pr & (transitions.abstained | np.isnan(prefs))
        ties = is_pr & ~abstained & (prefs == 0.5)
        keep = np.flatnonzero(~abstained & ~ties)
        uniform = self.rng.random(len(route))  # the self-labels' Bernoulli draws (used for PP and DP only)
        p = self.policy
        prompts = [p.prompt_ids(routed.messages[i]) for i in keep]
        responses = [[p.response_ids(routed.a[i], routed.ended[i][0]), p.response_ids(routed.b[i], routed.ended[i][1])]
                     for i in keep]
        pr_sign = np.where(np.nan_to_num(prefs) > 0.5, 1.0, -1.0)
        counts: dict[str, float] = {}

        def compute(pairs: slice):
            """The mean SAIL loss over kept pairs ``pairs`` (a slice of ``keep``; micro_pairs chunks it)."""
            ref, _ = p.logprobs(prompts[pairs], responses[pairs], reference=True)
            logp, tokens = p.logprobs(prompts[pairs], responses[pairs])
            kept = keep[pairs]
            kept_route = torch.as_tensor(route[kept])
            h12 = ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])).detach()
            keep_order = torch.as_tensor(uniform[kept]) < torch.sigmoid(self.config.beta * h12.double())
            self_labelled = (kept_route == PP) | (kept_route == DP)
            sign = torch.where(self_labelled, torch.where(keep_order, 1.0, -1.0),
                               torch.where(kept_route == PR, torch.as_tensor(pr_sign[kept]), 1.0)).to(logp.dtype)
            losses, log_sig = sail_losses(logp, ref, sign, kept_route, beta=self.config.beta, gamma=self.config.gamma,
                                          pp_coef=self.config.pp_coef, rho=self.config.rho,
                                          baseline=BASELINES[self.config.baseline])
            margin = self.config.beta * sign * h12
            swaps = float((self_labelled & ~keep_order).sum())
            counts["self_label_swaps"] = counts.get("self_label_swaps", 0.0) + swaps  # summed over chunks
            return losses.mean(), {
                "reward_margin": margin.mean().item(),
                "reward_accuracy": (margin > 0).double().mean().item(),
                "log_sigmoid": log_sig.mean().item(),
                "implicit_kl": (logp.detach() - ref).mean().item(),
                "trained_tokens": float(tokens)}

        start = time.perf_counter()
        metrics = self.trainer.train_pairs(len(keep), compute)
        kept = route[keep]
        step = {"annotator_labelled": int((kept == PR).sum()), "annotator_requested": int(is_pr.sum()),
                "self_labelled": int(((kept == PP) | (kept == DP)).sum()),
                "offline_pairs": int((kept == OFFLINE).sum())}
        for key, value in step.items():
            self.totals[key] += value
        generated = sum(routed.lengths)
        out = metrics | counts | {
            "pairs_used": float(len(keep)),
            "annotator_labelled": float(step["annotator_labelled"]),
            "annotator_requested": float(step["annotator_requested"]),
            "self_labelled_online": float((kept == PP).sum()),
            "self_labelled_offline": float((kept == DP).sum()),
            "offline_pairs": float(step["offline_pairs"]),
            "abstained": float(abstained.sum()),
            "ties": float(ties.sum()),
            "generated_tokens": float(generated),
            "update_seconds": time.perf_counter() - start,
            "epochs": float(self.epochs),
        } | {f"total_{k}": float(v) for k, v in self.totals.items()}
        if routed.lengths:
            out |= {"response_length": float(np.mean(routed.lengths)),
                    "tokens_per_second": generated / max(routed.seconds, 1e-9), "sample_seconds": routed.seconds}
        return out

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Adapters or weights, optimizer state, RNG, the offline order and the label counters."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save(folder)
        self.trainer.save(folder)
        save_meta(folder, self.name, self.config, {
            "rng": rng_state(self.rng), "seed": self.seed, "trainer": self.trainer.counters(),
            "order": self.order.tolist(), "cursor": self.cursor, "epochs": self.epochs, "totals": self.totals})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = load_meta(folder, self.name, self.config,
                          must_match=("model", "lora", "lora_r", "optimizer", "variant", "mix_pr", "mix_pp", "mix_dp"))
        self.policy.load(folder)
        self.trainer.load(folder, state["trainer"])
        set_rng_state(self.rng, state["rng"])
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.cursor, self.epochs, self.totals = state["cursor"], state["epochs"], dict(state["totals"])
        self._last = None


def _check_matches(routed: _Routed | None, transitions: Transitions) -> None:
    if routed is None:
        raise AlignEnvError("update() without a preceding act(): the agent trains on the pairs it routed itself")
    actions = transitions.actions
    if not (isinstance(actions, (tuple, list)) and len(actions) == 2
            and list(actions[0]) == routed.a and list(actions[1]) == routed.b):
        raise AlignEnvError("update() got actions that are not the ones this agent's last act() returned")
