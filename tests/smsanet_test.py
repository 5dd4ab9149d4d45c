"""SMSANet: BaseNet's params plus attention, placement, sown maps, full-size counts, bfloat16, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsanet_jax import convert
from smsanet_jax.models import BaseNet, SMSANet

KEY = jax.random.key(0)
L_64 = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
# Measured: max 0.80, mean 0.13 raw ab units at width 8 (outputs spread with std ~37).
BF16_MAX_ERROR, BF16_MEAN_ERROR = 2.0, 0.25


def shapes(variables):
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(variables)}


def count(params):
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("attention", ["smsa", "cbam", "se"])
def test_params_are_basenet_params_plus_attention(attention):
    base = jax.eval_shape(BaseNet(width=8).init, KEY, L_64)
    full = jax.eval_shape(SMSANet(width=8, attention=attention).init, KEY, L_64)
    base_shapes, full_shapes = shapes(base), shapes(full)
    assert base_shapes.items() <= full_shapes.items()  # Same paths, same shapes.
    assert set(full["params"]) - set(base["params"]) == {"attention_model5", "attention_model6", "attention_model7"}
    # Exporting an SMSANet gives the SIGGRAPH17 state dict of its backbone.
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), full)
    assert (
        convert.siggraph17_to_torch(zeros).keys()
        == convert.siggraph17_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base)).keys()
    )


def test_default_is_smsa_after_model5_to_7():
    model = SMSANet()
    assert (model.attention, model.blocks, model.n_scales, model.reduction) == (
        "smsa",
        ("model5", "model6", "model7"),
        4,
        16,
    )


@pytest.mark.parametrize("attention, total", [("smsa", 34_151_190), ("cbam", 34_151_310), ("se", 34_151_010)])
def test_full_size_parameter_counts(attention, total):
    model = SMSANet(attention=attention)
    l = jax.ShapeDtypeStruct((2, 256, 256, 1), jnp.float32)
    variables = jax.eval_shape(model.init, KEY, l)
    assert jax.eval_shape(model.apply, variables, l).shape == (2, 256, 256, 2)
    assert count(variables["params"]) == total  # BaseNet's 34,051,074 plus three attention blocks.


def test_blocks_move_the_attention():
    variables = jax.eval_shape(SMSANet(width=8, blocks=("model1", "model10")).init, KEY, L_64)
    assert {k for k in variables["params"] if k.startswith("attention")} == {"attention_model1", "attention_model10"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention": "bam"}, "attention must be one of"),
        ({"blocks": ("model5", "model11")}, r"unknown attention block\(s\) \['model11'\]"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(SMSANet(width=8, **kwargs).init, KEY, L_64)


def test_smsa_input_must_suit_the_coarsest_scale():
    # 32x32 input -> 4x4 maps at model5, not divisible into 8x8 patches.
    with pytest.raises(ValueError, match=r"attention_model5.*n_scales=4.*\(1, 4, 4, 64\)"):
        jax.eval_shape(SMSANet(width=8).init, KEY, jnp.zeros((1, 32, 32, 1)))


def he_init(abstract, seed=0):
    """Variables like Flax's init (He-normal kernels, zero biases, unit BN) without compiling an init."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.partial(jax.jit, static_argnames="dtype")
def colorize(variables, l, dtype):
    return SMSANet(width=8, dtype=dtype).apply(variables, l, mutable=["intermediates"])


def test_attention_maps_are_sown_and_bfloat16_is_close_to_float32():
    l = np.random.default_rng(0).uniform(0, 100, (2, 64, 64, 1)).astype(np.float32)
    variables = he_init(jax.eval_shape(SMSANet(width=8).init, KEY, l))
    ab, state = colorize(variables, l, jnp.float32)
    maps = state["intermediates"]
    assert set(maps) == {"attention_model5", "attention_model6", "attention_model7"}
    sown = maps["attention_model6"]
    assert [a.shape for a in sown["spatial_maps"][0]] == [(2, 8, 8, 1)] * 3
    assert sown["channel"][0].shape == (2, 1, 1, 64) and sown["spatial"][0].shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(sown["lambdas"][0], np.full(3, 0.5))

    ab_bf16, _ = colorize(variables, l, jnp.bfloat16)
    assert ab_bf16.dtype == jnp.float32
    error = np.abs(np.asarray(ab_bf16) - np.asarray(ab))
    print(f"bfloat16 vs float32: max {error.max():.3f}, mean {error.mean():.3f} raw ab (output std {np.std(ab):.1f})")
    assert error.max() < BF16_MAX_ERROR and error.mean() < BF16_MEAN_ERROR
    bf16_params = jax.eval_shape(SMSANet(width=8, dtype=jnp.bfloat16).init, KEY, L_64)
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
