"""Convolution primitives shared by every network (NHWC activations, HWIO kernels).

Each op has two implementations with identical parameters and results:

- "xla": plain `lax.conv_general_dilated`, the path XLA lowers to cuDNN on GPU.
- "cpu": formulations tuned for XLA:CPU. Its forward convolutions run near the matmul rate, but
  not everything autodiff derives from them does: the weight gradient of a 3x3 convolution lowers
  to a convolution with an H x W window, which falls to a third of that rate on large images; the
  weight gradient of the transposed (input-dilated) convolution takes 30-300x as long as its
  forward pass; and a 1x1 convolution takes a generic loop several times slower than the matmul it is.
  3x3 convolutions with at least 64 input and output channels go further: Winograd F(2x2, 3x3),
  2.25x fewer multiplications than any direct form, in the forward pass and both gradients. The
  Winograd transforms of float32 tensors run as C++ custom calls (`native`) where they can be
  built; the XLA formulations here serve everything else and are the reference.

"auto" picks "cpu" on the CPU backend and "xla" elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from smsanet_jax import native

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
    if resolve_impl(impl) == "cpu":
        if kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
            return _conv1x1(x, kernel)
        d = dilation[0]
        if (
            kernel.shape[:2] == (3, 3)
            and dilation == (d, d)
            and padding == ((d, d), (d, d))
            and _fits_winograd(x, kernel)
        ):
            return _conv3x3_winograd(x, kernel, d)
        if _fits_shifted_vjp(kernel.shape, padding, dilation):
            return _conv_shifted_vjp(x, kernel, padding, dilation)
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding, rhs_dilation=dilation, dimension_numbers=_DIMENSION_NUMBERS
    )


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
        if _fits_winograd(x, kernel):
            return _conv_transpose_winograd(x, kernel)
        return _conv_transpose_by_phases(x, kernel)
    # A transposed convolution is a correlation of the 2x-dilated input, padded by k - 1 - p = 2,
    # with the spatially flipped kernel.
    return lax.conv_general_dilated(
        x,
        jnp.flip(kernel, (0, 1)),
        window_strides=(1, 1),
        padding=((2, 2), (2, 2)),
        lhs_dilation=(2, 2),
        dimension_numbers=_DIMENSION_NUMBERS,
    )


# ---------------------------------------------------------------------------------------------
# XLA:CPU formulations.


def _fits_shifted_vjp(kernel_shape: tuple[int, ...], padding: Padding, dilation: tuple[int, int]) -> bool:
    """Whether `_conv_shifted_vjp` serves this conv: BaseNet's 3x3 kernels, dilation 1 or 2.

    PFANet's and the attention modules' other kernels (1x9, 9x1, 7x7, dilation 3-7, mostly few
    output channels) measured no faster that way, so they keep XLA's own gradient.
    """
    kh, kw = kernel_shape[:2]
    # The input gradient is a correlation padded by (k - 1) * d - p, which must not be negative.
    fits = all(
        0 <= lo and 0 <= hi and max(lo, hi) <= (k - 1) * d for (lo, hi), k, d in zip(padding, (kh, kw), dilation)
    )
    return fits and (kh, kw) == (3, 3) and dilation in ((1, 1), (2, 2))


def _accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for bfloat16/float16 (and float32), float64 for float64.

    XLA:CPU converts low-precision convolution operands to float32 anyway, so accumulating in
    float32 costs nothing and keeps long bfloat16 sums (the weight gradient's N*H*W) accurate.
    """
    return jnp.promote_types(dtype, jnp.float32)


def _conv_f32(
    x: jax.Array,
    kernel: jax.Array,
    padding: Padding,
    dilation: tuple[int, int] = (1, 1),
    strides: tuple[int, int] = (1, 1),
) -> jax.Array:
    """Correlation accumulated in at least float32, returned in the dtype of `x`."""
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        preferred_element_type=_accumulation_dtype(x.dtype),
    )
    return y.astype(x.dtype)


