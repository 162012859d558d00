"""Batched annotation is the fast path: pairs judged per second, batched vs one by one, same annotator.

Run: python -m pytest benchmarks/perf/bench_annotation_batching.py --benchmark-enable -s
(needs the embedded smollm2-135m; the batch runs the engine at batch size 8).
"""

from __future__ import annotations

import time

import pytest

from align_env.feedback import make_annotator
from align_env.tracks import get_track

N_PAIRS = 16
SPECS = ["smollm2-135m:likelihood?mode=pmi&cache=off", "smollm2-135m:llm_judge?cache=off"]


def _pairs(track: str = "summarize"):
    pairs = get_track(track).pairs[:N_PAIRS]
    return [p.item for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]


def _batched(ann, items, a, b):
    return ann.pairwise(items, a, b)


def _one_by_one(ann, items, a, b):
    return [ann.pairwise([i], [x], [y])[0] for i, x, y in zip(items, a, b)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("mode", ["batched", "one_by_one"])
def test_annotation_throughput(benchmark, spec, mode):
    ann = make_annotator(spec, track="summarize")
    items, a, b = _pairs()
    fn = _batched if mode == "batched" else _one_by_one
    result = benchmark.pedantic(fn, args=(ann, items, a, b), rounds=2, iterations=1, warmup_rounds=1)
    assert len(result) == N_PAIRS
    benchmark.extra_info["pairs_per_second"] = N_PAIRS / benchmark.stats.stats.median


def main() -> None:
    """Side-by-side ratio without pytest: prints pairs/s for both and batched/one-by-one."""
    items, a, b = _pairs()
    for spec in SPECS:
        ann = make_annotator(spec, track="summarize")
        _batched(ann, items[:2], a[:2], b[:2])  # warm up
        rates = {}
        for name, fn in (("batched", _batched), ("one_by_one", _one_by_one)):
            start = time.perf_counter()
            fn(ann, items, a, b)
            rates[name] = N_PAIRS / (time.perf_counter() - start)
        print(f"{spec}: batched {rates['batched']:.2f} pairs/s, one by one {rates['one_by_one']:.2f} pairs/s, "
              f"ratio {rates['batched'] / rates['one_by_one']:.2f}x")


if __name__ == "__main__":
    main()
