"""Layers every network is built from: plain Flax, with one marked branch to the CPU fast path.

`Conv` and `ConvTranspose4x4` are the only places that choose how a convolution is computed:
`lax.conv_general_dilated`, or the XLA:CPU formulations of `smsanet_jax.cpu.conv` (same
parameters, same results; see there why), by the `conv_impl` field ("auto", "xla", "cpu").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from smsanet_jax.cpu import conv as cpu_conv

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# He-normal suits the ReLU stacks here when training from scratch; converted weights replace it.
DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def same_padding(kernel_size: tuple[int, int], dilation: int = 1) -> Padding:
    """'same' padding of an odd kernel, as torch's padding=dilation*(k-1)//2."""
    return tuple((dilation * (k - 1) // 2,) * 2 for k in kernel_size)  # type: ignore[return-value]


class Conv(nn.Module):
    """Stride-1 2-D convolution with torch.nn.Conv2d semantics; params `kernel` [kh,kw,I,O], `bias`."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dilation: int = 1
    padding: Padding | None = None  # None: 'same'.
    use_bias: bool = True
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # "auto" | "xla" | "cpu", see `smsanet_jax.cpu.conv`.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", DEFAULT_KERNEL_INIT, (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        padding = self.padding or same_padding(self.kernel_size, self.dilation)
        dilation = (self.dilation, self.dilation)
        if cpu_conv.use_fast_path(self.conv_impl) and cpu_conv.fits_conv2d(x, kernel, padding, dilation):
            y = cpu_conv.conv2d(x, kernel, padding=padding, dilation=dilation)  # The XLA:CPU fast path.
        else:
            y = lax.conv_general_dilated(
                x, kernel, (1, 1), padding, rhs_dilation=dilation, dimension_numbers=_DIMENSION_NUMBERS
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class ConvTranspose4x4(nn.Module):
    """torch.nn.ConvTranspose2d(k=4, s=2, p=1).

    Params `kernel` [4,4,I,O] (= torch weight.transpose(2,3,0,1)) and `bias`.
    """

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # "auto" | "xla" | "cpu", see `smsanet_jax.cpu.conv`.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", DEFAULT_KERNEL_INIT, (4, 4, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if cpu_conv.use_fast_path(self.conv_impl):
            y = cpu_conv.conv_transpose_4x4_s2(x, kernel)  # The XLA:CPU fast path.
        else:
            # A transposed convolution is a correlation of the 2x-dilated input, padded by
            # k - 1 - p = 2, with the spatially flipped kernel.
            y = lax.conv_general_dilated(
                x,
                jnp.flip(kernel, (0, 1)),
                (1, 1),
                ((2, 2), (2, 2)),
                lhs_dilation=(2, 2),
                dimension_numbers=_DIMENSION_NUMBERS,
            )
        return y + bias.astype(self.dtype)


def batch_norm(train: bool, dtype: Any, name: str | None = None, momentum: float = 0.9) -> nn.BatchNorm:
    """BatchNorm with torch's defaults (eps 1e-5, running average decay 0.9); statistics in float32.

    `momentum` is Flax's decay of the running averages, i.e. 1 - torch's `momentum`.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=momentum, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
    )
