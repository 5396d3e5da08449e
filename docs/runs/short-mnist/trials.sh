#!/bin/bash
# Trials of shorter MNIST schedules (docs/results.md, "A recipe for 30 minutes"), one after another, each in its own
# folder here with its train.log: the MNIST recipe's schedule (30 epochs, the rate divided by 10 after epochs 20 and
# 26) as it is and compressed to 10 and to 15 epochs, on 5,000 training images held out (--validation 5000; the test
# set is not read).
#   bash docs/runs/short-mnist/trials.sh [NAME...]     # all trials, or the named ones
set -u
cd "$(dirname "$0")/../../.."
DATA=${FLATNET_DATA:-../shared/data}
common=(--model flattened --dataset mnist --data-dir "$DATA" --validation 5000 --quiet --no-plot)
declare -A trial=(
  [e10-s1]="--epochs 10 --lr-drop-epochs 7,9 --seed 1"
  [e15-s1]="--epochs 15 --lr-drop-epochs 10,13 --seed 1"
  [e30-s1]="--epochs 30 --lr-drop-epochs 20,26 --seed 1"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(e10-s1 e15-s1 e30-s1)
for name in "${names[@]}"; do
  out=docs/runs/short-mnist/$name
  mkdir -p "$out"
  # shellcheck disable=SC2086
  python train.py "${common[@]}" ${trial[$name]} --out "$out" --overwrite > "$out/train.log" 2>&1
done
