"""Inference on real photos: full-resolution colorization (with optional point hints) and saliency maps.

Both commands take files, globs and folders, process them in batches, and never stop for one bad
input: a missing, unreadable or non-image input (or one whose output already exists, without
`overwrite`) is reported by name and skipped while the others are processed. Outputs are written
under a temporary name and renamed, so a half-written file never remains.

Colorization: the photo (any size, grayscale or colour) is resized to 256x256 RGB (Pillow bicubic,
antialiased, aspect ratio not kept, as Zhang et al.'s `colorizers` demo does), its L goes through
the network with the hints, and only the predicted ab is upsampled (bilinear, half-pixel centres)
to the original size and merged with the original full-resolution L, then converted to uint8 sRGB;
out-of-gamut colours lose chroma rather than lightness (`fit_chroma`), so the output's L is the
original's within uint8 rounding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from smsanet_jax import checkpointing, colorspace, convert, inference, parallel, reporting
from smsanet_jax.data import decode, image_folder, transforms
from smsanet_jax.models import pfanet

NETWORK_SIZE = 256  # The network's input side (the paper's training size).
FORMATS = {"png": "PNG", "jpg": "JPEG"}
JPEG_QUALITY = 95
DEFAULT_HINT_RADIUS = 1  # Hint squares are (2r+1)^2 pixels of the 256 grid (Zhang et al. train with 1-9 px patches).
SALIENCY_SUFFIXES = ("_saliency", "_mask")
# Bisection steps of `fit_chroma`: out-of-gamut chroma is kept to within 2^-8 of the largest that fits.
_CHROMA_STEPS = 8


@dataclasses.dataclass(frozen=True)
class Input:
    """One image to process: its path, and its name relative to what was given (output path)."""

    path: str
    name: str  # The file's base name, or its path inside the folder that was given.


@dataclasses.dataclass
class Report:
    """What a run did: outputs written, and (input, reason) for everything skipped."""

    written: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def fail(self, what: str, reason: str) -> None:
        logging.error("skipping %s: %s", what, reason)
        self.failed.append((what, reason))


def find_inputs(specs: Sequence[str], report: Report) -> list[Input]:
    """Expands files, folders (recursively, image extensions only) and glob patterns, in order.

    A spec that matches nothing is recorded in `report`. A file given twice is kept once.
    """
    found: list[Input] = []
    for spec in specs:
        if os.path.isdir(spec):
            found += _folder_inputs(spec, report)
        elif os.path.exists(spec):
            found.append(Input(spec, os.path.basename(spec)))
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                report.fail(spec, "no file matches this pattern")
            for match in matches:
                found += (
                    _folder_inputs(match, report) if os.path.isdir(match) else [Input(match, os.path.basename(match))]
                )
        else:
            report.fail(spec, "no such file or folder")
    unique, seen = [], set()
    for item in found:
        key = os.path.realpath(item.path)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _folder_inputs(folder: str, report: Report) -> list[Input]:
    try:
        listing = image_folder.list_folder(folder)
    except ValueError as e:
        report.fail(folder, str(e))
        return []
    return [Input(os.path.join(folder, relpath), relpath) for relpath, _, _ in listing.files]


def _output_path(out_dir: str, name: str, suffix: str, fmt: str) -> str:
    stem = os.path.splitext(name)[0]
    return os.path.join(out_dir, f"{stem}{suffix}.{fmt}")


def _plan(
    inputs: Sequence[Input], out_dir: str, suffixes: Sequence[str], fmt: str, overwrite: bool, report: Report
) -> list[tuple[Input, list[str]]]:
    """Inputs with their output paths; drops (and reports) name clashes and existing outputs."""
    planned, owner = [], {}
    for item in inputs:
        paths = [_output_path(out_dir, item.name, s, fmt) for s in suffixes]
        clash = next((owner[p] for p in paths if p in owner), None)
        if clash is not None:
            report.fail(item.path, f"its output {paths[0]} would also be written for {clash}")
            continue
        existing = [p for p in paths if os.path.exists(p)]
        if existing and not overwrite:
            report.fail(item.path, f"{existing[0]} already exists (use --overwrite to replace it)")
            continue
        owner.update(dict.fromkeys(paths, item.path))
        planned.append((item, paths))
    return planned


def write_image(path: str, image: np.ndarray, fmt: str, overwrite: bool) -> None:
    """Writes an image atomically; the temporary file is removed if anything goes wrong.

    Raises:
      FileExistsError: `path` appeared meanwhile and `overwrite` is False.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    directory, base = os.path.split(path)
    # Hidden, so a leftover from a killed process is never taken for an output.
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    try:
        options = {"quality": JPEG_QUALITY} if fmt == "jpg" else {}
        Image.fromarray(image).save(tmp, format=FORMATS[fmt], **options)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} already exists (use --overwrite to replace it)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_rgb(path: str) -> np.ndarray:
    """The upright 8-bit RGB pixels of an image file (see `decode.decode_rgb`)."""
    with open(path, "rb") as f:
        encoded = f.read()
    return np.asarray(decode.decode_rgb(encoded))


