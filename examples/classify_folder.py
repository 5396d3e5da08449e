#!/usr/bin/env python
"""Classify every image in a folder with a flatnet model (a model file, or a pretrained model's name) and write a CSV.

    python examples/classify_folder.py pretrained/flattened-cifar10.npz examples/samples/cifar10 runs/samples.csv
    python examples/classify_folder.py flattened-cifar10 examples/samples/cifar10 runs/samples.csv

Needs only numpy, the compiled engine and Pillow (to read PNG/JPEG). An image that cannot be
read is skipped with a warning; anything else that stops the run is one line on stderr.
"""
import csv
import sys
from pathlib import Path

import numpy as np

import engine
from engine.images import ImageError, read_image
from engine.npzfile import check_writable_file

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def main(model_path, folder, out_csv):
    try:  # checked first: a folder's worth of work is not lost to a path that cannot be written
        check_writable_file(out_csv)
    except OSError as e:
        sys.exit(f"error: cannot write {out_csv}: {e}")
    try:  # a name of engine.PRETRAINED, unless a file of that name exists
        named = model_path in engine.PRETRAINED and not Path(model_path).exists()
        model = engine.pretrained(model_path) if named else engine.load(model_path)
    except (OSError, engine.ModelFileError) as e:
        sys.exit(f"error: {e}")
    if not Path(folder).is_dir():
        sys.exit(f"error: {folder} is not a folder")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EXTENSIONS)
    images, names = [], []
    for path in files:
        try:
            images.append(read_image(path, model.input_shape))
            names.append(path.name)
        except ImageError as e:
            print(f"warning: skipped {path.name}: {e}", file=sys.stderr)
    if not images:
        sys.exit(f"error: no readable images ({', '.join(sorted(EXTENSIONS))}) in {folder}")
    probs = model.predict(np.stack(images))
    try:
        with open(out_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability"])
            for name, pr in zip(names, probs):
                writer.writerow([name, model.classes[int(pr.argmax())], f"{pr.max():.4f}"])
    except OSError as e:
        sys.exit(f"error: cannot write {out_csv}: {e.strerror or e}")
    print(f"classified {len(names)} images -> {out_csv}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
