"""Convolution primitives shared by every network (NHWC activations, HWIO kernels).

Each op has a reference implementation on `lax.conv_general_dilated`, the path XLA lowers to
cuDNN on GPU. `impl` selects the implementation; "auto" resolves by backend.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "xla")


def resolve_impl(impl: str) -> str:
    """Maps "auto" to the implementation best suited to the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "xla"
    return impl


def conv2d(
        x: jax.Array,
        kernel: jax.Array,
        *,
        padding: tuple[tuple[int, int], tuple[int, int]],
        dilation: tuple[int, int] = (1, 1),
        impl: str = "auto",
) -> jax.Array:
    """Stride-1 cross-correlation, as torch.nn.Conv2d: x [N,H,W,I], kernel [kh,kw,I,O]."""
    del impl  # Only the XLA path exists so far.
    return lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=padding,
            rhs_dilation=dilation, dimension_numbers=_DIMENSION_NUMBERS)


def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array, *, impl: str = "auto") -> jax.Array:
    """torch.nn.ConvTranspose2d(kernel_size=4, stride=2, padding=1): [N,H,W,I] -> [N,2H,2W,O].

    `kernel[ky, kx, i, o]` equals torch's `weight[i, o, ky, kx]`. A transposed convolution is a
    correlation of the 2x-dilated input, padded by k - 1 - p = 2, with the spatially flipped kernel.
    """
    del impl
    if kernel.shape[:2] != (4, 4):
        raise ValueError(f"conv_transpose_4x4_s2 needs a 4x4 kernel, got {kernel.shape}")
    return lax.conv_general_dilated(
            x, jnp.flip(kernel, (0, 1)), window_strides=(1, 1), padding=((2, 2), (2, 2)),
            lhs_dilation=(2, 2), dimension_numbers=_DIMENSION_NUMBERS)
