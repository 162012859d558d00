"""Generation throughput of the transformers engine on the embedded policy: tokens/s at batch 1 and 8,
fp32 and bf16, and cold/warm load times.

Run: python benchmarks/perf/bench_generation.py   (or with pytest: --benchmark-enable)
"""

from __future__ import annotations

import time

import pytest
import torch

from align_env.engines.transformers_engine import TransformersEngine
from align_env.tracks import get_track

MAX_NEW = 64


def _prompts(n: int):
    return [i.messages for i in get_track("summarize").eval[:n]]


def tokens_per_second(engine: TransformersEngine, batch: int, seed: int = 0) -> float:
    # min_new_tokens is not exposed: count the tokens actually generated
    start = time.perf_counter()
    gens = engine.generate(_prompts(batch), n=1, temperature=0.9, max_new_tokens=MAX_NEW, seed=seed)
    elapsed = time.perf_counter() - start
    return sum(g[0].tokens for g in gens) / elapsed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 8])
def test_generation_tokens_per_second(benchmark, batch, dtype):
    engine = TransformersEngine.from_name("smollm2-135m", dtype=getattr(torch, dtype))
    rate = benchmark.pedantic(tokens_per_second, args=(engine, batch), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_second"] = rate


def main() -> None:
    start = time.perf_counter()
    import transformers  # noqa: F401  (import cost is not load cost)

    print(f"import transformers: {time.perf_counter() - start:.2f}s")
    from align_env.models import load_causal_lm

    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        model, tok = load_causal_lm("smollm2-135m", dtype=dtype)
        print(f"warm load smollm2-135m ({dtype}): {time.perf_counter() - start:.2f}s")
        engine = TransformersEngine(model, tok)
        tokens_per_second(engine, 1)  # warm up
        for batch in (1, 8):
            print(f"  batch {batch}: {tokens_per_second(engine, batch):.1f} tokens/s")


if __name__ == "__main__":
    main()
