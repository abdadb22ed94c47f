#!/usr/bin/env bash
# The GPU measurements in one run, sized for one H200 in <= 8 minutes per part list. Parts (PARTS, in order):
#   exact, cache (the default, ~8 min together): the 14B story (random weights, 832x480x81, 3 shots, CFG 5, 1,544
#     memory tokens) exact, then with step caching at the default threshold, each writing
#     bench/results/sample_story_gpu_*.json (step time, denoising seconds, peak GiB);
#   lowvram (~7 min alone: PARTS=lowvram): the same story with every low-VRAM switch on (fp8 kernels in all block
#     layers, blocks in host memory, umT5 on the host CPU, 256-px tiled VAE decode; docs/performance.md "Low VRAM"),
#     LOWVRAM_STEPS steps a shot -> sample_story_gpu_lowvram.json (its measured peak: the 24 GB question), then the
#     GPU compiler's compile-only analysis of three switch variants -> sample_memory_aot.json (gpu rows);
#   step (~7.5 min alone: PARTS=step, 7.2 min on an H200 on 2026-12-04): the exact 14B CFG step lever by lever
#     (bench/dit_step.py: kernels alone at the step's shapes -> dit_step_gpu_kernels.json; the step's variants and a
#     profile by kernel class -> dit_step_gpu.json), then the step with fp8 kernels in all block layers and the blocks
#     in host memory, with its peak device memory -> dit_step_gpu_lowvram.json.
# Run from anywhere: bash bench/gpu_suite.sh (PY=python by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STEPS=${STEPS:-6}
LOWVRAM_STEPS=${LOWVRAM_STEPS:-2}
PARTS=${PARTS:-exact cache}
for part in $PARTS; do
  case $part in
    exact) $PY bench/sample_story.py --suite gpu --steps "$STEPS" --out bench/results/sample_story_gpu_exact.json ;;
    cache) $PY bench/sample_story.py --suite gpu --steps "$STEPS" --override sampler.cache=0.1 \
             --out bench/results/sample_story_gpu_cache.json ;;
    lowvram)
      $PY bench/sample_story.py --suite gpu --steps "$LOWVRAM_STEPS" --override dit_runtime.weights_dtype=fp8 \
        --override dit_runtime.fp8_layers=all --override dit_runtime.offload=blocks --override text_encoder.device=cpu \
        --override vae.tile=256 --out bench/results/sample_story_gpu_lowvram.json
      $PY bench/sample_memory_aot.py --layers 40 --variant "fp8 ffn, umT5 on CPU" --variant "fp8 all, umT5 on CPU" \
        --variant "fp8 all + offload, umT5 on CPU" ;;
    step)  # kernels first, in their own process: a kernel that fails hard costs only their rows
      kernels=bench/results/dit_step_gpu_kernels.json
      rm -f "$kernels"  # no earlier rows stand in for a failed run
      $PY bench/dit_step.py --skip steps --skip profile --out "$kernels" || echo "kernel rows failed" >&2
      $PY bench/dit_step.py --skip torch --skip kernels --iters "${STEP_ITERS:-2}"
      timeout "${LOWVRAM_STEP_TIMEOUT:-200}" $PY bench/dit_step.py --lowvram --iters 2 ;;
    *) echo "unknown part '$part' (exact, cache, lowvram, step)" >&2; exit 2 ;;
  esac
done
