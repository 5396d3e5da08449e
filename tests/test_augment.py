"""engine.augment against plain-loop references, and its draws."""
import numpy as np
import pytest

from engine import augment


def reference_apply(x, flips, shifts):
    """Pixel by pixel: out[i, c, r, q] = x[i, c, r - dy, q' - dx], q' mirrored when flipped; 0 outside."""
    n, ch, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        dy, dx = shifts[i]
        for c in range(ch):
            for r in range(h):
                for q in range(w):
                    sr, sq = r - dy, q - dx
                    if 0 <= sr < h and 0 <= sq < w:
                        out[i, c, r, q] = x[i, c, sr, w - 1 - sq if flips[i] else sq]
    return out


def test_apply_matches_a_pixel_loop_and_a_crop_of_the_padded_image():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 7, 9)).astype(np.float32)
    flips = rng.integers(0, 2, 12).astype(bool)
    shifts = rng.integers(-3, 4, (12, 2))
    shifts[0], shifts[1], shifts[2] = (0, 0), (7, 0), (-2, -9)  # no move; moved wholly out (rows, columns)
    out = augment.apply(x, flips, shifts)
    np.testing.assert_array_equal(out, reference_apply(x, flips, shifts))
    assert not out[1].any() and not out[2].any()
    np.testing.assert_array_equal(out[0], x[0, :, :, ::-1] if flips[0] else x[0])
    # the crop view: a window of the image padded by P, at offset (P - dy, P - dx)
    p = 3
    padded = np.pad(np.where(flips[:, None, None, None], x[..., ::-1], x), ((0, 0), (0, 0), (p, p), (p, p)))
    for i in range(3, 12):
        dy, dx = shifts[i]
        np.testing.assert_array_equal(out[i], padded[i, :, p - dy:p - dy + 7, p - dx:p - dx + 9])
    assert out.dtype == x.dtype and not np.shares_memory(out, x)


@pytest.mark.parametrize("spec,expected", [
    ("none", "none"), ("flip", "flip"), ("crop4", "crop4"), ("crop4,flip", "flip,crop4"),
    (" flip , crop16 ", "flip,crop16"),
])
def test_specs_read_and_write_one_form(spec, expected):
    assert augment.canonical(spec) == expected
    assert augment.canonical(expected) == expected


@pytest.mark.parametrize("spec", ["", "flop", "crop0", "crop17", "crop", "crop-1", "flip,flip", "crop2,crop3",
                                  "none,flip", "crop 4"])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ValueError, match="augmentation"):
        augment.parse_spec(spec)


def test_draws_depend_only_on_seed_and_epoch_and_cover_their_range():
    assert augment.epoch_draws("none", 100, 0, 0) is None
    flips, shifts = augment.epoch_draws("flip,crop2", 20000, seed=5, epoch=3)
    again = augment.epoch_draws("flip,crop2", 20000, seed=5, epoch=3)
    np.testing.assert_array_equal(flips, again[0])
    np.testing.assert_array_equal(shifts, again[1])
    assert not np.array_equal(shifts, augment.epoch_draws("flip,crop2", 20000, seed=5, epoch=4)[1])
    assert not np.array_equal(shifts, augment.epoch_draws("flip,crop2", 20000, seed=6, epoch=3)[1])
    assert abs(flips.mean() - 0.5) < 0.02
    for axis in range(2):
        counts = np.bincount(shifts[:, axis] + 2, minlength=5)
        assert len(counts) == 5 and counts.min() > 0.18 * 20000  # -2..2, uniform
    flips, shifts = augment.epoch_draws("flip", 1000, 0, 0)
    assert flips.any() and not shifts.any()
    flips, shifts = augment.epoch_draws("crop1", 1000, 0, 0)
    assert not flips.any() and set(np.unique(shifts)) == {-1, 0, 1}
