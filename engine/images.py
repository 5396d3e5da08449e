"""Image files as model input: PNG/JPEG through Pillow (optional), converted to the model's shape."""
import numpy as np


class ImageError(ValueError):
    """An image file that cannot be read (or Pillow, which reads it, is missing)."""


def read_image(path, shape, note=None):
    """An image file as uint8 HWC of the model's input (C, H, W); Pillow is optional.

    An image of another colour mode or size is converted and resized (bilinear); `note`, if given,
    is called with a line saying so. Raises ImageError when the file cannot be read or Pillow is
    not installed.
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("reading PNG/JPEG files needs Pillow: pip install pillow "
                         "(or pass a .npy batch instead)") from None
    c, h, w = shape
    try:
        with Image.open(path) as im:
            mode, size = ("L" if c == 1 else "RGB"), (w, h)
            changes = [f"{im.mode} converted to {mode}"] if im.mode != mode else []
            changes += [f"{im.width}x{im.height} resized to {w}x{h}"] if im.size != size else []
            if changes and note is not None:
                note(f"note: {path}: {', '.join(changes)} (the model takes {w}x{h} {mode})")
            arr = np.asarray(im.convert(mode).resize(size, Image.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # Pillow refuses images of over 179M pixels
        raise ImageError(f"cannot read image {path}: {e}") from None
    return arr[..., None] if arr.ndim == 2 else arr
