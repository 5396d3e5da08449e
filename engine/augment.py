"""Training-time data augmentation: random horizontal flips and random translations (crops of a padded image).

A spec is a text such as "none", "flip", "crop4" or "flip,crop4":

- flip: each image is mirrored left-right with probability 1/2;
- cropP: each image is moved by (dy, dx), each drawn uniformly from -P..P, the pixels that enter
  being 0: the same as cutting a random HxW window out of the image padded with P zeros on every
  side. On the preprocessed images (contrast-normalized, ZCA-whitened: zero is the mean image)
  a zero pixel is an average one.

The draws of an epoch depend only on the run's seed and the epoch (`epoch_draws`), one draw per
training image, so a resumed run and every rank of a distributed run see the same images as a
single uninterrupted process. The test images are never augmented.
"""
import numpy as np

MAX_PAD = 16


def parse_spec(spec):
    """(flip, pad) of a spec text; ValueError with a one-line reason when it is not one."""
    flip, pad = False, 0
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["none"]:
        return flip, pad
    if not parts:
        raise ValueError("empty augmentation spec (use 'none', 'flip', 'cropP' or 'flip,cropP')")
    for part in parts:
        if part == "flip" and not flip:
            flip = True
        elif part.startswith("crop") and not pad and part[4:].isdigit() and 1 <= int(part[4:]) <= MAX_PAD:
            pad = int(part[4:])
        else:
            raise ValueError(f"bad augmentation {part!r} in {spec!r}: expected 'none', or 'flip' and/or 'cropP' "
                             f"(P = 1..{MAX_PAD} pixels), each once, comma-separated")
    return flip, pad


def canonical(spec):
    """The spec in its one written form ('none', 'flip', 'crop4' or 'flip,crop4')."""
    flip, pad = parse_spec(spec)
    parts = (["flip"] if flip else []) + ([f"crop{pad}"] if pad else [])
    return ",".join(parts) or "none"


def epoch_draws(spec, n, seed, epoch):
    """The draws of one epoch for n training images: (flips, shifts), bool (n,) and int (n, 2), or None for 'none'."""
    flip, pad = parse_spec(spec)
    if not (flip or pad):
        return None
    rng = np.random.default_rng([int(seed), int(epoch), 0xA06])  # its own stream: weights, dropout and order untouched
    flips = rng.integers(0, 2, n).astype(bool) if flip else np.zeros(n, bool)
    shifts = rng.integers(-pad, pad + 1, (n, 2)) if pad else np.zeros((n, 2), np.int64)
    return flips, shifts


def mirror(x):
    """x (N, C, H, W) mirrored left-right, contiguous: the flip of `apply`, and what test-time flip averaging
    (`model.predict(..., flip=True)`, `engine.evaluate --flip`) adds to each preprocessed test image."""
    return np.ascontiguousarray(x[..., ::-1])


def apply(x, flips, shifts):
    """A new array: image i of x (N, C, H, W) mirrored left-right if flips[i], then moved by shifts[i] = (dy, dx).

    out[i, :, r, c] = img[i, :, r - dy, c - dx] where that pixel exists, 0 elsewhere."""
    n, _, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        img = x[i, :, :, ::-1] if flips[i] else x[i]
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        if abs(dy) >= h or abs(dx) >= w:
            continue
        out[i, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            img[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out
