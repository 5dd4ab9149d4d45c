"""The train state and the networks a config describes: one place that builds both."""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from smsanet_jax import parallel, weights
from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.models import SMSANet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(train_state.TrainState):
    """Params, Adam state and step, plus BatchNorm running statistics."""

    batch_stats: Any


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The colorizer a config describes (BaseNet is SMSANet with attention "none").

    The CPU convolutions' native library is built or loaded here, before any trace, so that the
    first jit never runs a compiler (`cpu.conv.prepare`; it logs which convolution path runs).
    """
    cpu_conv.prepare(config.conv_impl)
    m = config.model
    return SMSANet(
        attention=m.attention,
        blocks=tuple(m.blocks),
        width=m.width,
        n_scales=m.n_scales,
        reduction=m.reduction,
        dtype=DTYPES[config.dtype],
        conv_impl=config.conv_impl,
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optimizer
    return optax.adam(o.learning_rate, b1=o.b1, b2=o.b2)


def _init_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, image_size: int) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 1), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def _init_fn(config: ml_collections.ConfigDict, model: nn.Module):
    return functools.partial(_init_state, model=model, tx=make_optimizer(config), image_size=config.image_size)


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state, allocating nothing."""
    shapes = jax.eval_shape(_init_fn(config, model), jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=parallel.replicated(mesh)), shapes)


def variable_shapes(config: ml_collections.ConfigDict, model: nn.Module) -> dict[str, Any]:
    """The {"params", "batch_stats"} shapes of the configured network (allocates nothing)."""
    size = config.image_size  # The config's own size suits its attention scales.
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh state, born replicated on the mesh; BaseNet weights from `config.init.basenet`."""
    state = jax.jit(_init_fn(config, model), out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
    if config.init.basenet:
        source = config.init.basenet
        loaded, _ = weights.load_variables(source, kind="siggraph17")
        params = weights.overlay(state.params, loaded["params"], source)
        batch_stats = weights.overlay(state.batch_stats, loaded["batch_stats"], source)
        state = state.replace(
            params=jax.device_put(params, parallel.replicated(mesh)),
            batch_stats=jax.device_put(batch_stats, parallel.replicated(mesh)),
        )
        logging.info("initialised the BaseNet part from %s", source)
    return state