def _run(
    planned: Sequence[tuple[Input, list[str]]],
    report: Report,
    *,
    batch_size: int,
    fmt: str,
    overwrite: bool,
    load: Callable[[Input], Any],
    infer: Callable[[list[Any]], list[list[np.ndarray]]],
    num_threads: int | None = None,
) -> Report:
    """Loads (threads, one batch ahead), infers a batch at a time, writes (threads); records failures."""
    progress = reporting.Progress(len(planned), 1)
    batches = [planned[i : i + batch_size] for i in range(0, len(planned), batch_size)]
    threads = num_threads or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        submit = lambda batch: [pool.submit(load, item) for item, _ in batch]
        pending = submit(batches[0]) if batches else []
        writes, done = [], 0
        for k, batch in enumerate(batches):
            loaded = pending
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
            good = []
            for (item, paths), future in zip(batch, loaded):
                try:
                    good.append((item, paths, future.result()))
                except (OSError, ValueError) as e:  # Unreadable image (a ValueError), bad hints, I/O.
                    report.fail(item.path, _reason(e))
            outputs = infer([example for _, _, example in good]) if good else []
            for (item, paths, _), images in zip(good, outputs):
                writes.append(
                    (item, paths, [pool.submit(write_image, p, im, fmt, overwrite) for p, im in zip(paths, images)])
                )
            done += len(batch)
            progress.update(done)
        for item, paths, futures in writes:
            errors = [_reason(e) for e in (f.exception() for f in futures) if e is not None]
            if errors:
                report.fail(item.path, "; ".join(errors))
            else:
                report.written.extend(paths)
    return report


def _padded_stack(arrays: list[np.ndarray], size: int) -> np.ndarray:
    """Stacks `arrays` and adds zero rows up to `size`: every call runs a full batch (one compilation)."""
    stacked = np.stack(arrays)
    return np.concatenate([stacked, np.zeros((size - len(arrays),) + stacked.shape[1:], stacked.dtype)])


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, decode.UnreadableImageError):
        return f"not a readable image ({error})"
    return str(error) or type(error).__name__


# --- Hints -------------------------------------------------------------------------------------


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
    if isinstance(content, list):
        return {None: _parse_points(content, path)}
    if isinstance(content, Mapping):
        return {str(name): _parse_points(points, f"{path}: {name}") for name, points in content.items()}
    raise ValueError(f"hints file {path}: expected a list of points or an object {{image name: points}}")


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


# --- Colorization ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Photo:
    rgb: np.ndarray  # Full resolution, uint8 [H, W, 3].
    small: np.ndarray  # Network input, uint8 [S, S, 3].
    ab_hint: np.ndarray  # [S, S, 2].
    mask: np.ndarray  # [S, S, 1].


def _network_ab(apply_fn, variables: Any, rgb_small: jax.Array, ab_hint: jax.Array, mask: jax.Array) -> jax.Array:
    l, _ = colorspace.rgb_uint8_to_l_ab(rgb_small)
    return apply_fn(variables, l, ab_hint, mask, train=False).astype(jnp.float32)


