#!/bin/bash
# The baseline network trained with its 5x5 convolutions by Winograd's F(4x4, 5x5) (--conv auto) and by direct
# convolution (--conv direct), same seed, same data, one after the other; curves in compare.png
# (docs/benchmarks.md, "Fast convolutions for the baseline").
set -eu
cd "$(dirname "$0")/../../.."
DATA=${FLATNET_DATA:-../shared/data}
for conv in auto direct; do
  python train.py --model baseline --dataset cifar10 --data-dir "$DATA" --limit-train 10000 --epochs 8 \
    --lr-drop-epochs 6 --seed 1 --conv "$conv" --quiet --no-plot --out "docs/runs/winograd-vs-direct/$conv" \
    --overwrite > "docs/runs/winograd-vs-direct/$conv.log" 2>&1
done