@jax.jit
def _conv1x1(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 convolution as the [NHW, I] x [I, O] matmul it is.

    XLA:CPU lowers a 1x1 convolution to a generic convolution loop, several times (7x for
    BaseNet's 128 -> 2 output layer) slower than its matmul; autodiff of the matmul gives matmul
    gradients.
    """
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel[0, 0], preferred_element_type=_accumulation_dtype(x.dtype))
    return y.astype(x.dtype).reshape(*x.shape[:-1], kernel.shape[-1])


def _weight_grad(
    x: jax.Array, dy: jax.Array, kernel_size: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> jax.Array:
    """Gradient of a stride-1 correlation w.r.t. its [kh, kw, I, O] kernel, in the accumulation dtype.

    Tap (ky, kx) is x shifted by that tap's offset, contracted with dy over (N, H, W): one matmul
    per tap, which XLA:CPU runs near its matmul rate, where its own lowering of this gradient (a
    convolution with an H x W window) drops to a third of that on large images. The taps are a
    loop, so that one shifted copy of x is alive at a time rather than kh * kw of them.
    """
    (kh, kw), (dh, dw) = kernel_size, dilation
    n, out_h, out_w, cout = dy.shape
    cin = x.shape[-1]
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    accumulation = _accumulation_dtype(x.dtype)
    # XLA:CPU's matmul takes its left operand as [channels, NHW], so one side of each tap's
    # matmul is transposed. dW^T = dy^T x transposes dy, once, before the loop, and reads each
    # shifted x as it is: about 1.5x faster than x^T dy, which transposes every shifted x, unless
    # x has few channels (the 4-channel input layer).
    transpose_dy = cout <= kh * kw * cin
    dy = dy.reshape(-1, cout)
    dy_t = dy.T if transpose_dy else None

    def tap(index):
        shifted = lax.dynamic_slice(x, (0, index // kw * dh, index % kw * dw, 0), (n, out_h, out_w, cin))
        shifted = shifted.reshape(-1, cin)
        if transpose_dy:
            return jnp.matmul(dy_t, shifted, preferred_element_type=accumulation)
        return jnp.matmul(shifted.T, dy, preferred_element_type=accumulation)

    taps = lax.map(tap, jnp.arange(kh * kw))
    return (taps.swapaxes(1, 2) if transpose_dy else taps).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_shifted_vjp(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: tuple[int, int]) -> jax.Array:
    """Stride-1 correlation whose weight gradient is `_weight_grad`."""
    return _conv_f32(x, kernel, padding, dilation)


def _conv_shifted_vjp_fwd(x, kernel, padding, dilation):
    return _conv_shifted_vjp(x, kernel, padding, dilation), (x, kernel)


def _conv_shifted_vjp_bwd(padding, dilation, residuals, dy):
    x, kernel = residuals
    kernel_size = kernel.shape[:2]
    # Input gradient: dy correlated with the flipped, in/out-swapped kernel, padded so that every
    # input pixel meets every tap that touched it. It is a forward convolution, which XLA:CPU
    # runs about as fast as XLA's own input gradient.
    back_padding = tuple(((k - 1) * d - lo, (k - 1) * d - hi) for (lo, hi), k, d in zip(padding, kernel_size, dilation))
    dx = _conv_f32(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), back_padding, dilation)
    dkernel = _weight_grad(x, dy, kernel_size, padding, dilation).astype(kernel.dtype)
    return dx, dkernel


_conv_shifted_vjp.defvjp(_conv_shifted_vjp_fwd, _conv_shifted_vjp_bwd)
# Each formulation is jitted as a whole, so that eager calls (an un-jitted `Module.init`, say)
# compile one executable instead of one per primitive (20 s for a small BaseNet); an outer jit
# inlines it.
_conv_shifted_vjp = jax.jit(_conv_shifted_vjp, static_argnums=(2, 3))


# Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# 2016). F(m x m, r x r) computes each m x m output tile of a valid r x r correlation as
# A^T [(G g G^T) * (B^T d B)] A from its (m + r - 1)^2 input tile d and the kernel g. Over all
# tiles and channels the elementwise product is (m + r - 1)^2 matmuls [tiles, I] x [I, O]. The
# gradients are the adjoint: dy transformed once (A), two more sets of matmuls give the tiles' and
# the transformed kernel's gradients. The direct forms already run at the matmul peak, so the gain
# is the multiplications saved, less the transforms' memory traffic ((m + r - 1)^2 / m^2 times the
# activations, in each direction). The matrices come from Toom-Cook on the points 0, 1, -1 and
# infinity, whose transforms only add, subtract and halve: F(2x2, 3x3) (16 multiplications per
# 2x2 output tile instead of 36) is as close to float64 as XLA's direct convolutions (~5e-7
# relative). Larger tiles need a larger point (2 or 1/2), and their rounding differs between the
# pixels of a tile: F(3x3, 3x3) was 1.35-1.45x faster per layer and 2-8e-6 from float64 per op,
# but train-mode BN on near-constant channels magnified that into gradients 3% (median, against
# XLA's 0.04%) from float64 in the BaseNet step test; F(4x4, 3x3) is 1-2e-5 per op.
class _Winograd(NamedTuple):
    b_t: tuple[tuple[float, ...], ...]  # [m + r - 1, m + r - 1]
    g: tuple[tuple[float, ...], ...]  # [m + r - 1, r]
    a_t: tuple[tuple[float, ...], ...]  # [m, m + r - 1]


_F2X2_3X3 = _Winograd(
    b_t=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    g=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    a_t=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# For the transposed convolution's 2x2 kernels, from the same points: 16 multiplications per 3x3
# output tile instead of 36.
_F3X3_2X2 = _Winograd(
    b_t=((-1, 0, 1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, -1, 0, 1)),
    g=((-1, 0), (0.5, 0.5), (0.5, -0.5), (0, 1)),
    a_t=((1, 1, 1, 0), (0, 1, -1, 0), (0, 1, 1, 1)),
)
# Below this many input or output channels the transforms' memory traffic outweighs the saved
# multiplications on XLA:CPU (fwd + bwd, batch 1, against the direct forms: BaseNet's 3x3
# layers 1.1-1.8x faster, the 4 -> 64 input layer 2.6x and a 512 -> 32 one 1.2x slower).
_WINOGRAD_MIN_CHANNELS = 64


def _fits_winograd(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether Winograd serves a conv of this kernel's shape on `x`: wide, float32 or float64."""
    return min(kernel.shape[2:]) >= _WINOGRAD_MIN_CHANNELS and x.dtype in (jnp.float32, jnp.float64)


def _combine(matrix, terms: list[jax.Array], axis: int) -> jax.Array:
    """jnp.stack([sum_i M[a][i] terms[i] for each row a of M], axis) for a small constant matrix M.

    Written out term by term (the matrices hold 0, +-1 and +-0.5) rather than as a dot, so that XLA
    fuses the whole stack into one elementwise loop. The 2-D transforms apply this along rows,
    then along columns: m + r - 1 terms per fusion, where a one-pass transform's (m + r - 1)^2 end
    up as as many fusions and a copy.
    """
    rows = []
    for coefficients in matrix:
        total = None
        for weight, term in zip(coefficients, terms):
            if weight:
                term = term if weight == 1 else -term if weight == -1 else weight * term
                total = term if total is None else total + term
        rows.append(total)
    return jnp.stack(rows, axis)


def _transposed(matrix):
    return tuple(zip(*matrix))


def _native_transforms(array: jax.Array) -> bool:
    """Whether this array's transforms go to the C++ kernels (`native`): float32 on XLA:CPU."""
    return array.dtype == jnp.float32 and jax.default_backend() == "cpu" and native.available()


# The transformed planes are ordered (column, row) of the tile: plane (m + r - 1) * c + row.
def _winograd_input_tiles(x: jax.Array, algorithm: _Winograd, padding: Padding) -> jax.Array:
    """[N, H, W, I] -> [tile planes, tiles, I]: B^T d B of every tile of x zero-padded by `padding`.

    The output, (H + padding - r + 1) x (W + padding - r + 1), must be a whole number of m x m tiles.
    """
    step, size = len(algorithm.a_t), len(algorithm.b_t)
    if _native_transforms(x):
        return native.windows_to_planes(x, algorithm.b_t, size, step, padding)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h, out_w = (x.shape[i] - len(algorithm.g[0]) + 1 for i in (1, 2))
    # Tile (p, q) starts at pixel (step * p, step * q).
    rows = _combine(algorithm.b_t, [x[:, i : i + out_h : step] for i in range(size)], 0)  # [row, N, tiles, W, I]
    tiles = _combine(algorithm.b_t, [rows[:, :, :, j : j + out_w : step] for j in range(size)], 0)
    return tiles.reshape(size * size, -1, x.shape[-1])


def _overlap_add(parts: list[jax.Array], axis: int, step: int, length: int) -> jax.Array:
    """Sums tile-sized pieces back onto pixels: out[step * q + j] += parts[j][q] along `axis`.

    Tiles start every `step` pixels, so piece j = step * s + t lands on pixel phase t, shifted by
    s tiles: per phase, a sum of padded pieces; the phases interleave into `length` pixels.
    """
    shifts = (len(parts) - 1) // step
    phases = []
    for t in range(step):
        total = None
        for s in range(shifts + 1):
            if step * s + t < len(parts):
                padding = [(0, 0)] * parts[0].ndim
                padding[axis] = (s, shifts - s)
                term = jnp.pad(parts[step * s + t], padding)
                total = term if total is None else total + term
        phases.append(total)
    interleaved = jnp.stack(phases, axis + 1)
    shape = list(parts[0].shape)
    shape[axis] = (shape[axis] + shifts) * step
    return lax.slice_in_dim(interleaved.reshape(shape), 0, length, axis=axis)


def _winograd_input_adjoint(
    dtiles: jax.Array, x_shape: tuple[int, ...], algorithm: _Winograd, padding: Padding
) -> jax.Array:
    """The adjoint of `_winograd_input_tiles`: [tile planes, tiles, I] -> [N, H, W, I].

    Written out (B d B^T per tile, then overlapping tiles summed and the padding cropped) because
    the transpose autodiff derives, strided pads and adds, ran 2-5x as long.
    """
    step, size, b = len(algorithm.a_t), len(algorithm.b_t), _transposed(algorithm.b_t)
    if _native_transforms(dtiles):
        return native.planes_to_pixels(dtiles, b, size, step, x_shape, padding)
    (top, bottom), (left, right) = padding
    n, h, w, cin = x_shape[0], x_shape[1] + top + bottom, x_shape[2] + left + right, x_shape[3]
    r = len(algorithm.g[0])
    dtiles = dtiles.reshape(size, size, n, (h - r + 1) // step, (w - r + 1) // step, cin)  # [column, row, ...]
    columns = _combine(b, [dtiles[c] for c in range(size)], 0)  # [column pixel, row, N, H/m, W/m, I]
    rows = _overlap_add([columns[j] for j in range(size)], 3, step, w)  # [row, N, H/m, W, I]
    pixels = _combine(b, [rows[i] for i in range(size)], 0)  # [row pixel, N, H/m, W, I]
    dx = _overlap_add([pixels[i] for i in range(size)], 1, step, h)
    return dx[:, top : h - bottom, left : w - right]


def _winograd_kernel_tiles(kernel: jax.Array, algorithm: _Winograd) -> jax.Array:
    """[r, r, I, O] -> [tile planes, I, O]: G g G^T."""
    r = len(algorithm.g[0])
    if _native_transforms(kernel):  # As an image of one r x r window with I * O channels.
        planes = native.windows_to_planes(kernel.reshape(1, r, r, -1), algorithm.g, r, r)
        return planes.reshape(-1, *kernel.shape[2:])
    rows = _combine(algorithm.g, [kernel[i] for i in range(r)], 0)  # [row, r, I, O]
    return _combine(algorithm.g, [rows[:, j] for j in range(r)], 0).reshape(-1, *kernel.shape[2:])


def _winograd_kernel_adjoint(dkernel_tiles: jax.Array, algorithm: _Winograd) -> jax.Array:
    """The adjoint of `_winograd_kernel_tiles`: [tile planes, I, O] -> [r, r, I, O]."""
    size, r, g = len(algorithm.b_t), len(algorithm.g[0]), _transposed(algorithm.g)
    if _native_transforms(dkernel_tiles):
        cin, cout = dkernel_tiles.shape[1:]
        pixels = native.planes_to_pixels(dkernel_tiles.reshape(size * size, 1, -1), g, r, r, (1, r, r, cin * cout))
        return pixels.reshape(r, r, cin, cout)
    dkernel_tiles = dkernel_tiles.reshape(size, size, *dkernel_tiles.shape[1:])  # [column, row, I, O]
    rows = _combine(g, [dkernel_tiles[:, i] for i in range(size)], 0)  # [r rows, column, I, O]
    return _combine(g, [rows[:, j] for j in range(size)], 1)


def _winograd_output(products: jax.Array, out_shape: tuple[int, int, int], algorithm: _Winograd) -> jax.Array:
    """[tile planes, tiles, O] -> [N, H', W', O] (`out_shape` = (N, H', W')): A^T m A, tiles in place."""
    (n, h, w), step, size = out_shape, len(algorithm.a_t), len(algorithm.b_t)
    if _native_transforms(products):
        return native.planes_to_pixels(products, algorithm.a_t, step, step, (n, h, w, products.shape[-1]))
    products = products.reshape(size, size, n, h // step, w // step, -1)  # [column, row, N, ...]
    rows = _combine(algorithm.a_t, [products[:, i] for i in range(size)], 3)  # [column, N, H'/m, m, W'/m, O]
    y = _combine(algorithm.a_t, [rows[j] for j in range(size)], 4)  # [N, H'/m, m, W'/m, m, O]
    return y.reshape(n, h, w, -1)


def _winograd_output_adjoint(dy: jax.Array, algorithm: _Winograd) -> jax.Array:
    """The adjoint of `_winograd_output`: [N, H', W', O] -> [tile planes, tiles, O], A dy A^T per tile."""
    step, a = len(algorithm.a_t), _transposed(algorithm.a_t)
    if _native_transforms(dy):
        return native.windows_to_planes(dy, a, step, step)
    rows = _combine(a, [dy[:, i::step] for i in range(step)], 0)  # [row, N, H'/m, W', O]
    tiles = _combine(a, [rows[:, :, :, j::step] for j in range(step)], 0)
    return tiles.reshape(len(a) ** 2, -1, dy.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_correlation(x: jax.Array, kernel: jax.Array, algorithm: _Winograd, padding: Padding) -> jax.Array:
    """r x r correlation of [N, H, W, I] zero-padded by `padding`; its output is whole m x m tiles."""
    return _winograd_correlation_fwd(x, kernel, algorithm, padding)[0]


def _winograd_correlation_fwd(x, kernel, algorithm, padding):
    tiles = _winograd_input_tiles(x, algorithm, padding)
    kernel_tiles = _winograd_kernel_tiles(kernel, algorithm)
    out_shape = (x.shape[0], *(x.shape[i] + sum(padding[i - 1]) - kernel.shape[0] + 1 for i in (1, 2)))
    y = _winograd_output(jnp.matmul(tiles, kernel_tiles, preferred_element_type=x.dtype), out_shape, algorithm)
    return y, (tiles, kernel_tiles)


def _winograd_correlation_bwd(algorithm, padding, residuals, dy):
    tiles, kernel_tiles = residuals
    dproducts = _winograd_output_adjoint(dy, algorithm)
    dtiles = jnp.einsum("tpo,tio->tpi", dproducts, kernel_tiles, preferred_element_type=dy.dtype)
    r = len(algorithm.g[0])
    x_shape = (dy.shape[0], *(dy.shape[i] + r - 1 - sum(padding[i - 1]) for i in (1, 2)), tiles.shape[-1])
    dx = _winograd_input_adjoint(dtiles, x_shape, algorithm, padding)
    dkernel_tiles = jnp.einsum("tpi,tpo->tio", tiles, dproducts, preferred_element_type=dy.dtype)
    return dx, _winograd_kernel_adjoint(dkernel_tiles, algorithm)


_winograd_correlation.defvjp(_winograd_correlation_fwd, _winograd_correlation_bwd)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@functools.partial(jax.jit, static_argnums=2)
def _conv3x3_winograd(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """'Same' 3x3 correlation with dilation d by F(2x2, 3x3) on the d x d pixel phases.

    With dilation d, pixels whose coordinates agree modulo d only meet each other: each of the
    d * d phases is an undilated convolution. Zero rows and columns appended up to a multiple of
    2d are the convolution's own zero padding, so cropping them leaves the exact result.
    """
    n, h, w, cin = x.shape
    d = dilation
    rows, cols = _round_up(h, 2 * d), _round_up(w, 2 * d)
    x = jnp.pad(x, ((0, 0), (0, rows - h), (0, cols - w), (0, 0)))
    phases = (
        x.reshape(n, rows // d, d, cols // d, d, cin)
        .transpose(2, 4, 0, 1, 3, 5)
        .reshape(d * d * n, rows // d, cols // d, cin)
    )
    y = _winograd_correlation(phases, kernel, _F2X2_3X3, ((1, 1), (1, 1)))
    y = y.reshape(d, d, n, rows // d, cols // d, -1).transpose(2, 3, 0, 4, 1, 5).reshape(n, rows, cols, -1)
    return y[:, :h, :w]


# The 4x4 stride-2 transposed convolution by output phases. Output pixel (2m + a, 2n + b) only
# meets taps ky = 3 - a - 2t, kx = 3 - b - 2s of inputs (m - 1 + a + t, n - 1 + b + s), t, s in
# {0, 1}: each of the four phases (a, b) is a 2x2 correlation of the input padded by 1. With the
# four phase kernels side by side along the output channels this is one dense 2x2 convolution
# (none of the multiplications by zero that the input-dilated formulation makes), evaluated on an
# (H+1) x (W+1) grid from which phase (a, b) takes the H x W window starting at (a, b).
_PHASE_PADDING = ((1, 1), (1, 1))


def _phase_kernel(kernel: jax.Array) -> jax.Array:
    """[4, 4, I, O] -> [2, 2, I, 4 * O] (t, s, I, (a, b, O)), a permutation of the kernel."""
    cin, cout = kernel.shape[2:]
    # flip(kernel)[2t + a] = kernel[3 - a - 2t].
    return (
        jnp.flip(kernel, (0, 1))
        .reshape(2, 2, 2, 2, cin, cout)  # [t, a, s, b, I, O]
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(2, 2, cin, 4 * cout)
    )


def _interleave_phases(z: jax.Array) -> jax.Array:
    """[N, H+1, W+1, 4 * O] phase grid -> [N, 2H, 2W, O] output (a depth-to-space with offsets)."""
    n, h, w = z.shape[0], z.shape[1] - 1, z.shape[2] - 1
    z = z.reshape(n, h + 1, w + 1, 2, 2, -1)
    phases = jnp.stack(
        [jnp.stack([z[:, a : a + h, b : b + w, a, b] for b in range(2)], axis=3) for a in range(2)], axis=2
    )  # [N, H, a, W, b, O]
    return phases.reshape(n, 2 * h, 2 * w, -1)


@jax.custom_vjp
def _conv_transpose_by_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_transpose_4x4_s2` as a 2x2 convolution over phases and an interleave."""
    return _interleave_phases(_conv_f32(x, _phase_kernel(kernel), _PHASE_PADDING))


def _conv_transpose_by_phases_fwd(x, kernel):
    return _conv_transpose_by_phases(x, kernel), (x, kernel)


def _conv_transpose_by_phases_bwd(residuals, dy):
    x, kernel = residuals
    n, h, w, _ = x.shape
    # Input gradient: the 4x4 stride-2 correlation of dy with the kernel (in/out swapped), a plain
    # strided forward convolution for XLA:CPU.
    dx = _conv_f32(dy, kernel.swapaxes(2, 3), _PHASE_PADDING, strides=(2, 2))
    # Weight gradient: through the phase formulation, whose pieces are permutations (their
    # transposes map the gradients back) around a 2x2 correlation (`_weight_grad`).
    phase_grid = jax.ShapeDtypeStruct((n, h + 1, w + 1, 4 * kernel.shape[-1]), dy.dtype)
    (dz,) = jax.linear_transpose(_interleave_phases, phase_grid)(dy)
    dphase_kernel = _weight_grad(x, dz, (2, 2), _PHASE_PADDING, (1, 1)).astype(kernel.dtype)
    (dkernel,) = jax.linear_transpose(_phase_kernel, kernel)(dphase_kernel)
    return dx, dkernel


_conv_transpose_by_phases.defvjp(_conv_transpose_by_phases_fwd, _conv_transpose_by_phases_bwd)
_conv_transpose_by_phases = jax.jit(_conv_transpose_by_phases)


@jax.jit
def _conv_transpose_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_transpose_4x4_s2` as the phase grid's 2x2 correlation by F(3x3, 2x2), and an interleave.

    The (H+1) x (W+1) grid is computed on the next multiple of 3 (with zero rows and columns of
    input appended) and cropped.
    """
    n, h, w, _ = x.shape
    rows, cols = _round_up(h + 1, 3), _round_up(w + 1, 3)
    grid = _winograd_correlation(x, _phase_kernel(kernel), _F3X3_2X2, ((1, rows - h), (1, cols - w)))
    return _interleave_phases(grid[:, : h + 1, : w + 1])
