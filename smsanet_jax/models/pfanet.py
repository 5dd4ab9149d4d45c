"""PFANet (Zhao & Wu, CVPR 2019), the saliency network behind the salient loss, in two weight layouts.

Variant "s" follows the PyTorch port (sairajk): eval-mode BatchNorm (eps 1e-5), a 3x3 high-level
conv, ImageNet mean/std input. Variant "k" follows the official Keras model: BatchNorm that always
normalises with batch statistics (eps 1e-3), a 1x1 high-level conv, Caffe-means input. Both return
the saliency probability; the logits and the channel-attention gates are sown as intermediates.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smsanet_jax.models import layers

VARIANTS = ("s", "k")
# The VGG16 trunk pools four times and C5 (H/16) is upsampled x4 onto C3 (H/4).
SIZE_MULTIPLE = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe's BGR means, subtracted from R, G, B in this order: the official Keras code does so and
# its weights expect it.
KERAS_CHANNEL_MEANS = (103.939, 116.779, 123.68)
# (block, convs, features) of VGG16; C1..C5 are the post-ReLU outputs of each block's last conv.
_VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
_CPFE_FEATURES = 32
_CPFE_DILATIONS = (3, 5, 7)
_SA_KERNEL = 9


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize with align_corners=True (torch / tf.compat.v1 semantics), differentiable.

    Output pixel i samples the input at i * (in - 1) / (out - 1), so the corner pixels of input and
    output coincide. `jax.image.resize` uses half-pixel centres instead, hence this helper.

    Args:
      x: [N, H, W, C] array.
      size: (out_h, out_w).

    Returns:
      [N, out_h, out_w, C] array of x's dtype.
    """
    out_h, out_w = size
    return _lerp_axis(_lerp_axis(x, 1, out_h), 2, out_w)


