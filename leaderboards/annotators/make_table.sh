#!/usr/bin/env bash
# The commands that made annotators.md / .csv / .json / .png (finished results in results/ are reused,
# so a killed run continues where it stopped). Run from the repository root.
set -euo pipefail
out=leaderboards/annotators
for t in harmless helpful summarize; do
  align-env annotators --out $out --max-pairs 40 --tracks $t --annotators \
    rules minilm-l6:embedding "smollm2-135m:likelihood?mode=pmi" smollm2-135m:llm_judge gemma3-270m:llm_judge
done
align-env annotators --out $out --max-pairs 40 --tracks harmless --annotators "gemma3-270m:likelihood?mode=pmi"
align-env annotators --out $out --max-pairs 40 --tracks summarize --annotators "smollm2-135m:likelihood?mode=reconstruction"
align-env annotators --out $out --max-pairs 40 --tracks helpful --annotators \
  "gemma3-270m:likelihood?mode=pmi" "smollm2-135m:llm_judge?mode=pointwise&pointwise=expected"
