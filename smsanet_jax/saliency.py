"""The saliency command: PFANet saliency probability and mask PNGs of photos, at each photo's size."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smsanet_jax import files, hints, image_files, weights
from smsanet_jax.models import pfanet

SUFFIXES = ("_saliency", "_mask")


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
    size: int = hints.NETWORK_SIZE,
    overwrite: bool = False,
    batch_size: int = 8,
) -> image_files.Report:
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
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if size < pfanet.SIZE_MULTIPLE or size % pfanet.SIZE_MULTIPLE:
        raise ValueError(f"--size must be a positive multiple of {pfanet.SIZE_MULTIPLE}, got {size}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    files.check_not_inside(out_dir, inputs, "--out")
    variables, variant = weights.load_pfanet(params)
    report = image_files.Report()
    planned = image_files.plan(image_files.find_inputs(inputs, report), out_dir, SUFFIXES, "png", overwrite, report)
    batch_size = min(batch_size, max(len(planned), 1))
    variables = jax.device_put(variables)

    def infer(images: list[np.ndarray]) -> list[list[np.ndarray]]:
        small = hints.padded_stack([np.asarray(_shrink(rgb, size)) for rgb in images], batch_size)
        prob = pfanet.saliency(variables, small, variant=variant, size=size)
        out = []
        for i, rgb in enumerate(images):
            full = np.asarray(_grow(prob[i], rgb.shape[:2]))[..., 0]
            out.append([np.rint(full * 255.0).astype(np.uint8), np.where(full >= threshold, 255, 0).astype(np.uint8)])
        return out

    return image_files.run(
        planned,
        report,
        batch_size=batch_size,
        fmt="png",
        overwrite=overwrite,
        load=lambda item: image_files.read_rgb(item.path),
        infer=infer,
    )
