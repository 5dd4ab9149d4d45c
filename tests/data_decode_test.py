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
    resized = transforms.resize_short_side(image, 32)
    assert resized.shape == (32, 48, 3)
    first = [transforms.random_crop(resized, 32, np.random.default_rng(s)) for s in range(8)]
    again = [transforms.random_crop(resized, 32, np.random.default_rng(s)) for s in range(8)]
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


# --- unusual modes, as real TIFF files --------------------------------------------------------------

_RAMP = np.linspace(0.0, 1.0, 8 * 16).reshape(8, 16)
_PHOTO = np.stack([_RAMP * 255, _RAMP[::-1] * 200, np.full_like(_RAMP, 90)], -1).astype(np.uint8)


def _gray(values) -> np.ndarray:
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=2)


def _i16b(values: np.ndarray) -> Image.Image:
    return Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())


# (Pillow image to save as TIFF, the mode Pillow reads back, expected RGB, tolerance).
_CONVERTIBLE = {
    "F in [0, 1]": (Image.fromarray(_RAMP.astype(np.float32)), "F", _gray(np.rint(_RAMP * 255)), 0),
    "F in [0, 255]": (Image.fromarray((_RAMP * 255).astype(np.float32)), "F", _gray(np.rint(_RAMP * 255)), 0),
    "F all zero": (Image.fromarray(np.zeros((8, 16), np.float32)), "F", _gray(np.zeros((8, 16))), 0),
    "I within 16 bits": (
        Image.fromarray((_RAMP * 65535).astype(np.int32)),
        "I",
        _gray(np.rint((_RAMP * 65535).astype(np.int32) / 257)),
        0,
    ),
    "I;16": (Image.fromarray((_RAMP * 65535).astype(np.uint16)), "I;16", _gray(np.rint(_RAMP * 255)), 1),
    "I;16B": (_i16b(_RAMP * 65535), "I;16B", _gray(np.rint(_RAMP * 255)), 1),
    "1-bit": (Image.fromarray(_RAMP > 0.5), "1", _gray(np.where(_RAMP > 0.5, 255, 0)), 0),
    "LA": (
        Image.fromarray(np.dstack([np.full((8, 16), 40, np.uint8), np.where(_RAMP < 0.5, 0, 255)]).astype(np.uint8)),
        "LA",
        _gray(np.where(_RAMP < 0.5, 255, 40)),
        0,
    ),
    "RGBA": (
        Image.fromarray(np.dstack([_PHOTO, np.where(_RAMP < 0.5, 0, 255).astype(np.uint8)])),
        "RGBA",
        np.where((_RAMP < 0.5)[..., None], 255, _PHOTO).astype(np.uint8),
        0,
    ),
    "CMYK": (Image.fromarray(_PHOTO).convert("CMYK"), "CMYK", _PHOTO, 1),
    "YCbCr": (Image.fromarray(_PHOTO).convert("YCbCr"), "YCbCr", _PHOTO, 3),
    "P": (Image.fromarray(_PHOTO).convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "P", _PHOTO, 40),
}
_UNREADABLE = {
    "F outside [0, 255]": (
        Image.fromarray((_RAMP * 301 - 1).astype(np.float32)),
        r"32-bit float TIFF with values outside \[0, 255\] \(-1 to 300\)",
    ),
    "F with NaN": (Image.fromarray(np.where(_RAMP < 0.5, np.nan, 0.5).astype(np.float32)), "NaN"),
    "I above 16 bits": (
        Image.fromarray((_RAMP * 100000).astype(np.int32)),
        r"integer TIFF with values outside \[0, 65535\] \(0 to 100000\)",
    ),
    "I negative": (Image.fromarray((_RAMP * 100 - 50).astype(np.int32)), r"outside \[0, 65535\] \(-50 to 50\)"),
}


def _write_tiff(tmp_path, image: Image.Image) -> tuple[str, bytes]:
    path = tmp_path / "image.tif"
    image.save(path, "TIFF")
    return path, path.read_bytes()


@pytest.mark.parametrize("case", sorted(_CONVERTIBLE))
def test_tiff_modes_are_converted_by_their_value_range(tmp_path, case):
    image, mode, expected, tolerance = _CONVERTIBLE[case]
    path, written = _write_tiff(tmp_path, image)
    assert Image.open(path).mode == mode
    rgb = np.asarray(decode.decode_rgb(written))
    assert rgb.shape == expected.shape and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb.astype(int), expected.astype(int), atol=tolerance, err_msg=case)
    assert path.read_bytes() == written


@pytest.mark.parametrize("case", sorted(_UNREADABLE))
def test_tiffs_without_a_clear_8_bit_meaning_are_unreadable_with_the_reason(tmp_path, case):
    image, reason = _UNREADABLE[case]
    path, written = _write_tiff(tmp_path, image)
    with pytest.raises(decode.UnreadableImageError, match=reason):
        decode.decode_rgb(written)
    assert path.read_bytes() == written


def test_a_neutral_lab_tiff_stays_neutral(tmp_path):
    _, written = _write_tiff(tmp_path, Image.new("LAB", (8, 8), (128, 128, 128)))
    rgb = np.asarray(decode.decode_rgb(written)).astype(int)
    assert np.ptp(rgb, axis=-1).max() <= 2 and 100 < rgb.mean() < 140
