"""``self-rewarding``: self-rewarding language models (Yuan et al. 2024, arXiv 2401.10020).

The policy is its own annotator (``docs/algorithms.md``, section 3). The algorithm box, iteration ``t``
turning ``M_t`` into ``M_{t+1}``, over ``steps_per_iteration`` env steps::

    (optional, once) EFT: fine-tune M_0 to write "Score: s" for the track's labelled pairs (selection half only)
    for each batch of prompts x:                                     # act(), one env step
        y_1..y_N ~ M_t(. | x), N = 4, temperature 0.7, top-p 0.9
        r_j = mean of 3 judgements by M_t of y_j                     # the additive 5-point prompt, "Score: s"
        if at least 2 y_j got a score and max r > min r:
            keep (x, y+ = argmax r, y- = argmin r)                   # ties and unscored candidates dropped
    after the iteration's last step:                                 # update()
        M_{t+1} = DPO(beta 0.1) on the kept pairs, reference M_t
        (LoRA: the adapters are folded into the base weights, so "adapters disabled" is M_{t+1} next time)
    repeat for ``iterations`` iterations; afterwards the agent only samples (and the env monitors)

The judge is the ``self`` annotator family bound to the agent's current model (``judge=""``, the paper):
with LoRA it judges through the merged copy the policy samples from, so judging costs no second model. A
different spec in ``judge=`` replaces it (an ablation, and how the tests give the loop a known judge).

The environment's annotator is stepped for monitoring only: ``act`` returns ``(y+, y-)`` (or two candidates
when nothing was kept) and the env's verdict on them is logged as ``env_agreement`` (how often the env's
annotator agrees with the self-judge), never read into a label. Its calls are the loop's
``annotator_calls``; the self-judge's judgements are counted apart as ``self_judgements``.

Logged at the end of each iteration (``iteration_*`` metrics, and :attr:`SelfRewarding.history`): pairs kept,
ties dropped, prompts without two scored candidates, unparseable judgements, the self-judge's pairwise
accuracy on the report half of the track's labelled pairs (the paper: 78.7 -> 80.4 -> 81.7%) before and after
the iteration, and the mean candidate length (the paper's responses grew each iteration). An iteration that
keeps no pair (a judge that never gives a score, or only ties) trains nothing, warns, and moves on.

EFT (``eft=True``, optional): from the *selection* half of the track's labelled pairs (the report half
measures the judge), one example per response: the judge prompt for it, with target ``"Score: s"`` where the
label implies ``s = eft_chosen_score`` (4) for the chosen and ``eft_rejected_score`` (1) for the rejected one. A
supervised pass (``eft_epochs``) on these before the first iteration teaches a small model the format and the
preference. The paper's seed model was fine-tuned on instructions and evaluation examples this way.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.pair_trainer import PairTrainer, PairTrainingConfig, make_optimizer, make_policy
from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from align_env.errors import AlignEnvError, did_you_mean

JUDGE_MODES = ("generate", "expected")
FOLDED_FILE = "folded.safetensors"
REFERENCE_FILE = "reference.safetensors"


@dataclass
class SelfRewardingConfig(PairTrainingConfig):
    """The shared pair-training settings (DPO, beta 0.1) plus sampling, self-judging and iteration settings."""

    n_candidates: int = field(default=4, metadata={"help": "candidates sampled per prompt (paper: 4)"})
    temperature: float = field(default=0.7, metadata={"help": "candidate sampling temperature (paper: 0.7)"})
    top_p: float = field(default=0.9, metadata={"help": "candidate nucleus sampling threshold (paper: 0.9)"})
    judge: str = field(default="", metadata={
        "help": "annotator spec of the judge; empty: the agent's own current model through the additive 5-point "
                "prompt (the 'self' family, the paper)"})
    judge_samples: int = field(default=3, metadata={"help": "judgements per candidate, averaged (paper: 3)"})
    judge_temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the judgements"})
    judge_max_new_tokens: int = field(default=128, metadata={
        "help": "most tokens of a judgement (justification of up to 100 words, then 'Score: s')"})
    judge_mode: str = field(default="generate", metadata={
        "help": "'generate': write the judgement and parse 'Score: s' (paper); 'expected': the expected score from "
                "the digit probabilities after 'Score:' (one forward, for small models on CPU; judge_samples unused)"})
    iterations: int = field(default=2, metadata={
        "help": "iterations M_t -> M_{t+1} (paper: 2, M1 -> M2 -> M3); afterwards the agent only samples"})
    steps_per_iteration: int = field(default=8, metadata={
        "help": "env steps (batches of num_envs prompts) of candidates collected per iteration"})
    epochs: int = field(default=1, metadata={"help": "passes of DPO over an iteration's kept pairs"})
    train_batch: int = field(default=8, metadata={"help": "pairs per DPO micro-step at the end of an iteration"})
    judge_eval_pairs: int = field(default=16, metadata={
        "help": "report-half labelled pairs on which the self-judge accuracy is measured per iteration (0: off)"})
    eft: bool = field(default=False, metadata={
        "help": "evaluation fine-tuning on the selection half of the track's labelled pairs before iteration 1"})
    eft_epochs: int = field(default=1, metadata={"help": "EFT passes"})
    eft_chosen_score: int = field(default=4, metadata={"help": "EFT target score of a labelled pair's chosen response"})
    eft_rejected_score: int = field(default=1, metadata={"help": "EFT target score of its rejected response"})

    def __post_init__(self):
        super().__post_init__()
        if self.judge_mode not in JUDGE_MODES:
            raise did_you_mean("self-rewarding judge_mode", self.judge_mode, JUDGE_MODES)
        self.require({
            f"n_candidates >= 2 to form a pair (got {self.n_candidates})": self.n_candidates >= 2,
            "loss='dpo' (the paper's)": self.loss == "dpo",
            "temperature > 0": self.temperature > 0, "0 < top_p <= 1": 0 < self.top_p <= 1,
            "judge_samples >= 1": self.judge_samples >= 1, "judge_temperature >= 0": self.judge_temperature >= 0,
            "judge_max_new_tokens >= 1": self.judge_max_new_tokens >= 1, "iterations >= 1": self.iterations >= 1,
            "steps_per_iteration >= 1": self.steps_per_iteration >= 1, "epochs >= 1": self.epochs >= 1,
            "train_batch >= 1": self.train_batch >= 1, "judge_eval_pairs >= 0": self.judge_eval_pairs >= 0,
            "eft_epochs >= 1": self.eft_epochs >= 1,
            "0 <= eft_rejected_score < eft_chosen_score <= 5": 0 <= self.eft_rejected_score < self.eft_chosen_score <= 5})


@dataclass
class _Candidates:
    """What act() produced, kept for update()."""

    messages: list
    a: list[str]
    b: list[str]
    pairs: list[tuple[int, list, str, str, bool, bool] | None]  # per prompt: the kept pair, or None
    stats: dict[str, float]


class SelfRewarding:
    """Iterated self-rewarding DPO (see the module docstring)."""

    name = "self-rewarding"
    Config = SelfRewardingConfig
    feedback = "pairwise"

    def __init__(self, config: SelfRewardingConfig, *, track: str, annotator: Any = None, seed: int = 0):
        from align_env.feedback import make_annotator
        from align_env.feedback.factories import bind_self

        self.config, self.track, self.seed = config, track, int(seed)
        self.annotator_spec = annotator  # the env's annotator: monitoring only
        self.policy = make_policy(config, self.seed)
        self.trainer = PairTrainer(self.policy, config)
        self.rng = np.random.default_rng(self.seed)
        spec = config.judge or (f"self?samples={config.judge_samples}&temperature={config.judge_temperature}"
                                f"&max_new_tokens={config.judge_max_new_tokens}&pointwise={config.judge_mode}")
        self.judge = bind_self(make_annotator(spec, track=track), self.policy)
        self.iteration = 0  # iterations finished
        self.step_in_iteration = 0
        self.buffer: list[list] = []  # [messages, chosen, rejected, chosen_ended, rejected_ended]
        self.folded: list[dict[str, torch.Tensor]] = []  # adapters folded into the base, one per iteration
        self.history: list[dict[str, float]] = []
        self.eft_done = not config.eft
        self.eft_metrics: dict[str, float] = {}
        self.start_accuracy: float | None = None
        self._reset_iteration_stats()
        self._last: _Candidates | None = None

    def _reset_iteration_stats(self) -> None:
        self.stats = {"prompts": 0.0, "pairs_kept": 0.0, "ties_dropped": 0.0, "unscored_prompts": 0.0,
                      "unparseable": 0.0, "judgements": 0.0, "candidate_tokens": 0.0, "candidate_chars": 0.0,
                      "candidates": 0.0}

    @property
    def done(self) -> bool:
        return self.iteration >= self.config.iterations

    # -- judging ----------------------------------------------------------------------------------------
    def _scores(self, prompts: list[str], responses: list[str]) -> tuple[list[float | None], float]:
        """The judge's mean score per response and the number of unparseable judgements."""
        if hasattr(self.judge, "seed"):
            self.judge.seed = int(self.rng.integers(2**31))  # a fresh, seeded draw of judgements per call
        scores = list(self.judge.score(prompts, responses))
        details = getattr(self.judge, "last_details", None) or []
        generated = self.config.judge_mode == "generate" and not self.config.judge
        unparseable = float(sum(d.get("unparsed", 0) for d in details)) if generated and len(details) == len(
            responses) else float(sum(s is None for s in scores))
        return [None if s is None or not math.isfinite(s) else float(s) for s in scores], unparseable

    def judge_accuracy(self) -> dict[str, float]:
        """Pairwise accuracy of the current judge on the report half of the track's labelled pairs: chosen
        scored above rejected 1, equal 0.5 (ties), below 0; pairs with an unscored response count 0.5 too."""
        from align_env.tracks import get_track

        pairs = get_track(self.track).report_pairs[: self.config.judge_eval_pairs]
        if not pairs:
            return {}
        prompts = [p.item.prompt for p in pairs] * 2
        scores, unparseable = self._scores(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        n = len(pairs)
        points = [0.5 if c is None or r is None or c == r else float(c > r) for c, r in zip(scores[:n], scores[n:])]
        return {"judge_accuracy": float(np.mean(points)), "judge_eval_pairs": float(n),
                "judge_eval_unscored": float(sum(c is None or r is None for c, r in zip(scores[:n], scores[n:])))}

    # -- evaluation fine-tuning --------------------------------------------------------------------------
    def eft_examples(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) per response of the selection half's labelled pairs (see the docstring)."""
        from align_env.tracks import get_track

        judge, p = self.judge, self.policy
        if not hasattr(judge, "pointwise_prompt"):
            raise AlignEnvError(f"eft=True needs a prompted judge ('self' or llm_judge), not {self.config.judge!r}")
        out = []
        for pair in get_track(self.track).selection_pairs:
            for response, score in ((pair.chosen, self.config.eft_chosen_score),
                                    (pair.rejected, self.config.eft_rejected_score)):
                context = judge.pointwise_prompt(pair.item, response)
                if self.config.judge_mode == "expected":
                    prompt = p.engine.encode(judge.expected_context(context))
                    budget = p.engine.max_context - 4
                    out.append((prompt[len(prompt) - budget:] if len(prompt) > budget else prompt,
                                p.response_ids(str(score), ended=False)))
                else:
                    out.append((p.prompt_ids(context), p.response_ids(f"Score: {score}", ended=True)))
        return out

    def _eft(self) -> dict[str, float]:
        examples = self.eft_examples()
        params = self.policy.trainable_parameters()
        optimizer = make_optimizer(params, self.config)
        eft_rng = np.random.default_rng([self.seed, 2])
        losses = []
        for _ in range(self.config.eft_epochs):
            order = eft_rng.permutation(len(examples))
            for start in range(0, len(order), self.config.train_batch):
                batch = [examples[int(i)] for i in order[start:start + self.config.train_batch]]
                logp, _ = self.policy.logprobs([b[0] for b in batch], [[b[1]] for b in batch])
                loss = -(logp[:, 0] / torch.tensor([len(b[1]) for b in batch])).mean()  # per-token NLL
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or math.inf)
                optimizer.step()
                losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        self.folded.append(self.policy.merge_adapters())  # the EFT model is the first iteration's M_t and reference
        return {"eft_examples": float(len(examples)), "eft_loss_first": losses[0], "eft_loss_last": losses[-1]}

    # -- acting -----------------------------------------------------------------------------------------
    def act(self, observations: dict[str, tuple]) -> tuple[list[str], list[str]]:
        """N candidates per prompt, self-judged; returns (y+, y-) per prompt (two candidates when none kept)."""
        messages, prompts = list(observations["messages"]), list(observations["prompt"])
        if not self.eft_done:
            self.eft_metrics = self._eft()
            self.eft_done = True
        if not self.done and self.start_accuracy is None and self.config.judge_eval_pairs:
            self.start_accuracy = self.judge_accuracy().get("judge_accuracy", float("nan"))
        n = 2 if self.done else self.config.n_candidates
        seed = int(self.rng.integers(2**31))
        start = time.perf_counter()
        gens = self.policy.sample(messages, n=n, temperature=self.config.temperature, top_p=self.config.top_p,
                                  seed=seed)
        stats = {"generated_tokens": float(sum(x.tokens for g in gens for x in g)),
                 "sample_seconds": time.perf_counter() - start, "response_length": float(np.mean(
                     [x.tokens for g in gens for x in g]))}
        a, b = [g[0].text for g in gens], [g[1].text for g in gens]
        pairs: list = [None] * len(messages)
        if not self.done:
            start = time.perf_counter()
            flat = [x.text for g in gens for x in g]
            scores, unparseable = self._scores([p for p in prompts for _ in range(n)], flat)
            stats |= {"judge_seconds": time.perf_counter() - start, "unparseable": unparseable,
                      "self_judgements": float(len(flat) * (self.config.judge_samples if self.config.judge_mode
                                                            == "generate" and not self.config.judge else 1)),
                      "ties_dropped": 0.0, "unscored_prompts": 0.0}
            for i, g in enumerate(gens):
                row = [(s, j) for j, s in enumerate(scores[i * n:(i + 1) * n]) if s is not None]
                if len(row) < 2:
                    stats["unscored_prompts"] += 1
                    continue
                hi = max(row, key=lambda t: (t[0], -t[1]))[1]
                lo = min(row, key=lambda t: (t[0], t[1]))[1]
                if scores[i * n + hi] == scores[i * n + lo]:
                    stats["ties_dropped"] += 1
                    continue
                win, lose = g[hi], g[lo]
                a[i], b[i] = win.text, lose.text
                pairs[i] = [messages[i], win.text, lose.text, win.finish_reason == "stop", lose.finish_reason == "stop"]
            stats["candidate_tokens"] = float(sum(x.tokens for g in gens for x in g))
            stats["candidate_chars"] = float(sum(len(x.text) for g in gens for x in g))
            stats["candidates"] = float(len(flat))
        self._last = _Candidates(messages, a, b, pairs, stats)
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
        """Keep the step's self-judged pairs; at an iteration's last step, train M_{t+1} on them.

        The env's verdicts are read for the ``env_agreement`` monitor only."""
        last, self._last = self._last, None
        _check_matches(last, transitions)
        metrics = dict(last.stats) | self.eft_metrics
        self.eft_metrics = {}
        kept = [i for i, p in enumerate(last.pairs) if p is not None]
        if self.done:
            return metrics | {"iteration": float(self.iteration), "pairs_kept": 0.0}
        prefs = transitions.preferences[kept] if kept else np.array([])
        judged = prefs[np.isfinite(prefs)]
        if len(judged):
            metrics["env_agreement"] = float(np.mean(judged > 0.5))  # monitoring: never a training label
        self.buffer += [last.pairs[i] for i in kept]
        self.stats["prompts"] += len(last.pairs)
        self.stats["pairs_kept"] += len(kept)
        for key in ("ties_dropped", "unscored_prompts", "unparseable", "candidate_tokens", "candidate_chars",
                    "candidates"):
            self.stats[key] += last.stats.get(key, 0.0)
        self.stats["judgements"] += last.stats.get("self_judgements", 0.0)
        self.step_in_iteration += 1
        metrics |= {"pairs_kept": float(len(kept)), "iteration": float(self.iteration),
                    "buffered_pairs": float(len(self.buffer))}
        if self.step_in_iteration >= self.config.steps_per_iteration:
            metrics |= self._finish_iteration()
        return metrics

    def _finish_iteration(self) -> dict[str, float]:
        """DPO on the iteration's pairs with M_t as reference; M_{t+1} becomes the next reference."""
        t = self.iteration + 1
        start = time.perf_counter()
        out: dict[str, float] = {}
        if not self.buffer:
            warnings.warn(f"self-rewarding iteration {t} kept no pair ({int(self.stats['ties_dropped'])} ties, "
                          f"{int(self.stats['unscored_prompts'])} prompts without two scored candidates, "
                          f"{int(self.stats['unparseable'])} unparseable judgements): M_{t} = M_{t - 1}, nothing "
                          "trained", RuntimeWarning, stacklevel=2)
            out["iteration_empty"] = 1.0
        else:
            p = self.policy
            losses = []
            for _ in range(self.config.epochs):
                order = self.rng.permutation(len(self.buffer))
                for s in range(0, len(order), self.config.train_batch):
                    batch = [self.buffer[int(i)] for i in order[s:s + self.config.train_batch]]
                    m = self.trainer.train([p.prompt_ids(x[0]) for x in batch],
                                           [p.response_ids(x[1], x[3]) for x in batch],
                                           [p.response_ids(x[2], x[4]) for x in batch])
                    losses.append(m)
            self.trainer.flush()
            out |= {k: float(np.mean([m[k] for m in losses if k in m]))
                    for k in ("loss", "reward_margin", "reward_accuracy", "implicit_kl", "trained_tokens")
                    if any(k in m for m in losses)}
            out["trained_tokens"] = float(sum(m.get("trained_tokens", 0.0) for m in losses))
            out["iteration_empty"] = 0.0
        self.folded.append(self.policy.merge_adapters())  # M_{t+1} is the reference of the next iteration
        self.trainer = PairTrainer(self.policy, self.config)  # a fresh optimizer and warm-up per iteration
        accuracy = self.judge_accuracy() if self.config.judge_eval_pairs else {}
        s = self.stats
        summary = {
            "iteration": float(t), "pairs_kept": s["pairs_kept"], "ties_dropped": s["ties_dropped"],
            "unscored_prompts": s["unscored_prompts"], "unparseable": s["unparseable"],
            "self_judgements": s["judgements"], "prompts": s["prompts"],
            "mean_length_tokens": s["candidate_tokens"] / max(s["candidates"], 1.0),
            "mean_length_chars": s["candidate_chars"] / max(s["candidates"], 1.0),
            "train_seconds": time.perf_counter() - start,
        }
        if accuracy:
            summary |= {"judge_accuracy_start": float(self.start_accuracy),
                        "judge_accuracy_end": accuracy["judge_accuracy"],
                        "judge_eval_unscored": accuracy["judge_eval_unscored"]}
            self.start_accuracy = accuracy["judge_accuracy"]  # M_{t+1} judges the next iteration
        self.history.append(summary)
        self.iteration, self.step_in_iteration, self.buffer = t, 0, []
        self._reset_iteration_stats()
        return out | {f"iteration_{k}": v for k, v in summary.items()}

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Adapters or weights, optimizer state, RNG, the iteration's pairs and counters, and the adapters folded
        into the base weights so far (LoRA; full fine-tuning saves the reference M_t instead)."""
        from safetensors.torch import save_file, save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save(folder)
        self.trainer.save(folder)
        if self.config.lora:
            save_file({f"{k}::{key}": v.contiguous() for k, state in enumerate(self.folded) for key, v in state.items()},
                      str(folder / FOLDED_FILE))
        else:
            save_model(self.policy.reference, str(folder / REFERENCE_FILE))
        save_meta(folder, self.name, self.config, {
            "rng": rng_state(self.rng), "seed": self.seed, "trainer": self.trainer.counters(),
            "iteration": self.iteration, "step_in_iteration": self.step_in_iteration, "buffer": self.buffer,
            "history": self.history, "stats": self.stats, "eft_done": self.eft_done, "folded": len(self.folded),
            "start_accuracy": self.start_accuracy})

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file, load_model

        folder = Path(folder)
        state = load_meta(folder, self.name, self.config, must_match=("model", "lora", "lora_r", "optimizer", "eft"))
        self.policy.reset_reference()
        if self.config.lora:
            flat = load_file(str(folder / FOLDED_FILE))
            self.folded = []
            for k in range(state["folded"]):
                prefix = f"{k}::"
                self.folded.append(self.policy.merge_adapters({key[len(prefix):]: v for key, v in flat.items()
                                                               if key.startswith(prefix)}))
        else:
            load_model(self.policy.reference, str(folder / REFERENCE_FILE))
            self.folded = [{}] * state["folded"]
        self.policy.load(folder)
        self.trainer = PairTrainer(self.policy, self.config)
        self.trainer.load(folder, state["trainer"])
        set_rng_state(self.rng, state["rng"])
        self.iteration, self.step_in_iteration = state["iteration"], state["step_in_iteration"]
        self.buffer, self.history, self.stats = state["buffer"], state["history"], state["stats"]
        self.eft_done, self.start_accuracy = state["eft_done"], state["start_accuracy"]
        self.eft_metrics, self._last = {}, None


def _check_matches(last: _Candidates | None, transitions: Transitions) -> None:
    if last is None:
        raise AlignEnvError("update() without a preceding act(): the agent trains on the pairs it judged itself")
    actions = transitions.actions
    if not (isinstance(actions, (tuple, list)) and len(actions) == 2
            and list(actions[0]) == last.a and list(actions[1]) == last.b):
        raise AlignEnvError("update() got actions that are not the ones this agent's last act() returned")
