#!/bin/bash
# The trials behind the `short` recipe (docs/results.md, "A recipe for 30 minutes"), one after another, each in its
# own folder here with its train.log. Settings are chosen on 5,000 training images held out (--validation 5000);
# the test set is read only by the final runs (final.sh). A change is kept only if it ends higher with two seeds;
# the bundle (cosine-ls-ema) ended lower with seed 1, so its seed-2 run was stopped unfinished and is not kept.
# Single elements against the compressed schedule with the same seed (step-sN), named on the command line, run
# 2026-12-07: altflip-s1; nesterov-s1 to -s3 with step-s2 and step-s3 (higher with seeds 1 and 3, equal with 2).
# lookahead-s1 and lookahead-s2 have no run folder. The decay to 0 along a line or a half cosine, alone (linear-sN,
# cosine-sN), run 2026-12-07.
#   bash docs/runs/short-recipe/trials.sh [NAME...]     # all trials, or the named ones
{  # read whole before it runs
set -u
cd "$(dirname "$0")/../../.."
DATA=${FLATNET_DATA:-../shared/data}
common=(--model flattened --dataset cifar10 --data-dir "$DATA" --validation 5000 --epochs 20 --quiet --no-plot)
declare -A trial=(
  [step-s1]="--lr-drop-epochs 13,17 --seed 1"
  [step-s2]="--lr-drop-epochs 13,17 --seed 2"
  [cosine-ls-ema-s1]="--schedule cosine --warmup-epochs 1 --label-smoothing 0.1 --ema 0.999 --seed 1"
  [cosine-ls-ema-s2]="--schedule cosine --warmup-epochs 1 --label-smoothing 0.1 --ema 0.999 --seed 2"
  [altflip-s1]="--lr-drop-epochs 13,17 --augment altflip,crop4 --seed 1"
  [nesterov-s1]="--lr-drop-epochs 13,17 --nesterov --seed 1"
  [nesterov-s2]="--lr-drop-epochs 13,17 --nesterov --seed 2"
  [step-s3]="--lr-drop-epochs 13,17 --seed 3"
  [nesterov-s3]="--lr-drop-epochs 13,17 --nesterov --seed 3"
  [lookahead-s1]="--lr-drop-epochs 13,17 --lookahead 5 --seed 1"
  [lookahead-s2]="--lr-drop-epochs 13,17 --lookahead 5 --seed 2"
  [linear-s1]="--schedule linear --seed 1"
  [linear-s2]="--schedule linear --seed 2"
  [cosine-s1]="--schedule cosine --seed 1"
  [cosine-s2]="--schedule cosine --seed 2"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(step-s1 cosine-ls-ema-s1 step-s2 cosine-ls-ema-s2)
for name in "${names[@]}"; do
  out=docs/runs/short-recipe/$name
  mkdir -p "$out"
  # shellcheck disable=SC2086
  python train.py "${common[@]}" ${trial[$name]} --out "$out" --overwrite > "$out/train.log" 2>&1
done
exit
}
