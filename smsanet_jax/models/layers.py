"""Layers every network is built from, so that one conv implementation serves them all."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from smsanet_jax import ops

Padding = tuple[tuple[int, int], tuple[int, int]]
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
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", DEFAULT_KERNEL_INIT, (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        padding = self.padding or same_padding(self.kernel_size, self.dilation)
        y = ops.conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            padding=padding,
            dilation=(self.dilation, self.dilation),
            impl=self.conv_impl,
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
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", DEFAULT_KERNEL_INIT, (4, 4, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = ops.conv_transpose_4x4_s2(x.astype(self.dtype), kernel.astype(self.dtype), impl=self.conv_impl)
        return y + bias.astype(self.dtype)


def batch_norm(train: bool, dtype: Any, name: str | None = None, momentum: float = 0.9) -> nn.BatchNorm:
    """BatchNorm with torch's defaults (eps 1e-5, running average decay 0.9); statistics in float32.

    `momentum` is Flax's decay of the running averages, i.e. 1 - torch's `momentum`.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=momentum, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
    )
