"""engine.augment against plain-loop references, and its draws."""
import numpy as np
import pytest

from engine import augment


def reference_apply(x, flips, shifts, holes=None, side=0):
    """Pixel by pixel: out[i, c, r, q] = x[i, c, r - dy, q' - dx], q' mirrored when flipped; 0 outside, and 0
    where |r - row| and |q - column| are within the square (side // 2 before the centre, the rest after)."""
    n, ch, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        dy, dx = shifts[i]
        for c in range(ch):
            for r in range(h):
                for q in range(w):
                    sr, sq = r - dy, q - dx
                    in_hole = holes is not None and all(-(side // 2) <= p - centre < side - side // 2
                                                        for p, centre in zip((r, q), holes[i]))
                    if 0 <= sr < h and 0 <= sq < w and not in_hole:
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
    (" flip , crop16 ", "flip,crop16"), ("cutout8,flip,crop4", "flip,crop4,cutout8"), ("cutout32", "cutout32"),
    ("crop4,altflip", "altflip,crop4"), ("altflip", "altflip"),
])
def test_specs_read_and_write_one_form(spec, expected):
    assert augment.canonical(spec) == expected
    assert augment.canonical(expected) == expected


@pytest.mark.parametrize("spec", ["", "flop", "crop0", "crop17", "crop", "crop-1", "flip,flip", "crop2,crop3",
                                  "none,flip", "crop 4", "cutout0", "cutout33", "cutout", "cutout4,cutout4",
                                  "flip,cutout-2", "cutoutx", "cutout 8", "cutout4,cutout8", "cutout\u00b2",
                                  "crop\u0668", "cutout\u0668", "flip,altflip", "altflip,altflip", "alt"])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ValueError, match=r"^(bad augmentation '.+' in|empty augmentation spec)"):
        augment.parse_spec(spec)


def test_draws_depend_only_on_seed_and_epoch_and_cover_their_range():
    assert augment.epoch_draws("none", 100, 0, 0) is None
    flips, shifts, holes, side = augment.epoch_draws("flip,crop2", 20000, seed=5, epoch=3)
    assert holes is None and side == 0
    again = augment.epoch_draws("flip,crop2", 20000, seed=5, epoch=3)
    np.testing.assert_array_equal(flips, again.flips)
    np.testing.assert_array_equal(shifts, again.shifts)
    assert not np.array_equal(shifts, augment.epoch_draws("flip,crop2", 20000, seed=5, epoch=4).shifts)
    assert not np.array_equal(shifts, augment.epoch_draws("flip,crop2", 20000, seed=6, epoch=3).shifts)
    assert abs(flips.mean() - 0.5) < 0.02
    for axis in range(2):
        counts = np.bincount(shifts[:, axis] + 2, minlength=5)
        assert len(counts) == 5 and counts.min() > 0.18 * 20000  # -2..2, uniform
    flips, shifts, _, _ = augment.epoch_draws("flip", 1000, 0, 0)
    assert flips.any() and not shifts.any()
    flips, shifts, _, _ = augment.epoch_draws("crop1", 1000, 0, 0)
    assert not flips.any() and set(np.unique(shifts)) == {-1, 0, 1}


@pytest.mark.parametrize("side", [1, 4, 5])
def test_cutout_matches_a_pixel_loop_at_the_edges_and_inside(side):
    rng = np.random.default_rng(side)
    x = rng.standard_normal((10, 2, 8, 9)).astype(np.float32) + 5  # no pixel is 0 before the cut
    flips = rng.integers(0, 2, 10).astype(bool)
    shifts = rng.integers(-2, 3, (10, 2))
    holes = np.array([[0, 0], [7, 8], [4, 4], [0, 8], [7, 0], [3, 1], [1, 6], [6, 2], [2, 2], [5, 7]])
    out = augment.apply(x, flips, shifts, holes, side)
    np.testing.assert_array_equal(out, reference_apply(x, flips, shifts, holes, side))
    # the square alone: without a shift, exactly its in-image pixels are zero
    cut = augment.apply(x, np.zeros(10, bool), np.zeros((10, 2), int), holes, side)
    for i, (row, col) in enumerate(holes):
        rows = [r for r in range(row - side // 2, row - side // 2 + side) if 0 <= r < 8]
        cols = [q for q in range(col - side // 2, col - side // 2 + side) if 0 <= q < 9]
        assert (cut[i] == 0).sum() == 2 * len(rows) * len(cols)
        assert not cut[i][:, rows][:, :, cols].any()
    assert (cut[2] == 0).sum() == 2 * side * side  # a centre well inside: the whole square


def test_cutout_draws_leave_flips_and_shifts_as_they_were_and_cover_the_image():
    plain = augment.epoch_draws("flip,crop2", 5000, seed=3, epoch=1)
    cut = augment.epoch_draws("flip,crop2,cutout8", 5000, seed=3, epoch=1, size=(6, 7))
    np.testing.assert_array_equal(plain.flips, cut.flips)
    np.testing.assert_array_equal(plain.shifts, cut.shifts)
    assert plain.holes is None and cut.side == 8
    assert set(np.unique(cut.holes[:, 0])) == set(range(6)) and set(np.unique(cut.holes[:, 1])) == set(range(7))
    again = augment.epoch_draws("flip,crop2,cutout8", 5000, seed=3, epoch=1, size=(6, 7))
    np.testing.assert_array_equal(cut.holes, again.holes)
    assert not np.array_equal(cut.holes, augment.epoch_draws("flip,crop2,cutout8", 5000, 3, 2, size=(6, 7)).holes)
    part = cut.take([4, 0, 9])
    np.testing.assert_array_equal(part.holes, cut.holes[[4, 0, 9]])
    np.testing.assert_array_equal(part.flips, cut.flips[[4, 0, 9]])
    with pytest.raises(ValueError, match="image size"):
        augment.epoch_draws("cutout8", 10, 0, 0)


def test_alternating_flips_mirror_each_image_in_every_other_epoch_and_keep_the_shifts():
    n = 20000
    draws = [augment.epoch_draws("altflip,crop2", n, seed=5, epoch=e) for e in range(4)]
    assert abs(draws[0].flips.mean() - 0.5) < 0.02  # the phase: half the images mirrored first in epoch 0
    for e in range(3):  # each pair of consecutive epochs: every image once as it is, once mirrored
        np.testing.assert_array_equal(draws[e + 1].flips, ~draws[e].flips)
    np.testing.assert_array_equal(draws[2].flips, draws[0].flips)
    for e in range(4):  # the moves are those of random flips with the same seed and epoch
        np.testing.assert_array_equal(draws[e].shifts, augment.epoch_draws("flip,crop2", n, seed=5, epoch=e).shifts)
    other = augment.epoch_draws("altflip", n, seed=6, epoch=0)
    assert not np.array_equal(other.flips, draws[0].flips) and not other.shifts.any()
    # random flips leave about a quarter of the images unmirrored in both of two epochs; alternating ones none
    random = [augment.epoch_draws("flip", n, seed=5, epoch=e).flips for e in range(2)]
    assert abs(np.mean(~random[0] & ~random[1]) - 0.25) < 0.02
    assert not np.any(~draws[0].flips & ~draws[1].flips)
