#!/usr/bin/env python
"""Classify every image in a folder with a flatnet model file and write a CSV.

    python examples/classify_folder.py pretrained/flattened-cifar10.npz examples/samples/cifar10 runs/samples.csv

Needs only numpy, the compiled engine and Pillow (to read PNG/JPEG).
"""
import csv
import sys
from pathlib import Path

import engine
from engine.images import read_image

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def main(model_path, folder, out_csv):
    model = engine.load(model_path)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        sys.exit(f"no images ({', '.join(sorted(EXTENSIONS))}) in {folder}")
    import numpy as np
    images = np.stack([read_image(p, model.input_shape) for p in files])
    probs = model.predict(images)
    with open(out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class", "probability"])
        for path, pr in zip(files, probs):
            writer.writerow([path.name, model.classes[int(pr.argmax())], f"{pr.max():.4f}"])
    print(f"classified {len(files)} images -> {out_csv}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
