"""Every speed figure of issue 12 in one run, and where each stands against its target.

Runs, in this order and in one process (so every ratio divides figures measured the same hour):
``bench_limits.py`` (sampling against the memory-bandwidth limit), ``bench_annotator_flops.py`` (judging
throughput against the FLOP limit) and ``bench_vs_trl.py --bf16`` (the whole step, against TRL and against the
FLOP limit), then prints a table: target, measured, met or not. Peak memory is not here: it needs a run of
its own process (``leaderboards/perf/README.md``, the 40-step run).

Targets (issue 12): sampling tokens/s at least 3x the transformers path's at the committed run's settings;
a decode step within 2x of its bandwidth limit; the whole step at least 70% of its FLOP limit; at least 3x
TRL's samples/s matched (full fine-tuning, fp32) and 4x best against best; the annotator's judging per step
shorter than the agent's step.

Run: python benchmarks/perf/bench_all.py [--steps 2] [--json out.json]   (about 35 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json

import bench_annotator_flops
import bench_limits
import bench_vs_trl

COMMITTED_ANNOTATOR = "minilm-l6:embedding"


def targets(limits: dict, annotators: list[dict], step: dict) -> list[tuple[str, str, str, bool]]:
    """(target, threshold, measured, met) for each speed target, from the three scripts' figures."""
    paths = limits["paths"]
    after = next(v for v in paths.values() if v["bf16"] and v["fast"] and v["draw"] is None)
    speedup = after["tokens_per_s"] / after["before"]["tokens_per_s"]
    to_limit = after["decode_step_s"] / after["bandwidth_limit_s"]
    ours = step["ours_lora_bf16"] if "ours_lora_bf16" in step else step["ours_full_fp32"]
    peak = step.get("matmul_peak_flops_bf16") if "ours_lora_bf16" in step else step["matmul_peak_flops"]
    flop_share = ours["flops_per_step"] / peak / ours["step_seconds"]
    committed = next((a for a in annotators if a["spec"] == COMMITTED_ANNOTATOR), None)
    rows = [
        ("sampling tokens/s vs transformers decoding (bf16, committed settings)", ">= 3x", f"{speedup:.2f}x",
         speedup >= 3),
        ("decode step / its memory-bandwidth limit", "<= 2x", f"{to_limit:.1f}x", to_limit <= 2),
        ("whole step: FLOP limit / step time", ">= 70%", f"{flop_share:.0%}", flop_share >= 0.7),
        ("samples/s vs TRL, matched (full, fp32)", ">= 3x", f"{step['ratios']['matched']:.2f}x",
         step["ratios"]["matched"] >= 3),
        (f"samples/s vs TRL, best vs best ({step['ratios']['best_ours']} vs {step['ratios']['best_trl']})",
         ">= 4x", f"{step['ratios']['best_vs_best']:.2f}x", step["ratios"]["best_vs_best"] >= 4),
    ]
    if committed is not None:
        judged = committed["seconds_per_training_step"]
        rows.append((f"{COMMITTED_ANNOTATOR} judging per step vs the agent's step", "< 1x",
                     f"{judged:.1f} s / {ours['step_seconds']:.1f} s", judged < ours["step_seconds"]))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration (first: warm-up)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    print("== sampling against the limits (bench_limits.py)", flush=True)
    limits = bench_limits.main([])
    print("\n== annotators against the FLOP limit (bench_annotator_flops.py)", flush=True)
    annotators = bench_annotator_flops.main([])
    print("\n== the whole step, against TRL (bench_vs_trl.py --bf16 --skip-trl-checkpointing)", flush=True)
    step = bench_vs_trl.main(["--steps", str(args.steps), "--skip-trl-checkpointing", "--bf16"])
    rows = targets(limits, annotators, step)
    print("\n== issue 12's speed targets, this run")
    width = max(len(r[0]) for r in rows)
    for name, threshold, measured, met in rows:
        print(f"{name:{width}s}  target {threshold:6s}  measured {measured:16s}  {'met' if met else 'NOT met'}")
    out = {"limits": _plain(limits), "annotators": _plain(annotators), "step": step,
           "targets": [dict(zip(("target", "threshold", "measured", "met"), r)) for r in rows]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


def _plain(value):
    """The figures without the sampled texts and other non-numbers json cannot hold."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "texts"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


if __name__ == "__main__":
    main()
