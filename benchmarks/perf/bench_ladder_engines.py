"""Which engine judges fastest at the size ladder's sizes? One model, one judge, three ways, side by side.

``python benchmarks/perf/bench_ladder_engines.py [--model qwen2.5-coder-0.5b] [--pairs 4]`` judges the same
summarize pairs (both orders, content-free calibration) with the transformers engine in fp32, the transformers
engine in bf16, and llama.cpp in-process on the GGUF itself (4-bit weights), and prints seconds per pair and the
ratios to fp32. Run it with the machine otherwise idle; the rates move with other processes' load, so compare
them within one run. The CPU's features decide: bf16 pays where the CPU has bf16 matrix units (AMX, AVX512-BF16),
not elsewhere (see DEVELOPERS.md).
"""

from __future__ import annotations

import argparse
import gc
import time

from align_env.feedback import make_annotator
from align_env.tracks import get_track

WAYS = {
    "transformers fp32": "{m}:llm_judge?calibrate=content_free&cache=off",
    "transformers bf16": "{m}:llm_judge?calibrate=content_free&dtype=bfloat16&cache=off",
    "llama.cpp (GGUF)": "{m}:llm_judge?calibrate=content_free&engine=llama_cpp&cache=off",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    pairs = get_track("summarize").pairs[: args.pairs]
    items, a, b = [p.item for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    seconds, verdicts = {}, {}
    for name, spec in WAYS.items():
        judge = make_annotator(spec.format(m=args.model), track="summarize")
        judge.pairwise(items[:1], a[:1], b[:1])  # warm-up (and the content-free prior)
        start = time.perf_counter()
        verdicts[name] = judge.pairwise(items, a, b)
        seconds[name] = (time.perf_counter() - start) / len(items)
        del judge
        gc.collect()
    base = seconds["transformers fp32"]
    for name in WAYS:
        agree = sum((x > 0.5) == (y > 0.5) for x, y in zip(verdicts[name], verdicts["transformers fp32"]))
        print(f"{name:<20} {seconds[name]:7.2f} s/pair   {base / seconds[name]:5.2f}x fp32   "
              f"same verdict as fp32 on {agree}/{len(items)}")


if __name__ == "__main__":
    main()
