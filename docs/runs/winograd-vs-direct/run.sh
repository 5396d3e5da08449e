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
# both runs' accuracy per epoch in one figure
python - <<'PY'
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 4))
for conv, color in (("auto", "C0"), ("direct", "C1")):
    log = [json.loads(line) for line in open(f"docs/runs/winograd-vs-direct/{conv}/log.jsonl")]
    name = "Winograd F(4x4, 5x5)" if conv == "auto" else "direct"
    ax.plot([h["epoch"] for h in log], [100 * h["train_acc"] for h in log], "--", color=color, label=f"{name}, train")
    ax.plot([h["epoch"] for h in log], [100 * h["test_acc"] for h in log], "-o", color=color, label=f"{name}, test")
ax.set_xlabel("epoch")
ax.set_ylabel("accuracy (%)")
ax.set_title("baseline, CIFAR-10 (10,000 training images), seed 1")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("docs/runs/winograd-vs-direct/compare.png", dpi=100)
PY
