"""Image geometry for the loaders (short-side resize + crop, flip) and the near-grayscale test."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import color

# Bicubic, as in Zhang et al.'s colorization utilities (PIL resample=3); Pillow antialiases when
# it shrinks.
RESAMPLE = Image.Resampling.BICUBIC
# The ab-range test looks at about this many pixels per side: a near-gray crop stays near-gray when
# subsampled, and the test then costs ~0.2 ms instead of several.
_GRAY_TEST_SIDE = 64


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling so that the short side is exactly `size`."""
    scale = size / min(width, height)
    if width <= height:
        return size, max(size, round(height * scale))
    return max(size, round(width * scale)), size


def resize_and_crop(image: Image.Image, size: int, left: int, top: int) -> np.ndarray:
    """Resizes the short side to `size`, then crops `size` x `size` at (`left`, `top`).

    The crop window is mapped back onto the source and only that region is resampled (Pillow's
    `box`): the same filter taps as resizing the whole image and cropping, at a fraction of the
    cost (pixels can differ by a few levels where Pillow's 8-bit intermediate pass clips).

    Args:
      image: an RGB image.
      size: the output side.
      left: column of the crop in the resized image, in [0, resized width - size].
      top: row of the crop in the resized image, in [0, resized height - size].

    Returns:
      uint8 [size, size, 3].
    """
    width, height = image.size
    new_width, new_height = resized_size(width, height, size)
    sx, sy = new_width / width, new_height / height
    # min(): float rounding must not push the box past the image, which Pillow rejects.
    box = (left / sx, top / sy, min(width, (left + size) / sx), min(height, (top + size) / sy))
    return np.asarray(image.resize((size, size), RESAMPLE, box=box))


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Evaluation geometry: short side resized to `size`, centre `size` x `size` crop (uint8)."""
    new_width, new_height = resized_size(*image.size, size)
    return resize_and_crop(image, size, (new_width - size) // 2, (new_height - size) // 2)


def resize_short_side(image: Image.Image, size: int) -> np.ndarray:
    """The whole image with its short side scaled to `size` (bicubic): what training crops are cut from.

    Returns:
      uint8 [H, W, 3] with min(H, W) == size.
    """
    return np.asarray(image.resize(resized_size(*image.size, size), RESAMPLE))


def random_crop(resized: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Training geometry: a random `size` x `size` window of `resize_short_side`'s output, randomly flipped.

    Cutting crops from the resized image (rather than resampling each crop's box from the source,
    as `resize_and_crop` does for the single evaluation crop) makes a crop a slice: a decoded,
    resized image is kept once and serves every crop drawn from it.
    """
    height, width = resized.shape[:2]
    left = int(rng.integers(0, width - size + 1))
    top = int(rng.integers(0, height - size + 1))
    crop = resized[top : top + size, left : left + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def ab_spread(rgb: np.ndarray) -> float:
    """Range of a plus range of b (CIE Lab units) over an RGB image; ~0 for a grayscale image.

    This is Zhang et al.'s near-grayscale criterion (their `ab_thresh`: training images with a
    summed ab range below 5 are skipped), measured on a subsample of about 64x64 pixels.

    Args:
      rgb: uint8 [H, W, 3].

    Returns:
      (max a - min a) + (max b - min b).
    """
    stride = max(1, min(rgb.shape[:2]) // _GRAY_TEST_SIDE)
    ab = color.rgb2lab(rgb[::stride, ::stride])[..., 1:].reshape(-1, 2)
    return float(np.sum(np.ptp(ab, axis=0)))