def _lerp_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    # The sampling grid depends only on static sizes, so it is built in numpy at trace time, in
    # float32 as torch and TensorFlow compute it (float64 moves some samples by ~1e-6 of a pixel).
    scale = np.float32((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    lo = np.minimum(np.floor(src).astype(np.int32), max(n_in - 2, 0))
    hi = np.minimum(lo + 1, n_in - 1)
    shape = [1] * x.ndim
    shape[axis] = n_out
    frac = jnp.asarray((src - lo).reshape(shape), x.dtype)
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    return a + (b - a) * frac


def _upsample(x: jax.Array, factor: int) -> jax.Array:
    return resize_bilinear_align_corners(x, (x.shape[1] * factor, x.shape[2] * factor))


class _BatchStatsNorm(nn.Module):
    """Keras BatchNormalization as the official PFANet calls it: always with batch statistics.

    The moving averages (Keras momentum 0.99) are kept so that weights round-trip, and updated only
    when training; the output never depends on them.
    """

    train: bool
    dtype: Any = jnp.float32
    epsilon: float = 1e-3
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=(0, 1, 2))
        var = x32.var(axis=(0, 1, 2))
        if self.train and not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def _norm_relu(variant: str, train: bool, dtype: Any, name: str, x: jax.Array) -> jax.Array:
    """BatchNorm (of the variant's kind) then ReLU, the pattern after every head conv."""
    if variant == "k":
        norm = _BatchStatsNorm(train, dtype, name=name)
    else:
        norm = layers.batch_norm(train, dtype, name=name)
    return nn.relu(norm(x))


class _VGG16Features(nn.Module):
    """VGG16 conv trunk (no pool5); returns the post-ReLU outputs C1..C5 of the five blocks."""

    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        features = []
        for block, n_convs, width in _VGG16_BLOCKS:
            if block > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i in range(1, n_convs + 1):
                x = nn.relu(layers.Conv(width, dtype=self.dtype, conv_impl=self.conv_impl, name=f"conv{block}_{i}")(x))
            features.append(x)
        return features


class _CPFE(nn.Module):
    """Context-aware pyramid feature extraction: 1x1 and dilated 3x3 convs, concat, BN, ReLU."""

    variant: str
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(
            layers.Conv, _CPFE_FEATURES, use_bias=False, dtype=self.dtype, conv_impl=self.conv_impl
        )
        branches = [conv(kernel_size=(1, 1), name="conv_1x1")(x)]
        branches += [conv(dilation=d, name=f"conv_dil{d}")(x) for d in _CPFE_DILATIONS]
        return _norm_relu(self.variant, train, self.dtype, "bn", jnp.concatenate(branches, axis=-1))


class _ChannelAttention(nn.Module):
    """SE-style gates: GAP -> Dense C/4 + ReLU -> Dense C + sigmoid. Returns (gated x, gates [N,C])."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        pooled = x.astype(jnp.float32).mean(axis=(1, 2))
        hidden = nn.relu(dense(c // 4, name="fc1")(pooled))
        gates = nn.sigmoid(dense(c, name="fc2")(hidden))
        return x * gates[:, None, None, :].astype(x.dtype), gates


class _SpatialAttention(nn.Module):
    """Two separable k x k branches ((1,k)->(k,1) and (k,1)->(1,k)), each conv + BN + ReLU; sigmoid(sum).

    Returns a [N,H,W,1] map that broadcasts over the channels it gates.
    """

    variant: str
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        row, col = (1, _SA_KERNEL), (_SA_KERNEL, 1)

        def branch(group: str, kernels: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
            y = x
            for i, (kernel, width) in enumerate(zip(kernels, (x.shape[-1] // 2, 1)), start=1):
                shape = "conv1k" if kernel == row else "convk1"
                y = layers.Conv(width, kernel, dtype=self.dtype, conv_impl=self.conv_impl, name=f"{group}_{shape}")(y)
                y = _norm_relu(self.variant, train, self.dtype, f"{group}_bn{i}", y)
            return y

        attention = branch("grp1", (row, col)) + branch("grp2", (col, row))
        return nn.sigmoid(attention)


class PFANet(nn.Module):
    """Pyramid Feature Attention Network; `apply(variables, x, train=False)` -> saliency probability.

    Input: [N,H,W,3] preprocessed by `preprocess` for the same variant, H and W multiples of 16.
    Output: [N,H,W,1] float32 probability. Sown under "intermediates": "logits" [N,H,W,1],
    "ca_gates" [N,384] and "ca_activity" (their mean: the PyTorch port's `ca_act_reg`, the Keras
    model's activity regulariser).
    With variant "k" every BatchNorm uses the statistics of the batch it is given, so an image's
    saliency depends on the rest of the batch, as in the official model (`saliency` runs it per image).

    Attributes:
      variant: "s" (PyTorch port, the default) or "k" (official Keras layout).
      dtype: compute dtype; parameters and BatchNorm statistics stay float32.
      conv_impl: convolution implementation, see `smsanet_jax.cpu.conv`.
    """

    variant: str = "s"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"PFANet variant must be one of {VARIANTS}, got {self.variant!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_input(x)
        kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        norm_relu = functools.partial(_norm_relu, self.variant, train, self.dtype)
        c1, c2, c3, c4, c5 = _VGG16Features(**kw, name="vgg16")(x)

        # High level: CPFE on C3..C5 at C3's resolution, channel attention, fuse, up to input size.
        high = jnp.concatenate(
            [
                _CPFE(self.variant, **kw, name="cpfe3")(c3, train),
                _upsample(_CPFE(self.variant, **kw, name="cpfe4")(c4, train), 2),
                _upsample(_CPFE(self.variant, **kw, name="cpfe5")(c5, train), 4),
            ],
            axis=-1,
        )
        high, gates = _ChannelAttention(self.dtype, name="channel_att")(high)
        self.sow("intermediates", "ca_gates", gates)
        self.sow("intermediates", "ca_activity", gates.mean())
        hl_kernel = (1, 1) if self.variant == "k" else (3, 3)
        high = norm_relu("hl_bn", layers.Conv(64, hl_kernel, **kw, name="hl_conv")(high))
        high = _upsample(high, 4)

        # Low level: C1 and C2 (upsampled) fused, then gated by spatial attention from the high level.
        low1 = norm_relu("ll_bn1", layers.Conv(64, **kw, name="ll_conv1")(c1))
        low2 = _upsample(norm_relu("ll_bn2", layers.Conv(64, **kw, name="ll_conv2")(c2)), 2)
        low = norm_relu("ll_bn3", layers.Conv(64, **kw, name="ll_conv3")(jnp.concatenate([low1, low2], axis=-1)))
        low = low * _SpatialAttention(self.variant, **kw, name="spatial_att")(high, train)

        # Both originals concatenate [low, high] here.
        logits = layers.Conv(1, **kw, name="out_conv")(jnp.concatenate([low, high], axis=-1))
        self.sow("intermediates", "logits", logits)
        return nn.sigmoid(logits.astype(jnp.float32))


def _check_input(x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"PFANet expects [N,H,W,3] images, got shape {x.shape}")
    if x.shape[1] % SIZE_MULTIPLE or x.shape[2] % SIZE_MULTIPLE:
        raise ValueError(f"PFANet needs H and W to be multiples of {SIZE_MULTIPLE}, got {x.shape[1]}x{x.shape[2]}")


def preprocess(rgb255: jax.Array, variant: str = "s") -> jax.Array:
    """Normalises float RGB in [0, 255] as the variant's weights expect.

    Args:
      rgb255: [..., 3] RGB values in [0, 255].
      variant: "s": /255 then ImageNet mean/std; "k": subtract the Caffe BGR means from R, G, B.

    Returns:
      float32 array of the same shape.

    Raises:
      ValueError: unknown variant.
    """
    x = jnp.asarray(rgb255, jnp.float32)
    if variant == "s":
        return (x / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if variant == "k":
        return x - jnp.asarray(KERAS_CHANNEL_MEANS)
    raise ValueError(f"PFANet variant must be one of {VARIANTS}, got {variant!r}")


@functools.partial(jax.jit, static_argnames=("variant", "size", "dtype", "conv_impl"))
def saliency(
    variables: Any,
    rgb255: jax.Array,
    *,
    variant: str = "s",
    size: int = 256,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
) -> jax.Array:
    """Saliency probability of RGB images of any size, PFANet run at size x size in inference mode.

    Resizing: images are resized straight to size x size (aspect ratio not kept) with bilinear
    interpolation, antialiased when shrinking, and the probability map is resized back to H x W
    with half-pixel bilinear interpolation, the exact inverse mapping. The originals differ
    slightly: the PyTorch port zero-pads to a square and uses cv2 INTER_AREA, the Keras demo pads to
    a square and uses INTER_LINEAR. Variant "k" runs each image on its own (batch statistics of that
    image alone, as the official demo predicts one image at a time), so results do not depend on
    the batch.

    Args:
      variables: PFANet variables ({"params", "batch_stats"}) of the same variant.
      rgb255: [N, H, W, 3] RGB in [0, 255], any H and W.
      variant: "s" or "k".
      size: side of the square PFANet input; a multiple of 16 (static).
      dtype: compute dtype.
      conv_impl: convolution implementation.

    Returns:
      [N, H, W, 1] float32 probability in [0, 1].
    """
    n, h, w, _ = rgb255.shape
    x = jax.image.resize(jnp.asarray(rgb255, jnp.float32), (n, size, size, 3), "bilinear", antialias=True)
    x = preprocess(x, variant)
    model = PFANet(variant, dtype, conv_impl)
    if variant == "k":
        prob = jax.vmap(lambda img: model.apply(variables, img[None])[0])(x)
    else:
        prob = model.apply(variables, x)
    prob = jax.image.resize(prob, (n, h, w, 1), "bilinear")
    return jnp.clip(prob, 0.0, 1.0)
