"""Judging throughput of the recommended annotators against the FLOP limit, and against a training step's demand.

For each annotator (default: every track's recommended annotator and the committed run's training annotator
``minilm-l6:embedding``), on ``--pairs`` labelled pairs of its track, batched as the environment calls it:

* judgements per second (the best of ``--rounds`` timed calls; a pairwise judgement covers both orders where
  the family judges both);
* the matmul and attention FLOPs of one call (torch's FlopCounterMode, a separate untimed call) and the
  achieved FLOP/s against the matmul peak measured in the same process at the annotator's precision (bf16
  for ``dtype=bfloat16`` specs, fp32 otherwise): the FLOP limit of a judgement is its FLOPs over that peak;
* seconds of judging per training step of the committed run (8 pairs a step), to set against the step's
  time (``leaderboards/perf/``): an annotator that takes longer than the agent's step is the bottleneck.

Rule-based annotators count no FLOPs (plain Python); they print judgements per second only.

Run: python benchmarks/perf/bench_annotator_flops.py [--pairs 8] [--rounds 2] [SPEC@TRACK ...]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_vs_trl import matmul_peak

PAIRS_PER_STEP = 8  # the committed run: 8 prompts x 2 samples, one pairwise judgement per prompt


def default_specs() -> list[str]:
    from align_env.feedback import RECOMMENDED_ANNOTATORS

    return [f"{spec}@{track}" for track, spec in sorted(RECOMMENDED_ANNOTATORS.items())] + [
        "minilm-l6:embedding@summarize"]


def judge(spec: str, track: str, pairs: int, rounds: int, peaks: dict[str, float]) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from align_env.feedback import make_annotator
    from align_env.tracks import get_track

    cached = spec + ("&" if "?" in spec else "?") + "cache=off" if ":" in spec else spec
    ann = make_annotator(cached, track=track)
    labelled = get_track(track).pairs[:pairs]
    items, a, b = [p.item for p in labelled], [p.chosen for p in labelled], [p.rejected for p in labelled]
    start = time.perf_counter()
    ann.pairwise(items[:1], a[:1], b[:1])  # load and warm up
    load = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        ann.pairwise(items, a, b)
    flops = counter.get_total_flops()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        ann.pairwise(items, a, b)
        best = min(best, time.perf_counter() - start)
    precision = "bf16" if "dtype=bfloat16" in spec else "fp32"
    return {"spec": spec, "track": track, "load_s": load, "seconds": best, "pairs": pairs, "flops": flops,
            "precision": precision, "peak": peaks[precision]}


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints a line per annotator; returns the figures (for ``bench_all.py``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("specs", nargs="*", help="SPEC@TRACK (default: the recommended annotators + minilm)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    peaks = {"fp32": matmul_peak(), "bf16": matmul_peak(dtype=torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for entry in args.specs or default_specs():
        spec, _, track = entry.rpartition("@")
        r = judge(spec, track, args.pairs, args.rounds, peaks)
        results.append(r | {"spec": spec, "track": track,
                            "seconds_per_training_step": PAIRS_PER_STEP * r["seconds"] / r["pairs"]})
        rate = r["pairs"] / r["seconds"]
        line = (f"{spec} on {track}: {rate:.3g} judgements/s ({r['seconds'] / r['pairs']:.3g} s each; "
                f"{PAIRS_PER_STEP * r['seconds'] / r['pairs']:.1f} s per training step of {PAIRS_PER_STEP} pairs); "
                f"load {r['load_s']:.0f} s")
        if r["flops"]:
            achieved = r["flops"] / r["seconds"]
            line += (f"; {r['flops'] / r['pairs'] / 1e9:.1f} GFLOP per judgement, {achieved / 1e9:.0f} GFLOP/s = "
                     f"{achieved / r['peak']:.0%} of the {r['precision']} matmul peak (FLOP limit "
                     f"{r['flops'] / r['pairs'] / r['peak']:.3g} s per judgement)")
        else:
            line += "; no tensor FLOPs (rule-based)"
        print(line, flush=True)
    return results


if __name__ == "__main__":
    main()
