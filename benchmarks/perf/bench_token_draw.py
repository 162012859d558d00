"""The two token draws of the fast CPU sampling loop side by side: 5 alternating rounds of the committed run's
sampling (bf16 packed sampling copy, 8 prompts x 2 samples x 64 new tokens), medians per draw and their ratio.
Alternating rounds, because this machine drifts by 20-30% within minutes (a single pair of runs misleads).

Run: python benchmarks/perf/bench_token_draw.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MODEL, PROMPTS, SAMPLES, NEW_TOKENS = "smollm2-135m", 8, 2, 64


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from agents.policy import linear_weights_to_bf16
    from align_env.engines.packed_linear import pack_linears
    from align_env.engines.transformers_engine import TransformersEngine
    from align_env.models import load_causal_lm
    from align_env.tracks import get_track

    model, tok = load_causal_lm(MODEL)
    model.requires_grad_(False).eval()
    linear_weights_to_bf16(model)  # the sampling copy as agents.policy.Policy builds it under bf16
    pack_linears(model)
    prompts = [item.messages for item in get_track("summarize").train[:PROMPTS]]
    engines = {draw: TransformersEngine(model, tok, token_draw=draw) for draw in ("multinomial", "inverse_cdf")}

    def run(engine, new_tokens: int, seed: int):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            start = time.perf_counter()
            gens = engine.generate(prompts, n=SAMPLES, temperature=0.9, max_new_tokens=new_tokens, seed=seed)
            return time.perf_counter() - start, gens

    for engine in engines.values():
        run(engine, 4, 0)  # warm-up
    steps: dict[str, list[float]] = {d: [] for d in engines}
    rates: dict[str, list[float]] = {d: [] for d in engines}
    for seed in range(args.rounds):
        for draw, engine in engines.items():
            prefill, _ = run(engine, 1, seed)
            full, gens = run(engine, NEW_TOKENS, seed)
            longest = max(g.tokens for row in gens for g in row)
            steps[draw].append((full - prefill) / max(longest - 1, 1))
            rates[draw].append(sum(g.tokens for row in gens for g in row) / full)
    out = {}
    for draw in engines:
        out[draw] = statistics.median(steps[draw])
        print(f"{draw:12s} decode step ms: median {out[draw] * 1e3:.1f} min {min(steps[draw]) * 1e3:.1f}; "
              f"tokens/s median {statistics.median(rates[draw]):.0f}")
    print(f"inverse_cdf / multinomial decode step (medians): {out['inverse_cdf'] / out['multinomial']:.2f}")
    return out


if __name__ == "__main__":
    main()
