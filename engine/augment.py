"""Training-time data augmentation: random horizontal flips, random translations (crops of a padded image)
and cutout (a random square set to zero).

A spec is a text such as "none", "flip", "crop4", "flip,crop4", "altflip,crop4" or "flip,crop4,cutout8":

- flip: each image is mirrored left-right with probability 1/2;
- altflip: each image is mirrored in every other epoch, the first one it is mirrored in (the first or
  the second) drawn with probability 1/2 per image from the seed ("derandomized" or alternating flips,
  as in Keller Jordan's fast CIFAR-10 training, 2024): every pair of consecutive epochs shows each
  image once as it is and once mirrored, where random flips show about a quarter of the images twice
  the same way. It takes the place of flip's draws, so the moves and cutouts below stay the same;
- cropP: each image is moved by (dy, dx), each drawn uniformly from -P..P, the pixels that enter
  being 0: the same as cutting a random HxW window out of the image padded with P zeros on every
  side. On the preprocessed images (contrast-normalized, ZCA-whitened: zero is the mean image)
  a zero pixel is an average one.
- cutoutK: after the flip and the move, a KxK square of each image is set to 0 (DeVries & Taylor,
  2017, "Improved regularization of convolutional neural networks with cutout"). Its centre is
  drawn uniformly over the image's pixels, so near an edge only part of the square lies inside.

The draws of an epoch depend only on the run's seed and the epoch (`epoch_draws`), one draw per
training image, so a resumed run and every rank of a distributed run see the same images as a
single uninterrupted process. The test images are never augmented.
"""
from typing import NamedTuple, Optional

import numpy as np

MAX_PAD = 16
MAX_CUTOUT = 32
SPEC_FORMS = (f"'none', or 'flip' or 'altflip', 'cropP' (P = 1..{MAX_PAD}) and 'cutoutK' (K = 1..{MAX_CUTOUT}), "
              f"each at most once")
NO_FLIP, FLIP, ALTERNATE_FLIP = 0, 1, 2  # parse_spec's flip
FLIP_NAMES = {"flip": FLIP, "altflip": ALTERNATE_FLIP}


class Draws(NamedTuple):
    """One epoch's draws for n images: flips bool (n,), shifts int (n, 2) = (dy, dx), holes int (n, 2) = the
    cutout centres (row, column) or None, and side, the cutout's K (0: none). `apply(x, *draws.take(idx))`."""
    flips: np.ndarray
    shifts: np.ndarray
    holes: Optional[np.ndarray] = None
    side: int = 0

    def take(self, idx):
        """The draws of images idx."""
        return Draws(self.flips[idx], self.shifts[idx], None if self.holes is None else self.holes[idx], self.side)


def _number(part, word, largest):
    """P of 'wordP' when 1 <= P <= largest, P written in ASCII digits, else None."""
    digits = part[len(word):]
    if not (part.startswith(word) and digits.isascii() and digits.isdigit()):
        return None
    return int(digits) if 1 <= int(digits) <= largest else None


def parse_spec(spec):
    """(flip, pad, cutout) of a spec text, flip one of NO_FLIP (0), FLIP and ALTERNATE_FLIP; ValueError with a
    one-line reason when it is not one."""
    flip, pad, cutout = NO_FLIP, 0, 0
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["none"]:
        return flip, pad, cutout
    if not parts:
        raise ValueError(f"empty augmentation spec (use {SPEC_FORMS}, comma-separated)")
    for part in parts:
        if part in FLIP_NAMES and not flip:
            flip = FLIP_NAMES[part]
        elif _number(part, "crop", MAX_PAD) and not pad:
            pad = _number(part, "crop", MAX_PAD)
        elif _number(part, "cutout", MAX_CUTOUT) and not cutout:
            cutout = _number(part, "cutout", MAX_CUTOUT)
        else:
            raise ValueError(f"bad augmentation {part!r} in {spec!r}: expected {SPEC_FORMS}, comma-separated")
    return flip, pad, cutout


def canonical(spec):
    """The spec in its one written form ('none', 'flip', 'crop4', 'flip,crop4', 'flip,crop4,cutout8', ...)."""
    flip, pad, cutout = parse_spec(spec)
    parts = [name for name, kind in FLIP_NAMES.items() if kind == flip]
    parts += ([f"crop{pad}"] if pad else []) + ([f"cutout{cutout}"] if cutout else [])
    return ",".join(parts) or "none"


def epoch_draws(spec, n, seed, epoch, size=None):
    """The Draws of one epoch for n training images of size (H, W) (needed for cutout only), or None for 'none'.

    The flips and shifts are drawn first, so adding cutout to a spec leaves them as they were; altflip's flips
    come from a stream of their own (the seed alone) in place of flip's draws, so its shifts are flip's."""
    flip, pad, cutout = parse_spec(spec)
    if not (flip or pad or cutout):
        return None
    rng = np.random.default_rng([int(seed), int(epoch), 0xA06])  # its own stream: weights, dropout and order untouched
    flips = rng.integers(0, 2, n).astype(bool) if flip else np.zeros(n, bool)
    if flip == ALTERNATE_FLIP:  # image i is mirrored in the epochs e with (e + phase[i]) odd, phase drawn once
        phase = np.random.default_rng([int(seed), 0xA1F]).integers(0, 2, n)
        flips = (int(epoch) + phase) % 2 == 1
    shifts = rng.integers(-pad, pad + 1, (n, 2)) if pad else np.zeros((n, 2), np.int64)
    if not cutout:
        return Draws(flips, shifts)
    if size is None:
        raise ValueError("cutout needs the image size: epoch_draws(..., size=(H, W))")
    h, w = size
    holes = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], axis=1)
    return Draws(flips, shifts, holes, cutout)


def mirror(x):
    """x (N, C, H, W) mirrored left-right, contiguous: the flip of `apply`, and what test-time flip averaging
    (`model.predict(..., flip=True)`, `engine.evaluate --flip`) adds to each preprocessed test image."""
    return np.ascontiguousarray(x[..., ::-1])


def apply(x, flips, shifts, holes=None, side=0):
    """A new array: image i of x (N, C, H, W) mirrored left-right if flips[i], then moved by shifts[i] = (dy, dx),
    then, with holes, the side x side square centred on holes[i] = (row, column) set to 0.

    out[i, :, r, c] = img[i, :, r - dy, c - dx] where that pixel exists, 0 elsewhere; the square covers rows
    row - side // 2 .. row - side // 2 + side - 1 (columns alike), clipped to the image."""
    n, _, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        img = x[i, :, :, ::-1] if flips[i] else x[i]
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        if abs(dy) >= h or abs(dx) >= w:
            continue
        out[i, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            img[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        if holes is not None and side:
            top, left = int(holes[i, 0]) - side // 2, int(holes[i, 1]) - side // 2
            out[i, :, max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = 0
    return out
