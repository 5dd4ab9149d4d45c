"""Convolution primitives shared by every network (NHWC activations, HWIO kernels).

Each op has two implementations with identical parameters and results:

- "xla": plain `lax.conv_general_dilated`, the path XLA lowers to cuDNN on GPU.
- "cpu": formulations tuned for XLA:CPU, whose forward convolutions are fast but whose autodiff
  gradients are not: the weight gradient of a convolution lowers to a generic convolution with a
  huge window, and the gradient of a transposed (input-dilated) convolution to one that multiplies
  mostly zeros; both run one to two orders of magnitude below the matmul rate.

"auto" picks "cpu" on the CPU backend and "xla" elsewhere.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "xla", "cpu")

Padding = tuple[tuple[int, int], tuple[int, int]]


def resolve_impl(impl: str) -> str:
    """Maps "auto" to the implementation best suited to the default backend.

    Args:
        impl: one of `IMPLS`.

    Returns:
        "cpu" or "xla".

    Raises:
        ValueError: for an unknown implementation name.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv2d(
        x: jax.Array,
        kernel: jax.Array,
        *,
        padding: Padding,
        dilation: tuple[int, int] = (1, 1),
        impl: str = "auto",
) -> jax.Array:
    """Stride-1 cross-correlation, as torch.nn.Conv2d (without bias).

    Args:
        x: [N, H, W, I] input.
        kernel: [kh, kw, I, O] kernel, same dtype as `x`.
        padding: ((top, bottom), (left, right)) zero padding.
        dilation: kernel dilation (dy, dx).
        impl: "auto", "xla" or "cpu".

    Returns:
        [N, H', W', O] output in the dtype of `x`.
    """
    padding = tuple(tuple(p) for p in padding)
    dilation = tuple(dilation)
    if resolve_impl(impl) == "cpu" and _fits_shifted_vjp(kernel.shape, padding, dilation):
        return _conv_shifted_vjp(x, kernel, padding, dilation)
    return lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=padding, rhs_dilation=dilation,
            dimension_numbers=_DIMENSION_NUMBERS)


def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array, *, impl: str = "auto") -> jax.Array:
    """torch.nn.ConvTranspose2d(kernel_size=4, stride=2, padding=1) without bias.

    Args:
        x: [N, H, W, I] input.
        kernel: [4, 4, I, O] kernel; `kernel[ky, kx, i, o]` equals torch's `weight[i, o, ky, kx]`.
        impl: "auto", "xla" or "cpu".

    Returns:
        [N, 2H, 2W, O] output in the dtype of `x`.

    Raises:
        ValueError: if the kernel is not 4x4.
    """
    if kernel.shape[:2] != (4, 4):
        raise ValueError(f"conv_transpose_4x4_s2 needs a 4x4 kernel, got {kernel.shape}")
    if resolve_impl(impl) == "cpu":
        return _conv_transpose_by_phases(x, kernel)
    # A transposed convolution is a correlation of the 2x-dilated input, padded by k - 1 - p = 2,
    # with the spatially flipped kernel.
    return lax.conv_general_dilated(
            x, jnp.flip(kernel, (0, 1)), window_strides=(1, 1), padding=((2, 2), (2, 2)),
            lhs_dilation=(2, 2), dimension_numbers=_DIMENSION_NUMBERS)


# ---------------------------------------------------------------------------------------------
# XLA:CPU formulations.


def _fits_shifted_vjp(kernel_shape: tuple[int, ...], padding: Padding, dilation: tuple[int, int]) -> bool:
    """Whether `_conv_shifted_vjp` serves this conv and beats XLA's own gradient on CPU."""
    kh, kw = kernel_shape[:2]
    # The input gradient below is a correlation padded by (k - 1) * d - p, which must not be negative.
    fits = all(0 <= lo and 0 <= hi and max(lo, hi) <= (k - 1) * d
               for (lo, hi), k, d in zip(padding, (kh, kw), dilation))
    return fits and (kh, kw) == (3, 3) and dilation in ((1, 1), (2, 2))


