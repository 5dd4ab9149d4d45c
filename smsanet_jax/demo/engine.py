"""The demo's model and photos: one compiled network shared by every request, photos held in memory.

Requests are serialised: one photo at a time goes through the network and the full-resolution
merge (`inference.PhotoColorizer`, the code `colorize` runs), so memory stays bounded by one photo's
work, and a request that would queue behind too many others is refused as busy instead of waiting.
Uploaded photos live only in this process's memory (the last few, by id, each with its latest
colorization); nothing is written to disk. The PNG shown in the page is encoded fast (same
pixels); the one downloaded (the latest colorization, by its serial number) is encoded as
`image_files.write_image` encodes it, so it is the file `colorize` writes for the same photo and
hints.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import math
import secrets
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from smsanet_jax import colorspace, full_resolution, hints, image_files, inference
from smsanet_jax.data import decode

MEGABYTE = 1_000_000
DEFAULT_MAX_UPLOAD_MB = 50
DEFAULT_MAX_PIXELS = 50_000_000
# Pillow refuses images over twice its bomb threshold before anyone can look at them.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# Lightness at which a hint's ab is shown as a colour swatch (a hint carries no lightness of its own).
SWATCH_LIGHTNESS = 60.0
# ab values are rounded to this many decimals: 0.01 Lab units is far below what anyone sees.
AB_DECIMALS = 2
# Pillow's PNG options for what the page shows: ~4x faster to encode than its default (level 6)
# and ~12% larger, the same pixels. Downloads use the default, as `colorize` does.
PREVIEW_PNG_OPTIONS = {"compress_level": 1}


class RequestError(ValueError):
    """A request the demo refuses; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
      max_upload_mb: the largest photo file accepted, in MB (10^6 bytes).
      max_pixels: the most pixels a photo may have (decompression bombs are refused unopened).
      max_queue: requests at the network at once (one running, the others waiting); more are
        refused as busy.
      max_photos: photos kept in memory; older ones are dropped (the page uploads again).
    """

    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_queue: int = 4
    max_photos: int = 3

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MEGABYTE)

    def check(self) -> None:
        """Raises ValueError naming the option when a limit is out of range."""
        if not (math.isfinite(self.max_upload_mb) and self.max_upload_bytes >= 1):
            raise ValueError(f"--max-upload-mb must be a number > 0, got {self.max_upload_mb:g}")
        if not 1 <= self.max_pixels <= PILLOW_MAX_PIXELS:
            raise ValueError(
                f"--max-pixels must be between 1 and {PILLOW_MAX_PIXELS} (Pillow refuses larger images), "
                f"got {self.max_pixels}"
            )


@dataclasses.dataclass(frozen=True)
class Result:
    """A colorization: its serial number (unique in the server's life), its hints, uint8 RGB."""

    serial: int
    points: tuple[hints.Hint, ...]
    image: np.ndarray


@dataclasses.dataclass
class StoredPhoto:
    """An uploaded photo: the network's view of it without hints, its gray rendering (PNG), and its
    latest colorization (what a download gives)."""

    photo: hints.Photo
    gray_png: bytes
    latest: Result | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        height, width = self.photo.rgb.shape[:2]
        return width, height


def encode_png(rgb: np.ndarray, *, preview: bool = False) -> bytes:
    """The PNG bytes `image_files.write_image` writes for `rgb`; `preview`: the same pixels, encoded fast."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=image_files.FORMATS["png"], **(PREVIEW_PNG_OPTIONS if preview else {}))
    return buffer.getvalue()


def srgb_to_ab(colors: Sequence[str]) -> list[list[float]]:
    """Lab a, b of "#rrggbb" sRGB colours (what a colour picker gives), rounded to `AB_DECIMALS`.

    Raises:
      RequestError: a colour that is not "#rrggbb".
    """
    rgb = np.array([_parse_hex(c, i) for i, c in enumerate(colors)], np.uint8).reshape(-1, 3)
    ab = colorspace.rgb_uint8_to_lab(rgb)[:, 1:]
    return np.round(ab.astype(np.float64), AB_DECIMALS).tolist()


def ab_to_srgb(ab: np.ndarray) -> list[str]:
    """ "#rrggbb" swatches of raw ab [N, 2] at `SWATCH_LIGHTNESS`, chroma reduced to fit sRGB."""
    ab = np.asarray(ab, np.float32).reshape(-1, 2)
    l = np.full(ab.shape[:1] + (1,), SWATCH_LIGHTNESS, np.float32)
    rgb = colorspace.lab_to_rgb_uint8(colorspace.lab_from_l_ab(l, full_resolution.fit_chroma(l, ab)))
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb.tolist()]


def _parse_hex(color: Any, index: int) -> tuple[int, int, int]:
    if not (isinstance(color, str) and len(color) == 7 and color[0] == "#"):
        raise RequestError(400, f"colors[{index}]: expected an sRGB colour like #ff8000, got {color!r}")
    try:
        return tuple(bytes.fromhex(color[1:]))
    except ValueError:
        raise RequestError(400, f"colors[{index}]: expected an sRGB colour like #ff8000, got {color!r}") from None


def parse_points(content: Any) -> list[hints.Hint]:
    """One photo's hints from decoded JSON: a list of points as `colorize --hints` reads them.

    Raises:
      RequestError: not a list, or a malformed point (named by position).
    """
    if not isinstance(content, list):
        raise RequestError(400, 'hints: expected a list of {"x", "y", "a", "b"} points for this photo')
    try:
        return hints.parse_hints(content, "hints")[None]
    except ValueError as e:
        raise RequestError(400, str(e)) from None


def points_json(points: Sequence[hints.Hint]) -> list[dict[str, Any]]:
    """Points as `colorize --hints` reads them (numbers kept as given; radius always written)."""
    return [dataclasses.asdict(p) for p in points]


class DemoEngine:
    """The compiled network, the photos uploaded to it, and the rules for using both.

    Thread-safe: the web app calls it from a thread pool.
    """

    def __init__(self, colorizer: inference.Colorizer, limits: Limits = Limits()):
        """Compiles the network for its input size (one blank photo through it).

        Raises:
          ValueError: limits out of range.
        """
        limits.check()
        self.limits = limits
        self.provenance = colorizer.provenance
        # One device and one photo per call: the shape `colorize` compiles for a single photo.
        self._network = inference.PhotoColorizer(colorizer, batch_size=1, num_devices=1)
        self._network([hints.prepare_photo(np.zeros((1, 1, 3), np.uint8), (), self.size)], pad_to=1)
        self._photos: collections.OrderedDict[str, StoredPhoto] = collections.OrderedDict()
        self._photos_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued = 0
        self._serials = itertools.count(1)

    @property
    def size(self) -> int:
        """The network's input side."""
        return self._network.size

    def add_photo(self, encoded: bytes) -> tuple[str, StoredPhoto]:
        """Decodes an uploaded file and keeps it (the oldest photo goes when `max_photos` are held).

        Returns:
          (id, photo): the id names it in later requests.

        Raises:
          RequestError: too large (bytes or pixels), not a readable image, or the server busy.
        """
        if len(encoded) > self.limits.max_upload_bytes:
            raise RequestError(413, self.too_large_message())
        self._check_pixels(encoded)
        # Decoded in turn with the colorizations: one full-resolution photo in memory at a time.
        stored = self._run(lambda: self._prepare(encoded))
        photo_id = secrets.token_urlsafe(12)
        with self._photos_lock:
            self._photos[photo_id] = stored
            while len(self._photos) > self.limits.max_photos:
                self._photos.popitem(last=False)
        return photo_id, stored

    def _prepare(self, encoded: bytes) -> StoredPhoto:
        """The photo's network inputs and its gray rendering (which compiles the merge for its size)."""
        try:
            rgb = np.asarray(decode.decode_rgb(encoded))
        except decode.UnreadableImageError as e:
            raise RequestError(400, f"not an image this server can read ({e})") from None
        gray = np.asarray(inference.merge_full_resolution(rgb, np.zeros((self.size, self.size, 2), np.float32)))
        return StoredPhoto(hints.prepare_photo(rgb, (), self.size), encode_png(gray, preview=True))

    def too_large_message(self) -> str:
        """What a too large upload is told."""
        return (
            f"file too large: the limit is {self.limits.max_upload_mb:g} MB "
            "(start the demo with a larger --max-upload-mb)"
        )

    def _check_pixels(self, encoded: bytes) -> None:
        """Refuses a photo with too many pixels from its header alone (before decoding a bomb)."""
        limit = f"the limit is {self.limits.max_pixels / 1e6:g} megapixels (start the demo with a larger --max-pixels)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(encoded)) as image:
                    width, height = image.size
        except Image.DecompressionBombError:
            over = f"over {PILLOW_MAX_PIXELS / 1e6:.0f} megapixels"
            raise RequestError(413, f"image too large: {over}; {limit}") from None
        except Exception:  # pylint: disable=broad-except
            return  # Not an image Pillow recognises: decode_rgb says why.
        if width * height > self.limits.max_pixels:
            raise RequestError(
                413, f"image too large: {width}x{height} is {width * height / 1e6:.1f} megapixels; {limit}"
            )

    def photo(self, photo_id: Any) -> StoredPhoto:
        """A kept photo.

        Raises:
          RequestError: an unknown id (never uploaded, or dropped for newer photos).
        """
        with self._photos_lock:
            stored = self._photos.get(photo_id) if isinstance(photo_id, str) else None
            if stored is None:
                raise RequestError(404, "unknown photo (the server keeps the last few); upload it again")
            self._photos.move_to_end(photo_id)
            return stored

    def colorize(self, photo_id: Any, points: Sequence[hints.Hint]) -> Result:
        """The full-resolution colorization `colorize` writes for the photo and these hints.

        It becomes the photo's latest (the same hints as the latest reuse it).

        Raises:
          RequestError: an unknown photo, a hint outside it, or the server busy.
        """
        stored = self.photo(photo_id)
        points = tuple(points)
        latest = stored.latest
        if latest is not None and latest.points == points:
            return latest
        photo = dataclasses.replace(stored.photo, **self.hint_planes(stored, points))
        image = self._run(lambda: self._network([photo], pad_to=1)[0])
        stored.latest = Result(next(self._serials), points, image)
        return stored.latest

    def download_png(self, photo_id: Any, serial: int) -> bytes:
        """The PNG file `colorize` writes for the photo's latest colorization, if it is `serial`.

        Raises:
          RequestError: an unknown photo, or a colorization other than the latest (the page changed).
        """
        latest = self.photo(photo_id).latest
        if latest is None or latest.serial != serial:
            raise RequestError(404, "that colorization is no longer the latest; wait for the update, then download")
        return encode_png(latest.image)

    def hint_planes(self, stored: StoredPhoto, points: Sequence[hints.Hint]) -> dict[str, np.ndarray]:
        """{"ab_hint", "mask"} of the points on the photo.

        Raises:
          RequestError: a point outside the photo.
        """
        try:
            ab_hint, mask = hints.hint_planes(points, *stored.size, self.size)
        except ValueError as e:
            raise RequestError(400, f"hints: {e}") from None
        return {"ab_hint": ab_hint, "mask": mask}

    def _run(self, work):
        """Runs `work()` holding the model, unless `max_queue` requests are there already (busy)."""
        with self._queue_lock:
            if self._queued >= self.limits.max_queue:
                raise RequestError(503, "server busy: too many requests waiting; try again in a moment")
            self._queued += 1
        try:
            with self._model_lock:
                return work()
        finally:
            with self._queue_lock:
                self._queued -= 1
