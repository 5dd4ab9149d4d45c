"""The fast path for convolutions on XLA:CPU (NHWC activations, HWIO kernels).

`models/layers.py` decides, per convolution, between these formulations and plain
`lax.conv_general_dilated` (`use_fast_path`, `fits_conv2d`); parameters and results are the same
either way. XLA:CPU runs forward convolutions near its matmul rate, but not everything autodiff
derives from them: the weight gradient of a 3x3 convolution lowers to a convolution with an
H x W window, which falls to a third of that rate on large images; the weight gradient of the
transposed (input-dilated) convolution takes 30-300x as long as its forward pass; and a 1x1
convolution takes a generic loop several times slower than the matmul it is. So the formulations
here write those gradients out (custom VJPs), and 3x3 and transposed convolutions with at least
64 input and output channels go further: Winograd (`winograd.py`), 2.25x fewer multiplications
than any direct form, in the forward pass and both gradients. Where nothing is differentiated, the
narrower of those take XLA's direct forward pass instead (`_conv3x3_wide`).

A run calls `prepare(conv_impl)` before its model's first trace: it builds the native Winograd
transforms (`native.py`) outside any trace and returns `describe(conv_impl)`, the path the run's
convolutions take, for its log.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax

from smsanet_jax.cpu import native, winograd

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# The `conv_impl` values: "auto" takes the fast path on the CPU backend and XLA's convolutions
# elsewhere (cuDNN on GPU).
IMPLS = ("auto", "xla", "cpu")

Padding = tuple[tuple[int, int], tuple[int, int]]


def use_fast_path(conv_impl: str) -> bool:
    """Whether convolutions take this module's formulations: `conv_impl` "cpu", or "auto" on the CPU backend.

    Raises:
        ValueError: for a name not in `IMPLS`.
    """
    if conv_impl not in IMPLS:
        raise ValueError(f"conv_impl: {conv_impl!r} is not one of {', '.join(IMPLS)}")
    return conv_impl == "cpu" or (conv_impl == "auto" and jax.default_backend() == "cpu")


def prepare(conv_impl: str) -> str:
    """Readies the convolutions of a run, outside any trace; logs and returns `describe(conv_impl)`.

    On the fast path on the CPU backend it builds (or loads from the cache) and registers the
    native Winograd transforms. Call it before the model's first trace: traces never build them,
    and one made before this keeps the XLA transforms.

    Raises:
        ValueError: for a `conv_impl` not in `IMPLS`.
        RuntimeError: when called inside a jit trace (before the library is loaded).
    """
    if use_fast_path(conv_impl) and jax.default_backend() == "cpu":
        native.prepare()
    description = describe(conv_impl)
    logging.info("convolutions: %s", description)
    return description


def describe(conv_impl: str) -> str:
    """The path that convolutions traced now take, in a few words, for a run's log and records.

    "xla" (`lax.conv_general_dilated`), "cpu+native" (this module's formulations with the C++
    Winograd transforms for float32) or "cpu (xla transforms: why)" ("SMSANET_NATIVE=0",
    "build failed: ...", "not prepared before tracing", or another backend's name).

    Raises:
        ValueError: for a `conv_impl` not in `IMPLS`.
    """
    if not use_fast_path(conv_impl):
        return "xla"
    backend = jax.default_backend()
    reason = native.unavailable_reason() if backend == "cpu" else f"the {backend} backend"
    return "cpu+native" if reason is None else f"cpu (xla transforms: {reason})"


def _formulation(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: tuple[int, int]) -> str | None:
    """Which of this module's formulations computes the convolution, or None for XLA's own."""
    (kh, kw), d = kernel.shape[:2], dilation[0]
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        return "matmul"
    if (kh, kw) == (3, 3) and dilation == (d, d) and padding == ((d, d), (d, d)) and winograd.fits(x, kernel):
        return "winograd"
    if _fits_shifted_vjp(kernel.shape, padding, dilation):
        return "shifted_vjp"
    return None


def fits_conv2d(x: jax.Array, kernel: jax.Array, padding: Padding, dilation: tuple[int, int] = (1, 1)) -> bool:
    """Whether `conv2d` serves this convolution: 1x1 unpadded, or 3x3 (dilation 1-2, or 'same' and wide).

    The others keep XLA's own convolution (see `_fits_shifted_vjp`).
    """
    return _formulation(x, kernel, _as_padding(padding), tuple(dilation)) is not None


def conv2d(x: jax.Array, kernel: jax.Array, *, padding: Padding, dilation: tuple[int, int] = (1, 1)) -> jax.Array:
    """Stride-1 cross-correlation, as torch.nn.Conv2d (without bias), for the convs `fits_conv2d` accepts.

    Args:
        x: [N, H, W, I] input.
        kernel: [kh, kw, I, O] kernel, same dtype as `x`.
        padding: ((top, bottom), (left, right)) zero padding.
        dilation: kernel dilation (dy, dx).

    Returns:
        [N, H', W', O] output in the dtype of `x`.

    Raises:
        ValueError: for a convolution `fits_conv2d` rejects.
    """
    padding, dilation = _as_padding(padding), tuple(dilation)
    formulation = _formulation(x, kernel, padding, dilation)
    if formulation == "matmul":
        return _conv1x1(x, kernel)
    if formulation == "winograd":
        return _conv3x3_wide(x, kernel, dilation[0])
    if formulation == "shifted_vjp":
        return _conv_shifted_vjp(x, kernel, padding, dilation)
    raise ValueError(
        f"no XLA:CPU formulation for a {kernel.shape[:2]} kernel with padding {padding} and dilation {dilation}: "
        "check fits_conv2d first"
    )


def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch.nn.ConvTranspose2d(kernel_size=4, stride=2, padding=1) without bias.

    Args:
        x: [N, H, W, I] input.
        kernel: [4, 4, I, O] kernel; `kernel[ky, kx, i, o]` equals torch's `weight[i, o, ky, kx]`.

    Returns:
        [N, 2H, 2W, O] output in the dtype of `x`.

    Raises:
        ValueError: if the kernel is not 4x4.
    """
    if kernel.shape[:2] != (4, 4):
        raise ValueError(f"conv_transpose_4x4_s2 needs a 4x4 kernel, got {kernel.shape}")
    if winograd.fits(x, kernel):
        return _conv_transpose_winograd(x, kernel)
    return _conv_transpose_by_phases(x, kernel)


def _as_padding(padding) -> Padding:
    """((top, bottom), (left, right)) as hashable tuples (a static argument of the jitted forms)."""
    return tuple(tuple(p) for p in padding)


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
    y = winograd.correlation(phases, kernel, winograd.F2X2_3X3, ((1, 1), (1, 1)))
    y = y.reshape(d, d, n, rows // d, cols // d, -1).transpose(2, 3, 0, 4, 1, 5).reshape(n, rows, cols, -1)
    return y[:, :h, :w]


# Without a gradient (inference, and PFANet inside the salient loss), Winograd's forward pass
# beats the direct one only when its transforms' memory traffic, which grows as 1/I + 1/O per
# multiplication, is small enough: I * O / (I + O) >= 48. Forward passes measured on XLA:CPU at
# batch 1 and 4 ("fwd" against "fwd (in grad)" in scripts/bench_ops.py): direct 1.2-1.6x faster
# for 64 -> 64 and 128 -> 64 at 128-256 px, a tie for 64 -> 128; Winograd 1.05-1.7x faster from
# 128 -> 128 up, and for PFANet's 384 -> 64. With a gradient, Winograd wins from 64 channels
# (`winograd.MIN_CHANNELS`).
_MIN_FORWARD_ONLY_REDUCED_WIDTH = 48


def _winograd_forward_pays(cin: int, cout: int) -> bool:
    return cin * cout >= _MIN_FORWARD_ONLY_REDUCED_WIDTH * (cin + cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_wide(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """'Same' 3x3 correlation of wide layers: Winograd when differentiated, else the faster forward pass.

    JAX evaluates this primal only where nothing is differentiated (a jit of the forward pass, or
    inputs under `stop_gradient`); under `grad` it takes `_conv3x3_wide_fwd` and the backward pass.
    """
    if _winograd_forward_pays(x.shape[-1], kernel.shape[-1]):
        return _conv3x3_winograd(x, kernel, dilation)
    return _conv_f32(x, kernel, ((dilation, dilation),) * 2, (dilation, dilation))


def _conv3x3_wide_fwd(x, kernel, dilation):
    return jax.vjp(lambda x, kernel: _conv3x3_winograd(x, kernel, dilation), x, kernel)


def _conv3x3_wide_bwd(dilation, vjp_fn, dy):
    return vjp_fn(dy)


_conv3x3_wide.defvjp(_conv3x3_wide_fwd, _conv3x3_wide_bwd)


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
    grid = winograd.correlation(x, _phase_kernel(kernel), winograd.F3X3_2X2, ((1, rows - h), (1, cols - w)))
    return _interleave_phases(grid[:, : h + 1, : w + 1])