def _accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for bfloat16/float16 (and float32), float64 for float64.

    XLA:CPU converts low-precision convolution operands to float32 anyway, so accumulating in
    float32 costs nothing and keeps long bfloat16 sums (the weight gradient's N*H*W) accurate.
    """
    return jnp.promote_types(dtype, jnp.float32)


def _conv_f32(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: tuple[int, int]) -> jax.Array:
    """Stride-1 correlation accumulated in at least float32, returned in the dtype of `x`."""
    y = lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=padding, rhs_dilation=dilation,
            dimension_numbers=_DIMENSION_NUMBERS, preferred_element_type=_accumulation_dtype(x.dtype))
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_shifted_vjp(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: tuple[int, int]) -> jax.Array:
    """Stride-1 correlation whose weight gradient is one matmul per kernel tap."""
    return _conv_f32(x, kernel, padding, dilation)


def _conv_shifted_vjp_fwd(x, kernel, padding, dilation):
    return _conv_f32(x, kernel, padding, dilation), (x, kernel)


def _conv_shifted_vjp_bwd(padding, dilation, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    # Input gradient: the correlation of dy with the flipped, in/out-swapped kernel, padded so that
    # every input pixel sees every tap that touched it. This is a forward convolution, which
    # XLA:CPU runs at close to the matmul rate.
    back_padding = tuple(((k - 1) * d - lo, (k - 1) * d - hi)
                         for (lo, hi), k, d in zip(padding, (kh, kw), dilation))
    dx = _conv_f32(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), back_padding, dilation)
    # Weight gradient: tap (ky, kx) is x shifted by that tap's offset, contracted with dy over
    # (N, H, W), i.e. a [I, NHW] x [NHW, O] matmul; kh * kw of those replace XLA's lowering
    # (a convolution with an HxW window), which runs far below the matmul rate.
    x_padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h, out_w = dy.shape[1:3]
    taps = [
            jnp.einsum(
                    "nhwi,nhwo->io",
                    x_padded[:, ky * dilation[0]:ky * dilation[0] + out_h, kx * dilation[1]:kx * dilation[1] + out_w],
                    dy, preferred_element_type=_accumulation_dtype(x.dtype))
            for ky in range(kh) for kx in range(kw)]
    dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_conv_shifted_vjp.defvjp(_conv_shifted_vjp_fwd, _conv_shifted_vjp_bwd)


def _conv_transpose_by_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 4x4 stride-2 transposed convolution as one 2x2 convolution and a depth-to-space.

    Output pixel (2m + a, 2n + b) only sees taps ky = 3 - a - 2t, kx = 3 - b - 2s of the inputs
    (m - 1 + a + t, n - 1 + b + s), t, s in {0, 1}: each of the four output phases (a, b) is a 2x2
    correlation of the input padded by 1. Stacking the four phase kernels along the output
    channels makes this a single dense 2x2 convolution (no multiplications by the zeros that the
    dilated formulation inserts), evaluated on an (H+1) x (W+1) grid from which phase (a, b)
    takes the window starting at (a, b). Its gradients go through `_conv_shifted_vjp`.
    """
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    # flip(kernel)[2t + a] = kernel[3 - a - 2t]: phase kernels are strided views of the flipped one.
    phase_kernel = (jnp.flip(kernel, (0, 1)).reshape(2, 2, 2, 2, cin, cout)  # [t, a, s, b, I, O]
                    .transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, cin, 4 * cout))
    z = _conv_shifted_vjp(x, phase_kernel, ((1, 1), (1, 1)), (1, 1)).reshape(n, h + 1, w + 1, 2, 2, cout)
    phases = jnp.stack([jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3)
                        for a in range(2)], axis=2)  # [N, H, a, W, b, O]
    return phases.reshape(n, 2 * h, 2 * w, cout)
