"""Robust image decoding with Pillow: any readable file becomes an 8-bit RGB image, or a clear error."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels are shown over white, as image viewers and browsers do.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImageError(ValueError):
    """The bytes are not an image Pillow can decode completely (the message says why)."""


def decode_rgb(data: bytes, *, target_size: int | None = None) -> Image.Image:
    """Decodes an encoded image into an upright 8-bit RGB Pillow image.

    Conversions: EXIF orientation is applied; grayscale, palette, CMYK and YCbCr become RGB;
    alpha is composited over white; 16-bit samples are scaled to 8 bits. A truncated file is an
    error, not a partly gray image.

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
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Image.UnidentifiedImageError:
        raise UnreadableImageError("not an image Pillow recognises") from None
    # Pillow's format plugins raise many exception types on malformed data (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, DecompressionBombError, ...): all mean "unreadable".
    except Exception as e:  # pylint: disable=broad-except
        raise UnreadableImageError(f"{type(e).__name__}: {e}") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (see `decode_rgb` for the rules)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 instead of scaling them.
        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
