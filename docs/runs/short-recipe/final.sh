#!/bin/bash
# The final runs of a 40-epoch recipe on CIFAR-10 (docs/results.md, "A recipe for 30 minutes"): seeds 1 to 3 on the
# whole training set, evaluated on the test set. ARM is the trial arm that won on the held-out images (trials.sh):
# cosine-ls-ema (--recipe short) or step (the long recipe's stepped schedule compressed to 40 epochs).
#   bash docs/runs/short-recipe/final.sh ARM [SEED...]
set -u
cd "$(dirname "$0")/../../.."
DATA=${FLATNET_DATA:-../shared/data}
arm=$1; shift
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(1 2 3)
case $arm in
  cosine-ls-ema) flags=(--recipe short) ;;
  step) flags=(--recipe reproduce --epochs 40 --lr-drop-epochs 27,35) ;;
  *) echo "unknown arm $arm" >&2; exit 2 ;;
esac
for seed in "${seeds[@]}"; do
  out=docs/runs/short-recipe/final-$arm-s$seed
  mkdir -p "$out"
  python train.py --model flattened --dataset cifar10 --data-dir "$DATA" "${flags[@]}" --seed "$seed" --quiet \
    --out "$out" --overwrite > "$out/train.log" 2>&1
done
