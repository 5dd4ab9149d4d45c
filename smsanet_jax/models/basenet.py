"""SIGGRAPH17 colorization generator (Zhang et al. 2017), the BaseNet of SMSANet, in NHWC."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from smsanet_jax import colorspace
from smsanet_jax.models import attention as attention_lib
from smsanet_jax.models import layers

BLOCK_NAMES = tuple(f"model{i}" for i in range(1, 11))
ATTENTIONS = ("none", "smsa", "cbam", "se")
# Three 2x subsamplings are undone by three 2x up-samplings, so H and W must divide by 2^3.
SIZE_MULTIPLE = 8


def model_input(l: jax.Array, ab_hint: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Builds the 4-channel input [(L-50)/100, a_hint/110, b_hint/110, mask].

    The network normalises inside, as the released `colorizers` model does.

    Args:
      l: lightness in [0, 100], [N,H,W,1].
      ab_hint: raw ab hints [N,H,W,2]; zeros (no hints) when None.
      mask: hint mask [N,H,W,1] (1 where a hint is given); zeros when None.

    Returns:
      [N,H,W,4] float32.

    Raises:
      ValueError: on a wrongly shaped input, or H or W not divisible by 8.
    """
    l = jnp.asarray(l, jnp.float32)
    if l.ndim != 4 or l.shape[-1] != 1:
        raise ValueError(f"BaseNet expects L of shape [N,H,W,1], got {tuple(l.shape)}")
    if l.shape[1] % SIZE_MULTIPLE or l.shape[2] % SIZE_MULTIPLE:
        raise ValueError(
            f"BaseNet needs an input height and width divisible by {SIZE_MULTIPLE}; got L of shape {tuple(l.shape)}"
        )
    ab_hint = jnp.zeros(l.shape[:-1] + (2,)) if ab_hint is None else jnp.asarray(ab_hint, jnp.float32)
    mask = jnp.zeros_like(l) if mask is None else jnp.asarray(mask, jnp.float32)
    for name, value, channels in (("ab_hint", ab_hint, 2), ("mask", mask, 1)):
        if value.shape != l.shape[:-1] + (channels,):
            raise ValueError(f"{name} must have shape {l.shape[:-1] + (channels,)} to match L, got {value.shape}")
    return jnp.concatenate([colorspace.normalize_l(l), colorspace.normalize_ab(ab_hint), mask], -1)


def _subsample(x: jax.Array) -> jax.Array:
    """SIGGRAPH17 halves resolution by keeping even rows and columns (no pooling)."""
    return x[:, ::2, ::2, :]


class ConvBlock(nn.Module):
    """One SIGGRAPH17 `modelK` block: (conv3x3 -> ReLU) x num_convs -> BN.

    Children are named after their torch Sequential index (`conv0`, `conv2`, `bn4`; a decoder block,
    whose index 0 is a ReLU on the merged input, has `conv1`, `conv3`, `bn5`), so the converter
    table maps `model1.2` to `model1/conv2`.
    """

    features: int
    num_convs: int
    dilation: int = 1
    decoder: bool = False  # Starts with a ReLU on the (upsampled + shortcut) sum.
    final: bool = False  # model10: LeakyReLU(0.2) instead of ReLU, and no BN.
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        index = 0
        if self.decoder:
            x = nn.relu(x)
            index = 1
        for _ in range(self.num_convs):
            x = layers.Conv(
                self.features, dilation=self.dilation, dtype=self.dtype, conv_impl=self.conv_impl, name=f"conv{index}"
            )(x)
            x = nn.leaky_relu(x, 0.2) if self.final else nn.relu(x)
            index += 2
        if not self.final:
            x = layers.batch_norm(train, self.dtype, name=f"bn{index}")(x)
        return x