def fit_chroma(l: jax.Array, ab: jax.Array) -> jax.Array:
    """Shrinks each pixel's ab toward gray just enough that its colour fits in sRGB.

    Clipping an out-of-gamut colour in RGB (what lab2rgb does) changes its lightness, by up to
    ~10 L units for saturated dark or bright predictions; scaling the chroma instead keeps L and
    hue. The scale is the largest in [0, 1] (bisection, 2^-`_CHROMA_STEPS` resolution) at which
    no sRGB channel needs clipping; gray (scale 0) is always kept.

    Args:
      l: L in [0, 100], [..., 1].
      ab: raw ab, [..., 2].

    Returns:
      The scaled ab, [..., 2].
    """

    def fits(scale):
        # lab_to_rgb clips to [0, 1]: a channel at a bound means the colour was (at least) on the edge.
        rgb = colorspace.lab_to_rgb(colorspace.lab_from_l_ab(l, ab * scale))
        return jnp.all((rgb > 0.0) & (rgb < 1.0), axis=-1, keepdims=True)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        good = fits(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo = jnp.where(fits(1.0), 1.0, 0.0)
    lo, _ = jax.lax.fori_loop(0, _CHROMA_STEPS, bisect, (lo, jnp.ones_like(lo)))
    return ab * lo


@functools.lru_cache(maxsize=4)
def _compiled_network(apply_fn):
    """The jitted network of one model: colorizing again reuses the compilation."""
    return jax.jit(functools.partial(_network_ab, apply_fn))


@jax.jit
def merge_full_resolution(rgb: jax.Array, ab_small: jax.Array) -> jax.Array:
    """The original L with the network's ab upsampled to its size, as uint8 sRGB.

    Args:
      rgb: the original image, uint8 [H, W, 3].
      ab_small: predicted raw ab [h, w, 2] at the network's resolution.

    Returns:
      uint8 [H, W, 3], whose L equals the original's within uint8 rounding (see `fit_chroma`).
    """
    l = colorspace.rgb_uint8_to_lab(rgb)[..., :1]
    # Bilinear with half-pixel centres (torch's align_corners=False, as Zhang et al.'s postprocess).
    ab = jax.image.resize(ab_small, rgb.shape[:2] + (2,), "bilinear")
    return colorspace.lab_to_rgb_uint8(colorspace.lab_from_l_ab(l, fit_chroma(l, ab)))


def colorize(
    colorizer: inference.Colorizer,
    inputs: Sequence[str],
    out_dir: str,
    *,
    hints: str | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    fmt: str = "png",
    num_devices: int = 0,
    size: int = NETWORK_SIZE,
) -> Report:
    """Colorizes photos at their full resolution (see the module docstring); writes `out_dir/<name>.<fmt>`.

    Args:
      colorizer: the model (`inference.load_colorizer`).
      inputs: files, folders (searched recursively for image files) and glob patterns.
      out_dir: output folder; an input's relative name (file name, or path inside its folder) is kept.
      hints: a hints JSON file (see `load_hints`).
      overwrite: replace existing outputs; otherwise such inputs are reported and skipped.
      batch_size: images per network call; rounded up to a multiple of the number of devices.
      fmt: "png" or "jpg".
      num_devices: shard the network's batch over the first N local devices (0: all).
      size: the network's input side (a multiple of 8).

    Returns:
      The written files and the failures.

    Raises:
      ValueError: a bad format or hints file (before anything is processed).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    hints_by_name = load_hints(hints) if hints else {}
    report = Report()
    items = find_inputs(inputs, report)
    unknown = set(hints_by_name) - {None} - {item.name for item in items}
    if unknown:
        logging.warning(
            "hints for %s, which are not among the inputs (names are file names, or paths "
            "inside a folder given as input)",
            ", ".join(sorted(unknown)),
        )
    planned = _plan(items, out_dir, [""], fmt, overwrite, report)
    mesh = parallel.make_mesh(num_devices)
    # Every call runs a full (padded) batch: no bigger than the inputs need.
    batch_size = parallel.round_up_to_devices(min(batch_size, max(len(planned), 1)), mesh)
    variables = jax.device_put(colorizer.variables, parallel.replicated(mesh))
    network = _compiled_network(colorizer.apply_fn)

    def load(item: Input) -> _Photo:
        rgb = _read_rgb(item.path)
        height, width = rgb.shape[:2]
        ab_hint, mask = hint_planes(hints_by_name.get(item.name, hints_by_name.get(None, [])), width, height, size)
        small = np.asarray(Image.fromarray(rgb).resize((size, size), transforms.RESAMPLE))
        return _Photo(rgb, small, ab_hint, mask)

    def infer(photos: list[_Photo]) -> list[list[np.ndarray]]:
        batch = parallel.make_global(
            {k: _padded_stack([getattr(p, k) for p in photos], batch_size) for k in ("small", "ab_hint", "mask")}, mesh
        )
        ab = np.asarray(network(variables, batch["small"], batch["ab_hint"], batch["mask"]))
        return [[np.asarray(merge_full_resolution(p.rgb, ab[i]))] for i, p in enumerate(photos)]

    return _run(planned, report, batch_size=batch_size, fmt=fmt, overwrite=overwrite, load=load, infer=infer)


# --- Saliency ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="size")
def _shrink(rgb: jax.Array, size: int) -> jax.Array:
    """As `pfanet.saliency` resizes: bilinear, antialiased, to size x size."""
    return jax.image.resize(rgb.astype(jnp.float32), (size, size, 3), "bilinear", antialias=True)


@functools.partial(jax.jit, static_argnames="shape")
def _grow(prob: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return jnp.clip(jax.image.resize(prob, shape + (1,), "bilinear"), 0.0, 1.0)


def saliency_maps(
    params: str,
    inputs: Sequence[str],
    out_dir: str,
    *,
    threshold: float = 0.5,
    size: int = NETWORK_SIZE,
    overwrite: bool = False,
    batch_size: int = 8,
) -> Report:
    """PFANet saliency of photos: `<name>_saliency.png` (probability x 255) and `<name>_mask.png`.

    Both are 8-bit grayscale at the input's size; the mask is 255 where the probability is at
    least `threshold` (the salient loss's rule), else 0. PFANet runs at size x size, as
    `pfanet.saliency` does it (the same resizing, one image at a time).

    Args:
      params: converted PFANet weights (`convert-weights pfanet-s|pfanet-k`).
      inputs: files, folders and glob patterns.
      out_dir: output folder.
      threshold: probability at or above which a pixel is salient.
      size: PFANet's input side, a multiple of 16.
      overwrite: replace existing outputs.
      batch_size: images per network call.

    Returns:
      The written files and the failures.

    Raises:
      ValueError: the weights file is not PFANet's, or a bad threshold or size.
    """
    variables, variant = load_pfanet(params)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if size % pfanet.SIZE_MULTIPLE:
        raise ValueError(f"size must be a multiple of {pfanet.SIZE_MULTIPLE}, got {size}")
    report = Report()
    planned = _plan(find_inputs(inputs, report), out_dir, SALIENCY_SUFFIXES, "png", overwrite, report)
    batch_size = min(batch_size, max(len(planned), 1))
    variables = jax.device_put(variables)

    def infer(images: list[np.ndarray]) -> list[list[np.ndarray]]:
        small = _padded_stack([np.asarray(_shrink(rgb, size)) for rgb in images], batch_size)
        prob = pfanet.saliency(variables, small, variant=variant, size=size)
        out = []
        for i, rgb in enumerate(images):
            full = np.asarray(_grow(prob[i], rgb.shape[:2]))[..., 0]
            out.append([np.rint(full * 255.0).astype(np.uint8), np.where(full >= threshold, 255, 0).astype(np.uint8)])
        return out

    return _run(
        planned,
        report,
        batch_size=batch_size,
        fmt="png",
        overwrite=overwrite,
        load=lambda item: _read_rgb(item.path),
        infer=infer,
    )


def load_pfanet(params: str) -> tuple[dict[str, Any], str]:
    """PFANet variables from a weights file, and their variant ("s" or "k", told by the layout).

    Raises:
      ValueError: the file holds no PFANet weights (every mismatch is listed).
    """
    variables, _ = checkpointing.load_variables(params)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    hl_conv = variables.get("params", {}).get("hl_conv", {}).get("kernel")
    # The Keras layout's high-level conv is 1x1, the PyTorch port's 3x3 (facts §3.4).
    variant = "k" if hl_conv is not None and np.shape(hl_conv)[0] == 1 else "s"
    side = pfanet.SIZE_MULTIPLE
    expected = jax.eval_shape(
        pfanet.PFANet(variant).init, jax.random.key(0), jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    )
    errors = convert.shape_errors(variables, expected)
    if errors:
        raise ValueError(
            f"{params}: not PFANet weights ({len(errors)} mismatches, e.g. {errors[0]}); convert "
            "them with `smsanet-jax convert-weights pfanet-s SRC DST` (pfanet-k for the Keras .h5)"
        )
    return variables, variant
