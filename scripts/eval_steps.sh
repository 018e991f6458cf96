#!/usr/bin/env bash
# Quality per step count, side by side: `diffusekit eval` (held-out single-object prompts + two-object
# prompts, the exact shapes detector) for MODEL at 4, 8 and 20 steps with SAMPLER / SCHEDULER.
#   scripts/eval_steps.sh MODEL SAMPLER SCHEDULER [N] [PROMPTS]   -> docs/eval/MODEL-SAMPLER-SCHEDULER-STEPS.json/.md
# PROMPTS: legacy (default: the first release's phrasings, what shapes and shapes-flow were trained on) or robust.
set -euo pipefail
model=$1; sampler=$2; scheduler=$3; n=${4:-100}; prompts=${5:-legacy}
tag=$(echo "$model-$sampler-$scheduler" | tr ' +' '_p' | tr 'A-Z' 'a-z')
for steps in 4 8 20; do
  OMP_NUM_THREADS=1 diffusekit eval --model "$model" -n "$n" --steps "$steps" --sampler "$sampler" \
    --scheduler "$scheduler" --cfg-scale 5 --prompts "$prompts" --out "docs/eval/$tag-$steps.json"
done
