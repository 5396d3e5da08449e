#!/usr/bin/env python
"""Draw the sample images that the README's commands classify, into examples/samples/.

    python examples/make_samples.py [--out examples/samples]

Nothing here comes from a data set: the digits are pen strokes drawn with Pillow, placed as
MNIST places its digits (white on black, in a 20x20 box centred by its centre of mass in
28x28), and the colour pictures are simple drawn scenes at CIFAR-10's 32x32. Writes

    mnist/digit-2.png, digit-7.png, digit-9.png   28x28 grey, for pretrained/*-mnist.npz
    mnist/digits.npy                              the digits 0..9 as one batch, uint8 10x28x28 (N x H x W)
    cifar10/ship.png, airplane.png, car.png       32x32 RGB, for pretrained/*-cifar10.npz

The drawing is deterministic (no random numbers), so a rerun writes the same pixels with the
same Pillow version.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

try:
    from PIL import Image, ImageDraw
except ImportError:
    sys.exit("error: drawing the samples needs Pillow: pip install pillow")

ROOT = Path(__file__).resolve().parent
BIG = 160  # digits are drawn on a BIG x BIG canvas, then shrunk: smooth, anti-aliased strokes
PEN = 17   # stroke width on that canvas


def arc(cx, cy, rx, ry, start, end, n=24):
    """Points of an elliptic arc, angles in degrees (0 = right, 90 = down), in the unit box."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(start, end, n)]


# Each digit: a list of strokes, each a polyline in a unit box (x right, y down).
DIGITS = {
    0: [arc(0.5, 0.5, 0.32, 0.45, 0, 360, 40)],
    1: [[(0.42, 0.14), (0.55, 0.04), (0.52, 0.96)]],
    2: [arc(0.5, 0.3, 0.3, 0.25, 190, 360) + arc(0.5, 0.3, 0.3, 0.25, 0, 40, 8) + [(0.15, 0.95), (0.9, 0.95)]],
    3: [arc(0.48, 0.27, 0.3, 0.23, 200, 450), arc(0.48, 0.72, 0.34, 0.24, -90, 155)],
    4: [[(0.68, 0.96), (0.68, 0.04), (0.1, 0.66), (0.92, 0.66)]],
    5: [[(0.85, 0.05), (0.3, 0.05), (0.24, 0.45)] + arc(0.5, 0.66, 0.33, 0.3, -125, 150)],
    6: [[(0.78, 0.06)] + arc(0.78, 0.62, 0.62, 0.56, -90, -180, 12) + arc(0.5, 0.7, 0.34, 0.26, 180, 540)],
    7: [[(0.1, 0.06), (0.9, 0.06), (0.42, 0.96)]],
    8: [arc(0.5, 0.27, 0.27, 0.22, 0, 360, 32), arc(0.5, 0.72, 0.33, 0.25, 0, 360, 32)],
    9: [arc(0.5, 0.3, 0.32, 0.26, 0, 360, 32), [(0.82, 0.3), (0.74, 0.96)]],
}


def draw_digit(strokes, slant=0.18):
    """One digit as MNIST draws its digits: uint8 28x28, white strokes on black."""
    im = Image.new("L", (BIG, BIG), 0)
    d = ImageDraw.Draw(im)
    margin = PEN
    for stroke in strokes:
        # a slight forward slant, as handwriting has
        pts = [(margin + (x + slant * (0.5 - y)) * (BIG - 2 * margin), margin + y * (BIG - 2 * margin))
               for x, y in stroke]
        d.line(pts, fill=255, width=PEN, joint="curve")
        for x, y in (pts[0], pts[-1]):  # round pen ends
            d.ellipse([x - PEN / 2, y - PEN / 2, x + PEN / 2, y + PEN / 2], fill=255)
    box = im.crop(im.getbbox())
    scale = 20 / max(box.size)  # MNIST: the digit fits a 20x20 box, aspect ratio kept
    box = box.resize((max(1, round(box.width * scale)), max(1, round(box.height * scale))), Image.LANCZOS)
    small = np.asarray(box, dtype=np.float64)
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / small.sum(), (xs * small).sum() / small.sum()
    out = np.zeros((28, 28), np.float64)
    top, left = int(round(14 - cy)), int(round(14 - cx))  # centre of mass at the image's centre
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return np.clip(out, 0, 255).astype(np.uint8)


def scene(draw_fn, size=128):
    """A colour picture drawn at size x size and shrunk to CIFAR-10's 32x32."""
    im = Image.new("RGB", (size, size))
    draw_fn(ImageDraw.Draw(im), size)
    return im.resize((32, 32), Image.LANCZOS)


def sky(d, s, horizon, top=(110, 160, 220), bottom=(190, 215, 240)):
    for y in range(horizon):
        t = y / max(1, horizon - 1)
        d.line([(0, y), (s, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))


def draw_ship(d, s):
    sky(d, s, 70)
    d.rectangle([0, 70, s, s], fill=(30, 70, 120))                                  # sea
    d.polygon([(14, 70), (114, 70), (100, 92), (26, 92)], fill=(60, 60, 70))      # hull
    d.rectangle([40, 50, 84, 70], fill=(235, 235, 235))                            # cabin
    d.rectangle([56, 34, 66, 50], fill=(200, 60, 40))                              # funnel


def draw_airplane(d, s):
    sky(d, s, s, top=(70, 130, 210), bottom=(170, 205, 240))
    d.ellipse([14, 56, 114, 72], fill=(225, 225, 230))                             # fuselage
    d.polygon([(54, 62), (78, 62), (60, 30), (52, 30)], fill=(200, 200, 210))      # wings
    d.polygon([(54, 66), (78, 66), (60, 98), (52, 98)], fill=(200, 200, 210))
    d.polygon([(18, 62), (28, 62), (16, 44), (10, 44)], fill=(200, 200, 210))      # tail


def draw_car(d, s):
    sky(d, s, 60)
    d.rectangle([0, 60, s, s], fill=(95, 95, 100))                                 # road
    d.rectangle([0, 60, s, 68], fill=(70, 130, 60))                                # verge
    d.polygon([(16, 70), (112, 70), (112, 94), (16, 94)], fill=(200, 30, 30))      # body
    d.polygon([(36, 70), (46, 52), (86, 52), (98, 70)], fill=(180, 25, 25))        # roof
    d.polygon([(42, 69), (50, 56), (64, 56), (64, 69)], fill=(170, 200, 230))      # windows
    d.polygon([(68, 69), (68, 56), (82, 56), (92, 69)], fill=(170, 200, 230))
    for x in (36, 92):                                                             # wheels
        d.ellipse([x - 11, 84, x + 11, 106], fill=(20, 20, 20))
        d.ellipse([x - 5, 90, x + 5, 100], fill=(150, 150, 150))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "samples", help="folder to write into (default: %(default)s)")
    out = p.parse_args(argv).out
    (out / "mnist").mkdir(parents=True, exist_ok=True)
    (out / "cifar10").mkdir(parents=True, exist_ok=True)
    digits = np.stack([draw_digit(DIGITS[i]) for i in range(10)])
    np.save(out / "mnist" / "digits.npy", digits)
    written = [out / "mnist" / "digits.npy"]
    for i in (2, 7, 9):
        written.append(out / "mnist" / f"digit-{i}.png")
        Image.fromarray(digits[i], "L").save(written[-1], optimize=True)
    for name, fn in (("ship", draw_ship), ("airplane", draw_airplane), ("car", draw_car)):
        written.append(out / "cifar10" / f"{name}.png")
        scene(fn).save(written[-1], optimize=True)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
