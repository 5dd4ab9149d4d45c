"""Tests of image decoding (reduced-size JPEG, orientation) and of the loaders' crop geometry."""

import io

import numpy as np
import pytest
from PIL import Image

from smsanet_jax.data import decode, transforms

# Eight distinct colours for band images: each band's centre must come out in its own colour.
BANDS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [128, 64, 0], [0, 64, 128]],
    np.uint8,
)


def _bands(width: int, height: int, vertical: bool) -> Image.Image:
    """8 equal vertical (or horizontal) colour bands."""
    n = width if vertical else height
    index = np.arange(n) * 8 // n
    strip = BANDS[index]
    array = (
        np.broadcast_to(strip[None], (height, width, 3))
        if vertical
        else np.broadcast_to(strip[:, None], (height, width, 3))
    )
    return Image.fromarray(np.ascontiguousarray(array))


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("width,height", [(128, 64), (64, 128)])
def test_center_crop_downscale_keeps_middle_bands(width, height):
    # Short side 64 -> 32 halves everything: bands of 16 px become 8 px; the long side becomes 64
    # and the centre crop keeps resized pixels 16..48, i.e. bands 2, 3, 4 and 5.
    vertical = width > height
    out = transforms.center_crop(_bands(width, height, vertical), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    centres = out[0, 4::8] if vertical else out[4::8, 0]
    np.testing.assert_array_equal(centres, BANDS[2:6])


def test_center_crop_upscales_small_images():
    # 16x8 -> short side 8 -> 32 (x4): long side 64, bands of 2 px become 8 px, crop keeps 16..48.
    out = transforms.center_crop(_bands(16, 8, vertical=True), 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[16, 4::8], BANDS[2:6], atol=1)


@pytest.mark.parametrize(
    "size,expected",
    [((100, 50), (64, 32)), ((50, 100), (32, 64)), ((32, 32), (32, 32)), ((1, 1), (32, 32)), ((333, 500), (32, 48))],
)
def test_resized_size_short_side(size, expected):
    assert transforms.resized_size(*size, 32) == expected


def test_box_resize_matches_resize_then_crop():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(150, 200, 3)), axis=1)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    image = Image.fromarray(smooth)
    full = np.asarray(image.resize(transforms.resized_size(200, 150, 48), transforms.RESAMPLE))
    full = full.astype(int)
    for left in (0, 7, 16):
        out = transforms.resize_and_crop(image, 48, left, 0).astype(int)
        np.testing.assert_allclose(out, full[:, left : left + 48], atol=2)


def test_random_crop_is_deterministic_and_flips():
    image = _bands(96, 64, vertical=True)
    first = [transforms.random_crop(image, 32, np.random.default_rng(s)) for s in range(8)]
    again = [transforms.random_crop(image, 32, np.random.default_rng(s)) for s in range(8)]
    np.testing.assert_array_equal(first, again)
    # Bands run left to right in BANDS order unless the crop was flipped.
    flipped = [tuple(c[0, 0]) in map(tuple, BANDS[4:]) for c in first]
    assert any(flipped) and not all(flipped)


def test_ab_spread_separates_gray_from_colour():
    gray = np.repeat(np.linspace(0, 255, 64 * 64).reshape(64, 64, 1), 3, axis=2).astype(np.uint8)
    assert transforms.ab_spread(gray) < 0.05  # Not exactly 0: the D65 matrix rows sum to ~1.
    assert transforms.ab_spread(np.asarray(_bands(64, 64, vertical=True))) > 100


@pytest.mark.parametrize(
    "target,expected", [(None, (1024, 768)), (256, (512, 384)), (100, (256, 192)), (600, (1024, 768))]
)
def test_jpeg_reduced_size_decoding_never_below_target(target, expected):
    data = _jpeg(_bands(1024, 768, vertical=True))
    assert decode.decode_rgb(data, target_size=target).size == expected


def test_exif_orientation_is_applied():
    # Stored wide (left red, right blue) with orientation 6 (display rotated 90 degrees clockwise):
    # upright it is tall, red on top.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = np.asarray(decode.decode_rgb(_jpeg(Image.fromarray(stored), exif=exif.tobytes())))
    assert image.shape == (64, 32, 3)
    np.testing.assert_allclose(image[:24].mean(axis=(0, 1)), (255, 0, 0), atol=8)
    np.testing.assert_allclose(image[40:].mean(axis=(0, 1)), (0, 0, 255), atol=8)


@pytest.mark.parametrize("data", [b"", b"GIF89a not really", b"\xff\xd8\xff\xe0" + b"\0" * 40])
def test_garbage_is_unreadable(data):
    with pytest.raises(decode.UnreadableImageError):
        decode.decode_rgb(data)


def test_truncated_jpeg_is_unreadable_even_at_reduced_size():
    data = _jpeg(_bands(256, 256, vertical=True))
    with pytest.raises(decode.UnreadableImageError, match="truncated"):
        decode.decode_rgb(data[: len(data) // 2], target_size=32)
