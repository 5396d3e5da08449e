#!/bin/bash
# The final runs of the short recipe on CIFAR-10 (docs/results.md, "A recipe for 30 minutes"): the default command
# with --recipe short, seeds 1 to 3 (or those given), on the whole training set, evaluated on the test set, into
# final45-sN (45 epochs, the rate decayed along a line).
# --forty first: the first short recipe (40 epochs, the rate divided by 10 after epochs 27 and 35), into final-sN;
# --nesterov first: the same with Nesterov momentum, into final-nesterov-sN.
#   bash docs/runs/short-recipe/final.sh [--forty | --nesterov] [SEED...]
{  # read whole before it runs
set -u
cd "$(dirname "$0")/../../.."
DATA=${FLATNET_DATA:-../shared/data}
forty=(--epochs 40 --schedule step --lr-drop-epochs 27,35)
extra=() name=final45
case "${1:-}" in
  --forty) extra=("${forty[@]}") name=final; shift ;;
  --nesterov) extra=("${forty[@]}" --nesterov) name=final-nesterov; shift ;;
esac
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(1 2 3)
for seed in "${seeds[@]}"; do
  out=docs/runs/short-recipe/$name-s$seed
  mkdir -p "$out"
  python train.py --model flattened --dataset cifar10 --data-dir "$DATA" --recipe short "${extra[@]}" --seed "$seed" \
    --quiet --out "$out" --overwrite > "$out/train.log" 2>&1
done
exit
}
