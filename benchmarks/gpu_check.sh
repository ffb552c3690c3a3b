#!/usr/bin/env bash
# One prepared GPU check (issue 7): full-size SD1.x UNet, random weights, ESD-x.
#   1) baseline vs default vs bf16, same seeds, s/iter and CUDA peak memory;
#   2) the target run: 200 iterations, bf16 frozen weights, wall time and peak;
#   3) per recipe (paper, esd-2025): baseline, default, bf16, one-at-a-time, compiled.
# On the lent device machine diffusers is carried as a wheel in .whl/ (see README, Benchmarks).
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 benchmarks/erase_cost.py --size sd1-full --device cuda --iterations ${ITERS:-12} --ddim-steps 50 \
    --configs baseline,default,bf16 --json "$OUT/sd1_full_ratios.json" | tee "$OUT/sd1_full_ratios.md"
python3 benchmarks/erase_cost.py --size sd1-full --device cuda --iterations 200 --ddim-steps 50 \
    --configs bf16 --no-baseline --json "$OUT/sd1_full_200.json" | tee "$OUT/sd1_full_200.md"
# 3) the paper's and the 2025 scripts' recipes: baseline, default (batched sampler), bf16, one-at-a-time, compiled
for recipe in paper esd-2025; do
  python3 benchmarks/erase_cost.py --size sd1-full --device cuda --recipe $recipe --iterations ${ITERS:-12} \
      --configs baseline,default,bf16,one-at-a-time,compiled --json "$OUT/sd1_full_$recipe.json" | tee "$OUT/sd1_full_$recipe.md"
done
