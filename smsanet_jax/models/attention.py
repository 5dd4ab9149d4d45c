"""Attention blocks placed inside BaseNet: SMSA (the paper's), and the CBAM and SE baselines."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from smsanet_jax.models import layers


def channel_pool(x: jax.Array) -> jax.Array:
    """[N,H,W,C] -> [N,H,W,2]: maximum then mean over channels (CBAM's order)."""
    return jnp.concatenate([x.max(-1, keepdims=True), x.mean(-1, keepdims=True)], -1)


def hidden_features(channels: int, reduction: int) -> int:
    """Width of the bottleneck of a channel-attention MLP: C // r, at least 1."""
    return max(channels // reduction, 1)


class ChannelMLP(nn.Module):
    """FC C -> C//r (bias) -> ReLU -> FC -> C (bias): the excitation MLP of SE, CBAM and SMSA.

    Returns logits; callers apply the sigmoid (CBAM sums two passes first).
    """

    reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        channels = v.shape[-1]
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        v = nn.relu(dense(hidden_features(channels, self.reduction), "hidden")(v))
        return dense(channels, "out")(v)


class SMSA(nn.Module):
    """Stacked multi-scale attention (paper Eq. 1-4): F' = F + F * A_s * A_n.

    Spatial scales k = 1..n-1 pool M = [max_c F, mean_c F] over 2^k x 2^k patches, score the coarse
    grid with a per-scale 3x3 conv (2 -> 1, bias), squash with a sigmoid and upsample (nearest) to
    A_k; A_s = sum_k sigmoid(w_k) A_k with w_k initialised to 0. The channel scale is
    A_n = sigmoid(MLP(GAP(F))). Sows `spatial_maps` (the A_k, [N,H,W,1] each), `spatial` (A_s),
    `channel` (A_n, [N,1,1,C]) and `lambdas` into "intermediates".

    Params: `spatial_conv{k}` (k = 1..n-1), `channel_mlp/{hidden,out}`, `scale_logits` [n-1].
    """

    n_scales: int = 4
    reduction: int = 16
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Refines `x` [N,H,W,C]; `train` is unused (no batch statistics), kept for a uniform call."""
        del train
        if self.n_scales < 2:
            raise ValueError(f"SMSA needs n_scales >= 2 (at least one spatial scale), got {self.n_scales}")
        coarsest = 2 ** (self.n_scales - 1)
        if x.shape[1] % coarsest or x.shape[2] % coarsest:
            raise ValueError(
                f"{self.name or 'SMSA'}: with n_scales={self.n_scales} the feature map height and width must "
                f"be divisible by 2^(n_scales-1) = {coarsest}; got a feature map of shape {tuple(x.shape)}"
            )
        x = x.astype(self.dtype)
        n, h, w, _ = x.shape
        pooled = channel_pool(x)
        lambdas = nn.sigmoid(self.param("scale_logits", nn.initializers.zeros, (self.n_scales - 1,), jnp.float32))
        maps = []
        for k in range(1, self.n_scales):
            size = 2**k
            coarse = pooled.reshape(n, h // size, size, w // size, size, 2).mean((2, 4))
            score = layers.Conv(1, dtype=self.dtype, conv_impl=self.conv_impl, name=f"spatial_conv{k}")(coarse)
            maps.append(jnp.repeat(jnp.repeat(nn.sigmoid(score), size, 1), size, 2))
        spatial = sum(lam.astype(self.dtype) * a for lam, a in zip(lambdas, maps))
        channel = nn.sigmoid(ChannelMLP(self.reduction, self.dtype, name="channel_mlp")(x.mean((1, 2))))
        channel = channel[:, None, None, :]
        self.sow("intermediates", "spatial_maps", tuple(maps))
        self.sow("intermediates", "spatial", spatial)
        self.sow("intermediates", "channel", channel)
        self.sow("intermediates", "lambdas", lambdas)
        return x + x * spatial * channel


class CBAM(nn.Module):
    """CBAM (Woo et al. 2018) in SMSA's residual form: F + CBAM(F).

    Channel gate: sigmoid(MLP(avg-pool F) + MLP(max-pool F)) with one shared MLP; then, on the
    channel-refined map, spatial gate: sigmoid(BN(conv7x7([max_c, mean_c]))) with a bias-free conv
    and BN momentum 0.01 (torch) as in the official code. Sows `channel` and `spatial` gates.

    Params: `channel_mlp/{hidden,out}`, `spatial_conv` (no bias), `spatial_bn`.
    """

    reduction: int = 16
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Refines `x` [N,H,W,C]; `train` selects batch statistics in the spatial gate's BN."""
        x = x.astype(self.dtype)
        mlp = ChannelMLP(self.reduction, self.dtype, name="channel_mlp")
        channel = nn.sigmoid(mlp(x.mean((1, 2))) + mlp(x.max((1, 2))))[:, None, None, :]
        refined = x * channel
        score = layers.Conv(1, (7, 7), use_bias=False, dtype=self.dtype, conv_impl=self.conv_impl, name="spatial_conv")(
            channel_pool(refined)
        )
        spatial = nn.sigmoid(layers.batch_norm(train, self.dtype, name="spatial_bn", momentum=0.99)(score))
        self.sow("intermediates", "channel", channel)
        self.sow("intermediates", "spatial", spatial)
        return x + refined * spatial


class SE(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) in SMSA's residual form: F + F * sigmoid(MLP(GAP(F))).

    Biases on, as in the official Caffe model. Sows the `channel` gate. Params: `channel_mlp/{hidden,out}`.
    """

    reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Refines `x` [N,H,W,C]; `train` is unused, kept for a uniform call."""
        del train
        x = x.astype(self.dtype)
        channel = nn.sigmoid(ChannelMLP(self.reduction, self.dtype, name="channel_mlp")(x.mean((1, 2))))
        channel = channel[:, None, None, :]
        self.sow("intermediates", "channel", channel)
        return x + x * channel