class BaseNet(nn.Module):
    """SIGGRAPH17 generator, regression head only, with optional attention after chosen blocks.

    Module names follow the torch model (`model1` ... `model10`, `model8up`, `model3short8`,
    `model9up`, `model2short9`, `model10up`, `model1short10`, `model_out`). The classification head
    `model_class` is never computed and has no params here; the converter drops it on import.
    Attention modules are named `attention_<block>` and refine that block's output (after its BN),
    so a network with attention has BaseNet's params plus those, under identical paths.

    Attributes:
      width: base channel count w; blocks have w, 2w, 4w, 8w (x4: model4-7), 4w, 2w, 2w channels.
        64 is the released SIGGRAPH17 network.
      attention: "none", "smsa", "cbam" or "se".
      blocks: names of the blocks (model1..model10) whose outputs the attention refines.
      n_scales: SMSA's n (n-1 spatial scales plus the channel scale).
      reduction: channel-MLP reduction ratio r of SMSA, CBAM and SE.
      dtype: compute dtype; params stay float32 and the returned ab is float32.
      conv_impl: convolution implementation, see `smsanet_jax.cpu.conv`.
    """

    width: int = 64
    attention: str = "none"
    blocks: tuple[str, ...] = ("model5", "model6", "model7")
    n_scales: int = 4
    reduction: int = 16
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        l: jax.Array,
        ab_hint: jax.Array | None = None,
        mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Colorizes lightness.

        Args:
          l: L in [0, 100], [N,H,W,1], H and W divisible by 8.
          ab_hint: raw ab point hints [N,H,W,2]; zeros (automatic colorization) when None.
          mask: [N,H,W,1], 1 where a hint is given; zeros when None.
          train: use batch statistics in BN (and update `batch_stats`, which must be mutable).

        Returns:
          raw ab [N,H,W,2] in (-110, 110), float32.

        Raises:
          ValueError: on a bad input shape or an unknown attention type or block name.
        """
        self._check_attention()
        w = self.width
        x = model_input(l, ab_hint, mask)
        conv1 = self._block("model1", x, train, w, 2)
        conv2 = self._block("model2", _subsample(conv1), train, 2 * w, 2)
        conv3 = self._block("model3", _subsample(conv2), train, 4 * w, 3)
        conv4 = self._block("model4", _subsample(conv3), train, 8 * w, 3)
        conv5 = self._block("model5", conv4, train, 8 * w, 3, dilation=2)
        conv6 = self._block("model6", conv5, train, 8 * w, 3, dilation=2)
        conv7 = self._block("model7", conv6, train, 8 * w, 3)
        merged = self._up("model8up", conv7, 4 * w) + self._conv("model3short8", conv3, 4 * w)
        conv8 = self._block("model8", merged, train, 4 * w, 2, decoder=True)
        merged = self._up("model9up", conv8, 2 * w) + self._conv("model2short9", conv2, 2 * w)
        conv9 = self._block("model9", merged, train, 2 * w, 1, decoder=True)
        merged = self._up("model10up", conv9, 2 * w) + self._conv("model1short10", conv1, 2 * w)
        conv10 = self._block("model10", merged, train, 2 * w, 1, decoder=True, final=True)
        out = layers.Conv(2, (1, 1), dtype=self.dtype, conv_impl=self.conv_impl, name="model_out")(conv10)
        return colorspace.denormalize_ab(jnp.tanh(out.astype(jnp.float32)))

    def _check_attention(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        unknown = [b for b in self.blocks if b not in BLOCK_NAMES]
        if unknown:
            raise ValueError(f"unknown attention block(s) {unknown}; choose from {BLOCK_NAMES}")

    def _conv(self, name: str, x: jax.Array, features: int) -> jax.Array:
        return layers.Conv(features, dtype=self.dtype, conv_impl=self.conv_impl, name=name)(x)

    def _up(self, name: str, x: jax.Array, features: int) -> jax.Array:
        return layers.ConvTranspose4x4(features, dtype=self.dtype, conv_impl=self.conv_impl, name=name)(x)

    def _block(self, name: str, x: jax.Array, train: bool, features: int, num_convs: int, **kwargs: Any) -> jax.Array:
        """Applies block `name`, then the attention module if `name` is one of `blocks`."""
        x = ConvBlock(features, num_convs, dtype=self.dtype, conv_impl=self.conv_impl, name=name, **kwargs)(x, train)
        if self.attention == "none" or name not in self.blocks:
            return x
        return self._attention_module(f"attention_{name}")(x, train)

    def _attention_module(self, name: str) -> nn.Module:
        if self.attention == "smsa":
            return attention_lib.SMSA(self.n_scales, self.reduction, self.dtype, self.conv_impl, name=name)
        if self.attention == "cbam":
            return attention_lib.CBAM(self.reduction, self.dtype, self.conv_impl, name=name)
        return attention_lib.SE(self.reduction, self.dtype, name=name)
