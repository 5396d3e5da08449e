#!/bin/bash
# The final runs of the short recipe on CIFAR-10 (docs/results.md, "A recipe for 30 minutes"): the default command
# with --recipe short, seeds 1 to 3 (or those given), on the whole training set, evaluated on the test set.
# With --nesterov first, the same with Nesterov momentum, into final-nesterov-sN (run 2026-12-07).
#   bash docs/runs/short-recipe/final.sh [--nesterov] [SEED...]
{  # read whole before it runs
set -u
cd "$(dirname "$0")/../../.."
DATA=${FLATNET_DATA:-../shared/data}
extra=() name=final
if [ "${1:-}" = --nesterov ]; then extra=(--nesterov) name=final-nesterov; shift; fi
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(1 2 3)
for seed in "${seeds[@]}"; do
  out=docs/runs/short-recipe/$name-s$seed
  mkdir -p "$out"
  python train.py --model flattened --dataset cifar10 --data-dir "$DATA" --recipe short "${extra[@]}" --seed "$seed" \
    --quiet --out "$out" --overwrite > "$out/train.log" 2>&1
done
exit
}
