"""``rlsf-ppo``: reinforcement learning from synthetic feedback (ALMoST; Kim et al. 2023, arXiv 2305.13735).

The algorithm box (``docs/algorithms.md``, section 4). No annotator labels anything the agent trains on::

    1. candidates   for x in D_synth (synth_prompts train prompts), for each configuration c = (model, shots, demos):
                        y_c ~ model(. | demos_c[:shots], x)
    2. comparisons  pairs (y_hi, y_lo) ranked by the ranking rules, filtered (empty, same rank, identical, length)
    3. reward model r = argmin sum -log sigma(r(x, y_hi) - r(x, y_lo))      (linear head on the last token)
    4. RMSP         for x in D_rmsp, for each of ``rmsp_turns`` assistant turns:
                        y* = argmax_{y_1..y_N ~ best configuration} r(x, y)   (the user turn in between is
                        simulated by the best configuration's model)
    5. SFT          pi_SFT = argmax sum log pi(y* | x) on the kept turns
    6. PPO          in the env, one step per batch of prompts:  y ~ pi_theta(. | x)  (act),
                        maximise E[r(x, y)] - kl_coef * KL(pi_theta || pi_SFT)  (update; agents.ppo)

Stages 1-5 run once, the first time the agent needs its policy (``act``, ``respond`` or ``load``), each a
resumable stage whose output is saved and verified (:mod:`agents.stages`) in ``work_dir``; a killed run restarts
from the first stage without a usable output. Stage 6 is the training loop: the agent acts for ``scalar``
feedback and its own reward model gives the scores PPO trains on; the env's annotator is stepped for monitoring
only (its scores are logged as ``monitor_score``, its calls counted by the loop apart from the agent's). The
agent reports ``annotator_calls = 0``: no annotator judgement enters training.

Our choices where the paper gives none (documented in the config's help): the configurations, N, the turn
count, the PPO settings and LoRA adapters for SFT and PPO on CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.policy import LoraSettings, Policy
from agents.ppo import PPOSettings, PPOTrainer
from agents.protocol import Transitions, load_meta, rng_state, save_meta, set_rng_state
from agents.reward_trainer import (RewardModelNaNError, RewardTrainingSettings, TextComparison, accuracy,
                                   load_reward_backbone, train_reward_model)
from agents.stages import StageStore, key_of
from agents.synthetic import Comparison, RankingRules, compare, parse_configurations, prompt_messages
from align_env.errors import AlignEnvError

STAGES = ("candidates", "comparisons", "reward_model", "rmsp", "sft")
USER_SIMULATOR = ("Here is a conversation between a user and an AI assistant.\n\n{transcript}\n\nWrite the user's "
                  "next message: one short follow-up question about the assistant's last answer. Reply with the "
                  "message only.")


@dataclass
class RLSFConfig(PPOSettings):
    """The pipeline's settings (stages 1-5) and PPO's (stage 6, inherited from :class:`agents.ppo.PPOSettings`)."""

    model: str = field(default="smollm2-135m", metadata={"help": "policy: catalogue name, local folder or hub id"})
    configurations: str = field(default=(
        "gemma3-270m|3|faithful; gemma3-270m|1|poor; smollm2-135m|3|faithful; smollm2-135m|0|-"), metadata={
        "help": "prompted configurations 'model|shots|demos' (';'-separated) that answer the synthetic prompts "
                "(our choice: the two embedded models, 0/1/3 shots, the faithful and poor sets of "
                "agents.almost_demos)"})
    ranking_rules: str = field(default="model: gemma3-270m > smollm2-135m; shots: 3 > 1 > 0; demos: faithful > poor",
                               metadata={"help": "per-axis orders 'axis: a > b > c' (';'-separated; axes model, "
                                                 "shots, demos): the paper's rules of thumb as configuration"})
    synth_prompts: int = field(default=32, metadata={"help": "train prompts answered by every configuration"})
    synth_temperature: float = field(default=0.7, metadata={
        "help": "sampling temperature of the configurations and of RMSP's candidates (our choice)"})
    synth_top_p: float = field(default=0.9, metadata={"help": "nucleus threshold of the same samples (our choice)"})
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens per response, in every stage"})
    rm_backbone: str = field(default="", metadata={"help": "reward-model backbone; empty: the policy's model"})
    rm_lr: float = field(default=2e-5, metadata={"help": "reward-model learning rate (paper: 2e-5, full weights)"})
    rm_epochs: int = field(default=1, metadata={"help": "reward-model epochs (paper: 1)"})
    rm_batch_size: int = field(default=4, metadata={"help": "reward-model pairs per step"})
    rmsp_prompts: int = field(default=32, metadata={"help": "train prompts RMSP answers (its demonstrations)"})
    rmsp_n: int = field(default=4, metadata={"help": "RMSP candidates per assistant turn (paper: not published)"})
    rmsp_turns: int = field(default=1, metadata={
        "help": "assistant turns per RMSP dialogue; > 1 simulates the user in between with the best configuration's "
                "model (paper: multi-turn, count not published; 1 keeps CPU runs short)"})
    sft_lr: float = field(default=1e-4, metadata={
        "help": "SFT learning rate of the LoRA adapters (paper: 2e-5 for full weights; adapters need more)"})
    sft_epochs: int = field(default=3, metadata={"help": "SFT epochs (paper: 3)"})
    sft_batch_size: int = field(default=4, metadata={"help": "SFT demonstrations per step"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the SFT and PPO adapters"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator"})
    temperature: float = field(default=1.0, metadata={
        "help": "PPO sampling temperature (1: the samples come from the policy whose log-probs PPO uses)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on CPU for sampling and forward passes"})
    work_dir: str = field(default="", metadata={
        "help": "where the stage outputs live; empty: <align-env cache>/rlsf/<hash of the pipeline settings>"})

    def __post_init__(self):
        bad = self.check_ppo()
        checks = {"synth_prompts >= 1": self.synth_prompts >= 1, "rmsp_prompts >= 1": self.rmsp_prompts >= 1,
                  "rmsp_n >= 1": self.rmsp_n >= 1, "rmsp_turns >= 1": self.rmsp_turns >= 1,
                  "synth_temperature > 0": self.synth_temperature > 0,
                  "0 < synth_top_p <= 1": 0 < self.synth_top_p <= 1,
                  "max_new_tokens >= 1": self.max_new_tokens >= 1, "rm_lr > 0": self.rm_lr > 0,
                  "rm_epochs >= 1": self.rm_epochs >= 1, "rm_batch_size >= 1": self.rm_batch_size >= 1,
                  "sft_lr > 0": self.sft_lr > 0, "sft_epochs >= 0": self.sft_epochs >= 0,
                  "sft_batch_size >= 1": self.sft_batch_size >= 1, "lora_r >= 1": self.lora_r >= 1,
                  "temperature > 0": self.temperature > 0}
        bad += [name for name, ok in checks.items() if not ok]
        if bad:
            raise AlignEnvError(f"RLSFConfig: need {', '.join(bad)}")
        configs = parse_configurations(self.configurations)  # clear errors now, not after a stage ran
        rules = RankingRules(self.ranking_rules)
        if not any(rules.beats(a, b) for a in configs for b in configs):
            raise AlignEnvError(f"the ranking rules {self.ranking_rules!r} order no two of the configurations "
                                f"{[c.name for c in configs]}: every pair would be dropped as same rank")


def _item(messages: list, prompt: str | None = None):
    from align_env.tracks.track import PromptItem

    last = messages[-1]["content"]
    return PromptItem(id="", prompt=prompt if prompt is not None else last, source=last,
                      history=tuple(dict(m) for m in messages[:-1]))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


class RLSFPPO:
    """RLSF-PPO (see the module docstring)."""

    name = "rlsf-ppo"
    Config = RLSFConfig
    feedback = "scalar"

    def __init__(self, config: RLSFConfig, *, track: str, annotator: Any = None, seed: int = 0):
        from align_env.tracks import get_track

        self.config, self.track, self.seed = config, track, int(seed)
        self.annotator_spec = annotator  # the env's annotator: monitoring only
        self._track = get_track(track)
        self.configs = parse_configurations(config.configurations)
        self.rules = RankingRules(config.ranking_rules)
        self.keys = self._stage_keys()
        root = Path(config.work_dir) if config.work_dir else self._default_root()
        self.stages = StageStore(root, log=self._log)
        self.messages: list[str] = []
        self.summary: dict[str, Any] = {}
        self.policy: Policy | None = None
        self.trainer: PPOTrainer | None = None
        self.reward_model = None
        self.rng = np.random.default_rng(self.seed)
        self._last: tuple | None = None
        self._summary_pending = True

    # -- stage bookkeeping --------------------------------------------------------------------------------
    def _stage_keys(self) -> dict[str, str]:
        c = self.config
        keys = {"candidates": key_of(self._track.id, self._track.content_hash, self.seed,
                                     [x.name for x in self.configs], c.synth_prompts, c.synth_temperature,
                                     c.synth_top_p, c.max_new_tokens)}
        keys["comparisons"] = key_of(keys["candidates"], c.ranking_rules)
        keys["reward_model"] = key_of(keys["comparisons"], c.rm_backbone or c.model, c.rm_lr, c.rm_epochs,
                                      c.rm_batch_size)
        keys["rmsp"] = key_of(keys["reward_model"], c.rmsp_prompts, c.rmsp_n, c.rmsp_turns)
        keys["sft"] = key_of(keys["rmsp"], c.model, c.sft_lr, c.sft_epochs, c.sft_batch_size, c.lora_r, c.lora_alpha)
        return keys

    def _default_root(self) -> Path:
        from align_env.models import cache_dir

        return cache_dir() / "rlsf" / self.keys["sft"]

    def _log(self, message: str) -> None:
        self.messages.append(message)

    def _seed_for(self, *parts: Any) -> int:
        return int(key_of(self.seed, *parts)[:8], 16) % 2**31

    def _train_items(self, n: int, stream: str) -> list:
        items = self._track.split("train")
        order = np.random.default_rng([self.seed, int(key_of(stream)[:6], 16)]).permutation(len(items))
        return [items[int(i)] for i in order[:n]]

    def prepare(self) -> None:
        """Run (or reuse) stages 1-5 and build the PPO policy on the SFT weights, the value head and the RM."""
        if self.policy is not None:
            return
        for name in STAGES:
            folder, result = self.stages.run(name, self.keys[name], getattr(self, f"_{name}"),
                                             fresh=name != "reward_model")
            self.summary[name] = result
        from align_env.feedback import make_annotator

        c = self.config
        self.reward_model = make_annotator(f"{self.stages.folder('reward_model')}:reward_model?cache=off",
                                           track=self.track)
        self.policy = Policy(str(self.stages.folder("sft")), lora=LoraSettings(r=c.lora_r, alpha=c.lora_alpha),
                             seed=self.seed, bf16=c.bf16, max_new_tokens=c.max_new_tokens)
        self.trainer = PPOTrainer(self.policy, c, seed=self.seed)

    # -- stage 1: candidates ------------------------------------------------------------------------------
    def _candidates(self, work: Path) -> dict[str, Any]:
        from align_env.engines.transformers_engine import TransformersEngine

        start = time.perf_counter()
        c = self.config
        items = self._train_items(c.synth_prompts, "synth")
        texts = [[""] * len(self.configs) for _ in items]
        for model in dict.fromkeys(x.model for x in self.configs):
            engine = TransformersEngine.from_name(model)
            for k, config in enumerate(self.configs):
                if config.model != model:
                    continue
                prompts = [prompt_messages(config, self.track, item.messages) for item in items]
                gens = engine.generate(prompts, n=1, temperature=c.synth_temperature, top_p=c.synth_top_p,
                                       max_new_tokens=c.max_new_tokens, seed=self._seed_for("candidates", config.name))
                for i, g in enumerate(gens):
                    texts[i][k] = g[0].text
            del engine
        _write_json(work / "candidates.json",
                    {"items": [i.id for i in items], "configs": [x.name for x in self.configs], "texts": texts})
        mean_words = {x.name: float(np.mean([len(t[k].split()) for t in texts])) for k, x in enumerate(self.configs)}
        return {"prompts": len(items), "configurations": len(self.configs), "mean_words": mean_words,
                "seconds": time.perf_counter() - start}

    def _read_candidates(self) -> tuple[list, list[list[str]]]:
        data = json.loads((self.stages.folder("candidates") / "candidates.json").read_text(encoding="utf-8"))
        by_id = {i.id: i for i in self._track.split("train")}
        return [by_id[i] for i in data["items"]], data["texts"]

    # -- stage 2: comparisons -----------------------------------------------------------------------------
    def _comparisons(self, work: Path) -> dict[str, Any]:
        start = time.perf_counter()
        items, texts = self._read_candidates()
        kept, dropped = compare(texts, self.configs, self.rules)
        _write_json(work / "comparisons.json", {"kept": [asdict(k) for k in kept], "dropped": dropped})
        total = len(kept) + sum(dropped.values())
        self._log(f"comparisons: {len(kept)} of {total} pairs kept; dropped per rule {dropped}")
        return {"kept": len(kept), "pairs": total, "dropped": dropped, "seconds": time.perf_counter() - start}

    # -- stage 3: reward model ----------------------------------------------------------------------------
    def _reward_model(self, work: Path) -> dict[str, Any]:
        start = time.perf_counter()
        c = self.config
        items, _ = self._read_candidates()
        data = json.loads((self.stages.folder("comparisons") / "comparisons.json").read_text(encoding="utf-8"))
        pairs = [TextComparison(items[k.prompt].messages, k.chosen, k.rejected)
                 for k in (Comparison(**row) for row in data["kept"])]
        settings = RewardTrainingSettings(lr=c.rm_lr, epochs=c.rm_epochs, batch_size=c.rm_batch_size)
        report = train_reward_model(c.rm_backbone or c.model, pairs, work, settings, seed=self.seed)
        model, tokenizer = load_reward_backbone(str(work), seed=self.seed)
        labelled = [TextComparison(p.item.messages, p.chosen, p.rejected) for p in self._track.report_pairs]
        held = accuracy(model, tokenizer, labelled)
        del model
        losses = report["losses"]
        return {"pairs": len(pairs), "steps": report["steps"], "train_accuracy": report["train_accuracy"],
                "first_loss": losses[0], "last_loss": losses[-1], "report_accuracy": held["accuracy"],
                "report_loss": held["loss"], "report_pairs": held["pairs"], "seconds": time.perf_counter() - start}

    # -- stage 4: RMSP ------------------------------------------------------------------------------------
    def _rmsp(self, work: Path) -> dict[str, Any]:
        from align_env.engines.transformers_engine import TransformersEngine
        from align_env.feedback import make_annotator

        start = time.perf_counter()
        c = self.config
        best = self.rules.best(self.configs)
        rm = make_annotator(f"{self.stages.folder('reward_model')}:reward_model?cache=off", track=self.track)
        engine = TransformersEngine.from_name(best.model)
        dialogues = [[dict(m) for m in item.messages] for item in self._train_items(c.rmsp_prompts, "rmsp")]
        demos, kept_scores, all_scores = [], [], []
        for turn in range(c.rmsp_turns):
            gens = engine.generate([prompt_messages(best, self.track, d) for d in dialogues], n=c.rmsp_n,
                                   temperature=c.synth_temperature, top_p=c.synth_top_p,
                                   max_new_tokens=c.max_new_tokens, seed=self._seed_for("rmsp", turn))
            flat_items = [_item(d) for d, g in zip(dialogues, gens) for _ in g]
            scores = rm.score(flat_items, [x.text for g in gens for x in g])
            if any(s is None or not np.isfinite(s) for s in scores):
                raise RewardModelNaNError(f"the reward model gave a non-finite score in RMSP turn {turn + 1}; stopped "
                                          f"(the reward model in {self.stages.folder('reward_model')} is kept)")
            for i, g in enumerate(gens):
                group = scores[i * c.rmsp_n : (i + 1) * c.rmsp_n]
                j = int(np.argmax(group))
                demos.append({"messages": [dict(m) for m in dialogues[i]], "response": g[j].text,
                              "ended": g[j].finish_reason == "stop", "score": float(group[j])})
                kept_scores.append(float(group[j]))
                all_scores += [float(s) for s in group]
                dialogues[i].append({"role": "assistant", "content": g[j].text})
            if turn + 1 < c.rmsp_turns:
                self._simulate_users(engine, dialogues, turn)
        _write_json(work / "demonstrations.json", demos)
        return {"best_configuration": best.name, "demonstrations": len(demos),
                "kept_score": float(np.mean(kept_scores)), "candidate_score": float(np.mean(all_scores)),
                "seconds": time.perf_counter() - start}

    def _simulate_users(self, engine, dialogues: list[list[dict]], turn: int) -> None:
        """The next user turn of each dialogue, written by the best configuration's model prompted as the user."""
        def transcript(d):
            return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in d)

        prompts = [[{"role": "user", "content": USER_SIMULATOR.format(transcript=transcript(d))}] for d in dialogues]
        gens = engine.generate(prompts, n=1, temperature=self.config.synth_temperature, top_p=self.config.synth_top_p,
                               max_new_tokens=self.config.max_new_tokens, seed=self._seed_for("user", turn))
        for d, g in zip(dialogues, gens):
            d.append({"role": "user", "content": g[0].text or "Can you say more?"})

    # -- stage 5: SFT -------------------------------------------------------------------------------------
    def _sft(self, work: Path) -> dict[str, Any]:
        start = time.perf_counter()
        c = self.config
        demos = json.loads((self.stages.folder("rmsp") / "demonstrations.json").read_text(encoding="utf-8"))
        policy = Policy(c.model, lora=LoraSettings(r=c.lora_r, alpha=c.lora_alpha), seed=self.seed,
                        max_new_tokens=c.max_new_tokens, merged_sampler=False)
        prompts = [policy.prompt_ids(d["messages"]) for d in demos]
        responses = [policy.response_ids(d["response"], d["ended"]) for d in demos]
        params = policy.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=c.sft_lr, weight_decay=0.0)
        epoch_losses = []
        for epoch in range(c.sft_epochs):
            order = np.random.default_rng([self.seed, 5, epoch]).permutation(len(demos))
            losses = []
            for s in range(0, len(demos), c.sft_batch_size):
                idx = [int(i) for i in order[s : s + c.sft_batch_size]]
                logp, _ = policy.logprobs([prompts[i] for i in idx], [[responses[i]] for i in idx])
                tokens = sum(len(responses[i]) for i in idx)
                loss = -logp.sum() / max(tokens, 1)
                if not torch.isfinite(loss):
                    raise AlignEnvError(f"SFT loss is not finite at epoch {epoch + 1}; lower sft_lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                losses.append(loss.item())
            epoch_losses.append(float(np.mean(losses)))
        merged = policy.model.merge_and_unload()
        merged.save_pretrained(work, safe_serialization=True)
        policy.tokenizer.save_pretrained(work)
        return {"demonstrations": len(demos), "epoch_losses": epoch_losses, "seconds": time.perf_counter() - start}

    # -- stage 6: PPO in the env --------------------------------------------------------------------------
    def act(self, observations: dict[str, tuple]) -> list[str]:
        """One sample per prompt from the current policy (scored by the agent's reward model in ``update``)."""
        self.prepare()
        messages = list(observations["messages"])
        start = time.perf_counter()
        gens = self.policy.sample(messages, n=1, temperature=self.config.temperature, top_p=1.0,
                                  seed=int(self.rng.integers(2**31)))
        self._last = (messages, list(observations["prompt"]), [g[0] for g in gens], time.perf_counter() - start)
        return [g[0].text for g in gens]

    def respond(self, observations: dict[str, tuple], *, seed: int = 0, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """One answer per prompt from the current policy, for evaluation; leaves the agent's RNG alone."""
        self.prepare()
        gens = self.policy.sample(list(observations["messages"]), n=1,
                                  temperature=self.config.temperature if temperature is None else temperature,
                                  top_p=1.0 if top_p is None else top_p, max_new_tokens=max_new_tokens, seed=seed)
        return [g[0].text for g in gens]

    def update(self, transitions: Transitions) -> dict[str, float]:
        """Score the sampled answers with the agent's reward model and make one PPO update on them."""
        if self._last is None:
            raise AlignEnvError("update() without a preceding act(): PPO trains on the answers it sampled itself")
        (messages, prompts, gens, seconds), self._last = self._last, None
        if list(transitions.actions) != [g.text for g in gens]:
            raise AlignEnvError("update() got actions that are not the ones this agent's last act() returned")
        before = self.reward_model.cost.calls
        scores = self.reward_model.score([_item(m, p) for m, p in zip(messages, prompts)], [g.text for g in gens])
        if any(s is None or not np.isfinite(s) for s in scores):
            raise RewardModelNaNError(f"the agent's reward model gave non-finite scores {scores}; stopped (the last "
                                      "checkpoint is kept)")
        start = time.perf_counter()
        p = self.policy
        metrics = self.trainer.step([p.prompt_ids(m) for m in messages],
                                    [p.response_ids(g.text, g.finish_reason == "stop") for g in gens], scores)
        env_scores = np.asarray(transitions.infos.get("score", transitions.rewards), dtype=object)
        judged = [float(s) for s in env_scores if s is not None and np.isfinite(float(s))]
        lengths = [g.tokens for g in gens]
        metrics |= {
            "annotator_calls": 0.0,  # training labels come from the agent's own reward model
            "rm_calls": float(self.reward_model.cost.calls - before),
            "monitor_score": float(np.mean(judged)) if judged else float("nan"),
            "monitor_abstained": float(len(env_scores) - len(judged)),
            "response_length": float(np.mean(lengths)), "generated_tokens": float(sum(lengths)),
            "tokens_per_second": sum(lengths) / max(seconds, 1e-9), "sample_seconds": seconds,
            "update_seconds": time.perf_counter() - start,
        }
        if not judged:
            metrics.pop("monitor_score")
        rm = self.summary.get("reward_model", {})
        if self._summary_pending and rm:
            metrics |= {"rm_report_accuracy": float(rm["report_accuracy"]),
                        "rm_train_accuracy": float(rm["train_accuracy"]), "synthetic_pairs": float(rm["pairs"])}
            self._summary_pending = False
        return metrics

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """PPO adapters, value head, optimizer, KL coefficient, RNGs; the stage keys the weights were built on."""
        self.prepare()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.policy.save(folder)
        self.trainer.save(folder)
        save_meta(folder, self.name, self.config, {"rng": rng_state(self.rng), "seed": self.seed,
                                                   "stage_keys": self.keys, "work_dir": str(self.stages.root),
                                                   "summary_pending": self._summary_pending})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = load_meta(folder, self.name, self.config, must_match=(
            "model", "configurations", "ranking_rules", "lora_r", "rm_backbone"))
        if state["stage_keys"] != self.keys:
            raise AlignEnvError(f"{folder} was trained on other pipeline outputs (stage keys {state['stage_keys']}) "
                                f"than this config builds ({self.keys})")
        self.prepare()
        self.policy.load(folder)
        self.trainer.load(folder)
        set_rng_state(self.rng, state["rng"])
        self._summary_pending = bool(state.get("summary_pending", False))
        self._last = None
