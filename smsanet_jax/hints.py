"""Point hints and the network's view of a photo: NumPy and Pillow only (no JAX).

A hint is a colour at a pixel of the original photo, in raw Lab a/b, painted into BaseNet's hint
planes as a (2r+1)^2 square of the 256x256 network grid (mask 1 there). `colorize --hints FILE`
reads them from JSON: a list of points for every image, or {image name: points}. Runtimes other
than JAX (onnxruntime) use this module as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from smsanet_jax.data import transforms

NETWORK_SIZE = 256  # The network's input side (the paper's training size).
DEFAULT_HINT_RADIUS = 1  # Hint squares are (2r+1)^2 pixels of the 256 grid (Zhang et al. train with 1-9 px patches).


@dataclasses.dataclass(frozen=True)
class Hint:
    """A colour hint: raw Lab a, b at pixel (x, y) of the original image (x: column, y: row)."""

    x: float
    y: float
    a: float
    b: float
    radius: int = DEFAULT_HINT_RADIUS


def _parse_points(points: Any, where: str) -> list[Hint]:
    if not isinstance(points, list):
        raise ValueError(f"{where}: expected a list of {{x, y, a, b}} points")
    hints = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not {"x", "y", "a", "b"} <= set(point):
            raise ValueError(f"{where}[{i}]: a point needs x, y, a and b, got {point!r}")
        unknown = set(point) - {"x", "y", "a", "b", "radius"}
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown field(s) {sorted(unknown)}")
        values = [point[k] for k in ("x", "y", "a", "b")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{where}[{i}]: x, y, a and b must be finite numbers, got {point!r}")
        radius = point.get("radius", DEFAULT_HINT_RADIUS)
        if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
            raise ValueError(f"{where}[{i}]: radius must be an integer >= 0, got {radius!r}")
        hints.append(Hint(*map(float, values), radius=radius))
    return hints


def load_hints(path: str) -> dict[str | None, list[Hint]]:
    """Reads a hints file: a list of points for every image, or {image name: points}.

    A point is `{"x": column, "y": row, "a": a, "b": b}` in the original image's pixels (origin at
    the top-left corner) and raw Lab units, with an optional `"radius"` (default 1: a 3x3 square
    of the 256x256 network grid). Image names are those of the outputs: the file's name, or its
    path inside a folder given as input.

    Returns:
      {None: points} for a list (every image), else {name: points}.

    Raises:
      ValueError: unreadable JSON or a malformed point (named by position).
    """
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"hints file {path}: {e}") from e
    return parse_hints(content, f"hints file {path}")


def parse_hints(content: Any, where: str) -> dict[str | None, list[Hint]]:
    """Hints from decoded JSON (see `load_hints`); `where` names the source in error messages."""
    if isinstance(content, list):
        return {None: _parse_points(content, where)}
    if isinstance(content, Mapping):
        return {str(name): _parse_points(points, f"{where}: {name}") for name, points in content.items()}
    raise ValueError(f"{where}: expected a list of points or an object {{image name: points}}")


def hint_planes(
    hints: Iterable[Hint], width: int, height: int, size: int = NETWORK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """BaseNet's hint inputs at size x size: raw ab [size, size, 2] and mask [size, size, 1] in {0, 1}.

    Raises:
      ValueError: a point outside the image.
    """
    ab = np.zeros((size, size, 2), np.float32)
    mask = np.zeros((size, size, 1), np.float32)
    for hint in hints:
        if not (0 <= hint.x < width and 0 <= hint.y < height):
            raise ValueError(f"hint at ({hint.x:g}, {hint.y:g}) is outside the {width}x{height} image")
        # Pixel (x, y) covers [x, x+1) x [y, y+1); its centre lands in grid cell floor((x + 0.5) * size / W).
        gx = min(size - 1, int((hint.x + 0.5) * size / width))
        gy = min(size - 1, int((hint.y + 0.5) * size / height))
        rows = slice(max(0, gy - hint.radius), gy + hint.radius + 1)
        cols = slice(max(0, gx - hint.radius), gx + hint.radius + 1)
        ab[rows, cols] = (hint.a, hint.b)
        mask[rows, cols] = 1.0
    return ab, mask


@dataclasses.dataclass(frozen=True)
class Photo:
    """A photo ready for the network: the full-resolution original and the network's inputs."""

    rgb: np.ndarray  # Full resolution, uint8 [H, W, 3].
    small: np.ndarray  # Network input, uint8 [S, S, 3].
    ab_hint: np.ndarray  # [S, S, 2].
    mask: np.ndarray  # [S, S, 1].


def prepare_photo(rgb: np.ndarray, hints: Sequence[Hint] = (), size: int = NETWORK_SIZE) -> Photo:
    """The network's inputs for a full-resolution uint8 RGB photo and its hints.

    Raises:
      ValueError: a hint outside the photo.
    """
    height, width = rgb.shape[:2]
    ab_hint, mask = hint_planes(hints, width, height, size)
    small = np.asarray(Image.fromarray(rgb).resize((size, size), transforms.RESAMPLE))
    return Photo(rgb, small, ab_hint, mask)


def padded_stack(arrays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stacks `arrays` and adds zero rows up to `size`: every call runs a full batch (one compilation)."""
    stacked = np.stack(arrays)
    return np.concatenate([stacked, np.zeros((size - len(arrays),) + stacked.shape[1:], stacked.dtype)])
