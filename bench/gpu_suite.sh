#!/usr/bin/env bash
# The GPU measurements of the fast-and-light issue in one run, sized for one H200 in <= 8 minutes:
# the 14B story (random weights, 832x480x81, 3 shots, CFG 5, 1,544 memory tokens) exact, then with step
# caching at the default threshold, each writing bench/results/sample_story_gpu_*.json (step time,
# denoising seconds, peak GiB). Run from anywhere: bash bench/gpu_suite.sh (PY=python by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STEPS=${STEPS:-6}
$PY bench/sample_story.py --suite gpu --steps "$STEPS" --out bench/results/sample_story_gpu_exact.json
$PY bench/sample_story.py --suite gpu --steps "$STEPS" --override sampler.cache=0.1 --out bench/results/sample_story_gpu_cache.json
