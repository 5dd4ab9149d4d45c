"""The colorize command: photos of any size colorized at full resolution, with optional point hints.

How a photo is colorized is `inference.PhotoColorizer`'s (JAX) or the ONNX runtime's business;
this module only walks the files (`image_files`), so it imports no JAX itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from smsanet_jax import files, hints, image_files


class PhotoNetwork(Protocol):
    """What colorize needs of a network: batches of `hints.Photo` in, full-resolution uint8 RGB out."""

    batch_size: int  # The most photos per call.
    size: int  # The network's input side.

    def __call__(self, photos: Sequence[hints.Photo], pad_to: int) -> list[np.ndarray]:
        """Colorizes `photos`, padded to `pad_to` rows so that every call has the same shape."""


def colorize(
    network: PhotoNetwork,
    inputs: Sequence[str],
    out_dir: str,
    *,
    hints_file: str | None = None,
    overwrite: bool = False,
    fmt: str = "png",
) -> image_files.Report:
    """Colorizes photos at their full resolution (see the module docstring); writes `out_dir/<name>.<fmt>`.

    Args:
      network: the colorizer's network (`inference.PhotoColorizer`, or onnxruntime's), which fixes
        the batch size and the network's input side.
      inputs: files, folders (searched recursively for image files) and glob patterns.
      out_dir: output folder; an input's relative name (file name, or path inside its folder) is kept.
      hints_file: a hints JSON file (see `hints.load_hints`).
      overwrite: replace existing outputs; otherwise such inputs are reported and skipped.
      fmt: "png" or "jpg".

    Returns:
      The written files and the failures.

    Raises:
      ValueError: a bad format or hints file, or `out_dir` inside an input folder (before anything
        is processed).
    """
    files.check_not_inside(out_dir, inputs, "--out")
    if fmt not in image_files.FORMATS:
        raise ValueError(f"--format must be one of {sorted(image_files.FORMATS)}, got {fmt!r}")
    hints_by_name = hints.load_hints(hints_file) if hints_file else {}
    report = image_files.Report()
    items = image_files.find_inputs(inputs, report)
    unknown = set(hints_by_name) - {None} - {item.name for item in items}
    if unknown:
        logging.warning(
            "hints for %s, which are not among the inputs (names are file names, or paths "
            "inside a folder given as input)",
            ", ".join(sorted(unknown)),
        )
    planned = image_files.plan(items, out_dir, [""], fmt, overwrite, report)
    # Every call runs one shape (one compilation), no bigger than the inputs need.
    batch_size = max(1, min(network.batch_size, len(planned)))

    def load(item: image_files.Input) -> hints.Photo:
        points = hints_by_name.get(item.name, hints_by_name.get(None, []))
        return hints.prepare_photo(image_files.read_rgb(item.path), points, network.size)

    return image_files.run(
        planned,
        report,
        batch_size=batch_size,
        fmt=fmt,
        overwrite=overwrite,
        load=load,
        infer=lambda photos: [[image] for image in network(photos, pad_to=batch_size)],
    )
