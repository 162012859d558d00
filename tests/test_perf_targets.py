"""``benchmarks/perf/bench_all.py`` judges each speed target from the figures its three scripts return."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "perf"))
from bench_all import targets  # noqa: E402


def _figures(tokens_after: float, decode_s: float, step_s: float, matched: float, best: float, judged_s: float):
    before = {"tokens_per_s": 100.0}
    limits = {"paths": {
        "before": {"bf16": True, "fast": False, "draw": None, "tokens_per_s": 100.0},
        "same draw": {"bf16": True, "fast": True, "draw": "multinomial", "tokens_per_s": 1e6, "before": before},
        "after": {"bf16": True, "fast": True, "draw": None, "tokens_per_s": tokens_after, "before": before,
                  "decode_step_s": decode_s, "bandwidth_limit_s": 0.01}}}
    annotators = [{"spec": "minilm-l6:embedding", "seconds_per_training_step": judged_s}]
    step = {"matmul_peak_flops": 1e11, "matmul_peak_flops_bf16": 4e11,
            "ours_full_fp32": {"flops_per_step": 1e12, "step_seconds": 50.0},
            "ours_lora_bf16": {"flops_per_step": 4e12, "step_seconds": step_s},
            "ratios": {"matched": matched, "best_vs_best": best, "best_ours": "ours_lora_bf16",
                       "best_trl": "trl_full_bf16_no_ckpt"}}
    return limits, annotators, step


def test_targets_met_and_missed_are_told_apart():
    met = targets(*_figures(tokens_after=310, decode_s=0.019, step_s=14.0, matched=3.1, best=4.2, judged_s=1.0))
    assert [r[3] for r in met] == [True] * 6
    missed = targets(*_figures(tokens_after=150, decode_s=0.066, step_s=28.0, matched=1.4, best=2.0, judged_s=40))
    assert [r[3] for r in missed] == [False] * 6
    by_name = {r[0]: r[2] for r in missed}
    assert by_name["decode step / its memory-bandwidth limit"] == "6.6x"
    assert by_name["whole step: FLOP limit / step time"] == "36%"  # 4e12 / 4e11 = 10 s of 28 s
    sampling = next(v for k, v in by_name.items() if k.startswith("sampling tokens/s"))
    assert sampling == "1.50x"  # the rule's path ("after"), not the same-draw one (1e6 tokens/s)
    assert by_name["samples/s vs TRL, matched (full, fp32)"] == "1.40x"


def test_without_bf16_the_fp32_step_is_judged():
    limits, annotators, step = _figures(tokens_after=310, decode_s=0.019, step_s=14.0, matched=3.1, best=4.2,
                                        judged_s=1.0)
    del step["ours_lora_bf16"]
    rows = {r[0]: r for r in targets(limits, annotators, step)}
    assert rows["whole step: FLOP limit / step time"][2] == "20%"  # 1e12 / 1e11 = 10 s of 50 s
    with pytest.raises(StopIteration):
        targets({"paths": {}}, annotators, step)
