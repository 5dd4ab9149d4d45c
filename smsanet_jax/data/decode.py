"""Robust image decoding with Pillow: any readable file becomes an 8-bit RGB image, or a clear error."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels are shown over white, as image viewers and browsers do.
ALPHA_BACKGROUND = (255, 255, 255)
# Pillow's modes of one channel deeper than 8 bits: "F" (32-bit float), "I" (32-bit signed int) and
# the 16-bit "I;16*". Their values are rescaled to 8 bits when their range makes the meaning clear.
_FLOAT_MODE = "F"
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_UINT16_MAX = 65535


class UnreadableImageError(ValueError):
    """The bytes are not an image Pillow can decode completely (the message says why)."""


def decode_rgb(data: bytes, *, target_size: int | None = None) -> Image.Image:
    """Decodes an encoded image into an upright 8-bit RGB Pillow image.

    Conversions: EXIF orientation is applied; grayscale, 1-bit, palette, CMYK, YCbCr and Lab become
    RGB; alpha is composited over white. Deeper grayscale is rescaled by what its value range
    means: 16-bit samples, and 32-bit integers within [0, 65535], by 1/257; 32-bit floats within
    [0, 1] by 255, within [0, 255] as they are. A truncated file, or deep samples outside those
    ranges (no clear 8-bit meaning), are errors, not a partly gray or all-black image.

    Args:
      data: the file's bytes (JPEG, PNG, WebP, BMP, TIFF, ... whatever Pillow reads).
      target_size: if given, the smallest side the caller will resize to. A JPEG at least twice
        that size in both dimensions is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling),
        never below `target_size`; this is several times faster than a full decode.

    Returns:
      An RGB image of at least 1x1 pixels.

    Raises:
      UnreadableImageError: empty, truncated, corrupt or unsupported data.
    """
    if not data:
        raise UnreadableImageError("empty file")
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd but decodable files (e.g. corrupt EXIF); they are fine.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if target_size and image.format == "JPEG":
                image.draft("RGB", (target_size, target_size))
            image.load()
            file_format = image.format  # Transposing makes a copy, which has none.
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image, file_format)
    except Image.UnidentifiedImageError:
        raise UnreadableImageError("not an image Pillow recognises") from None
    except UnreadableImageError:
        raise
    # Pillow's format plugins raise many exception types on malformed data (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, DecompressionBombError, ...): all mean "unreadable".
    except Exception as e:  # pylint: disable=broad-except
        raise UnreadableImageError(f"{type(e).__name__}: {e}") from e


def _to_rgb(image: Image.Image, file_format: str | None) -> Image.Image:
    """Any Pillow mode -> RGB (see `decode_rgb` for the rules)."""
    if image.mode == _FLOAT_MODE or image.mode in _INT_MODES:
        # Pillow's own conversion clips these at 255 instead of scaling them (floats in [0, 1]
        # become black).
        image = _deep_gray_to_l(image, file_format)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _deep_gray_to_l(image: Image.Image, file_format: str | None) -> Image.Image:
    """A float or 16/32-bit integer grayscale image -> 8-bit "L", scaled by its value range.

    Raises:
      UnreadableImageError: values without a clear 8-bit meaning (NaN, or outside the ranges).
    """
    samples = np.asarray(image, dtype=np.float64)
    kind = f"{'32-bit float' if image.mode == _FLOAT_MODE else 'integer'} {file_format or 'image'}"
    if not np.all(np.isfinite(samples)):
        raise UnreadableImageError(f"{kind} with NaN or infinite values")
    low, high = float(samples.min()), float(samples.max())
    top = 255 if image.mode == _FLOAT_MODE else _UINT16_MAX
    if low < 0 or high > top:
        raise UnreadableImageError(
            f"{kind} with values outside [0, {top}] ({low:g} to {high:g}): no clear 8-bit meaning; "
            "convert it to 8 or 16 bits"
        )
    if image.mode != _FLOAT_MODE:
        scale = 255 / _UINT16_MAX  # = 1/257: 65535 -> 255.
    else:
        scale = 255.0 if high <= 1 else 1.0
    return Image.fromarray(np.clip(np.rint(samples * scale), 0, 255).astype(np.uint8), "L")
