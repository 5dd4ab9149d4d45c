"""Winograd's minimal filtering: r x r correlations in fewer multiplications, for XLA:CPU.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). F(m x m, r x r)
computes each m x m output tile of a valid r x r correlation as A^T [(G g G^T) * (B^T d B)] A
from its (m + r - 1)^2 input tile d and the kernel g. Over all tiles and channels the elementwise
product is (m + r - 1)^2 matmuls [tiles, I] x [I, O]. The gradients are the adjoint: dy
transformed once (A), two more sets of matmuls give the tiles' and the transformed kernel's
gradients. The direct forms already run at the matmul peak, so the gain is the multiplications
saved, less the transforms' memory traffic ((m + r - 1)^2 / m^2 times the activations, in each
direction).

The matrices come from Toom-Cook on the points 0, 1, -1 and infinity, whose transforms only add,
subtract and halve: F(2x2, 3x3) (16 multiplications per 2x2 output tile instead of 36) is as
close to float64 as XLA's direct convolutions (~5e-7 relative). Larger tiles need a larger point
(2 or 1/2), and their rounding differs between the pixels of a tile: F(3x3, 3x3) was 1.35-1.45x
faster per layer and 2-8e-6 from float64 per op, but train-mode BN on near-constant channels
magnified that into gradients 3% (median, against XLA's 0.04%) from float64 in the BaseNet step
test; F(4x4, 3x3) is 1-2e-5 per op.

`correlation` is the entry point (`conv.py` maps convolutions onto it). The transforms of float32
tensors on XLA:CPU run as the C++ kernels of `native` once `native.prepare()` has loaded them; the
XLA formulations here serve everything else and are their reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from smsanet_jax.cpu import native

Padding = tuple[tuple[int, int], tuple[int, int]]


class Algorithm(NamedTuple):
    """The matrices of one F(m x m, r x r)."""

    b_t: tuple[tuple[float, ...], ...]  # [m + r - 1, m + r - 1]
    g: tuple[tuple[float, ...], ...]  # [m + r - 1, r]
    a_t: tuple[tuple[float, ...], ...]  # [m, m + r - 1]


F2X2_3X3 = Algorithm(
    b_t=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    g=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    a_t=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# For the transposed convolution's 2x2 kernels, from the same points: 16 multiplications per 3x3
# output tile instead of 36.
F3X3_2X2 = Algorithm(
    b_t=((-1, 0, 1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, -1, 0, 1)),
    g=((-1, 0), (0.5, 0.5), (0.5, -0.5), (0, 1)),
    a_t=((1, 1, 1, 0), (0, 1, -1, 0), (0, 1, 1, 1)),
)
# Below this many input or output channels the transforms' memory traffic outweighs the saved
# multiplications on XLA:CPU (fwd + bwd, batch 1, against the direct forms: BaseNet's 3x3
# layers 1.1-1.8x faster, the 4 -> 64 input layer 2.6x and a 512 -> 32 one 1.2x slower).
MIN_CHANNELS = 64


def fits(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether Winograd serves a conv of this kernel's shape on `x`: wide, float32 or float64."""
    return min(kernel.shape[2:]) >= MIN_CHANNELS and x.dtype in (jnp.float32, jnp.float64)


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
    """Whether this array's transforms go to the C++ kernels: float32 on XLA:CPU, once prepared.

    `native.available()` only reads whether `native.prepare()` loaded the library: a trace never
    builds it.
    """
    return array.dtype == jnp.float32 and jax.default_backend() == "cpu" and native.available()


# The transformed planes are ordered (column, row) of the tile: plane (m + r - 1) * c + row.
def _input_tiles(x: jax.Array, algorithm: Algorithm, padding: Padding) -> jax.Array:
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


def _input_adjoint(dtiles: jax.Array, x_shape: tuple[int, ...], algorithm: Algorithm, padding: Padding) -> jax.Array:
    """The adjoint of `_input_tiles`: [tile planes, tiles, I] -> [N, H, W, I].

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


def _kernel_tiles(kernel: jax.Array, algorithm: Algorithm) -> jax.Array:
    """[r, r, I, O] -> [tile planes, I, O]: G g G^T."""
    r = len(algorithm.g[0])
    if _native_transforms(kernel):  # As an image of one r x r window with I * O channels.
        planes = native.windows_to_planes(kernel.reshape(1, r, r, -1), algorithm.g, r, r)
        return planes.reshape(-1, *kernel.shape[2:])
    rows = _combine(algorithm.g, [kernel[i] for i in range(r)], 0)  # [row, r, I, O]
    return _combine(algorithm.g, [rows[:, j] for j in range(r)], 0).reshape(-1, *kernel.shape[2:])


def _kernel_adjoint(dkernel_tiles: jax.Array, algorithm: Algorithm) -> jax.Array:
    """The adjoint of `_kernel_tiles`: [tile planes, I, O] -> [r, r, I, O]."""
    size, r, g = len(algorithm.b_t), len(algorithm.g[0]), _transposed(algorithm.g)
    if _native_transforms(dkernel_tiles):
        cin, cout = dkernel_tiles.shape[1:]
        pixels = native.planes_to_pixels(dkernel_tiles.reshape(size * size, 1, -1), g, r, r, (1, r, r, cin * cout))
        return pixels.reshape(r, r, cin, cout)
    dkernel_tiles = dkernel_tiles.reshape(size, size, *dkernel_tiles.shape[1:])  # [column, row, I, O]
    rows = _combine(g, [dkernel_tiles[:, i] for i in range(size)], 0)  # [r rows, column, I, O]
    return _combine(g, [rows[:, j] for j in range(size)], 1)


def _output(products: jax.Array, out_shape: tuple[int, int, int], algorithm: Algorithm) -> jax.Array:
    """[tile planes, tiles, O] -> [N, H', W', O] (`out_shape` = (N, H', W')): A^T m A, tiles in place."""
    (n, h, w), step, size = out_shape, len(algorithm.a_t), len(algorithm.b_t)
    if _native_transforms(products):
        return native.planes_to_pixels(products, algorithm.a_t, step, step, (n, h, w, products.shape[-1]))
    products = products.reshape(size, size, n, h // step, w // step, -1)  # [column, row, N, ...]
    rows = _combine(algorithm.a_t, [products[:, i] for i in range(size)], 3)  # [column, N, H'/m, m, W'/m, O]
    y = _combine(algorithm.a_t, [rows[j] for j in range(size)], 4)  # [N, H'/m, m, W'/m, m, O]
    return y.reshape(n, h, w, -1)


def _output_adjoint(dy: jax.Array, algorithm: Algorithm) -> jax.Array:
    """The adjoint of `_output`: [N, H', W', O] -> [tile planes, tiles, O], A dy A^T per tile."""
    step, a = len(algorithm.a_t), _transposed(algorithm.a_t)
    if _native_transforms(dy):
        return native.windows_to_planes(dy, a, step, step)
    rows = _combine(a, [dy[:, i::step] for i in range(step)], 0)  # [row, N, H'/m, W', O]
    tiles = _combine(a, [rows[:, :, :, j::step] for j in range(step)], 0)
    return tiles.reshape(len(a) ** 2, -1, dy.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def correlation(x: jax.Array, kernel: jax.Array, algorithm: Algorithm, padding: Padding) -> jax.Array:
    """r x r correlation of [N, H, W, I] zero-padded by `padding`; its output is whole m x m tiles."""
    return _correlation_fwd(x, kernel, algorithm, padding)[0]


def _correlation_fwd(x, kernel, algorithm, padding):
    tiles = _input_tiles(x, algorithm, padding)
    kernel_tiles = _kernel_tiles(kernel, algorithm)
    out_shape = (x.shape[0], *(x.shape[i] + sum(padding[i - 1]) - kernel.shape[0] + 1 for i in (1, 2)))
    y = _output(jnp.matmul(tiles, kernel_tiles, preferred_element_type=x.dtype), out_shape, algorithm)
    return y, (tiles, kernel_tiles)


def _correlation_bwd(algorithm, padding, residuals, dy):
    tiles, kernel_tiles = residuals
    dproducts = _output_adjoint(dy, algorithm)
    dtiles = jnp.einsum("tpo,tio->tpi", dproducts, kernel_tiles, preferred_element_type=dy.dtype)
    r = len(algorithm.g[0])
    x_shape = (dy.shape[0], *(dy.shape[i] + r - 1 - sum(padding[i - 1]) for i in (1, 2)), tiles.shape[-1])
    dx = _input_adjoint(dtiles, x_shape, algorithm, padding)
    dkernel_tiles = jnp.einsum("tpi,tpo->tio", tiles, dproducts, preferred_element_type=dy.dtype)
    return dx, _kernel_adjoint(dkernel_tiles, algorithm)


correlation.defvjp(_correlation_fwd, _correlation_bwd)
