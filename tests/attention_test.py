"""SMSA, CBAM and SE against plain NumPy implementations of their equations; gradients; size errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsanet_jax.models import attention

SHAPE = (2, 8, 8, 32)  # Reduction 16 -> an MLP bottleneck of 2.


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_conv_same(x, kernel, bias=None):
    """Stride-1 'same' cross-correlation: x [N,H,W,I], kernel [kh,kw,I,O]."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = sum(padded[:, dy : dy + h, dx : dx + w, :] @ kernel[dy, dx] for dy in range(kh) for dx in range(kw))
    return out if bias is None else out + bias


def np_mlp(p, v):
    hidden = np.maximum(v @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    return hidden @ p["out"]["kernel"] + p["out"]["bias"]


def np_channel_pool(x):
    return np.concatenate([x.max(-1, keepdims=True), x.mean(-1, keepdims=True)], -1)


def np_smsa(p, x, n_scales):
    n, h, w, _ = x.shape
    m = np_channel_pool(x)
    lambdas = sigmoid(p["scale_logits"])
    a_s = 0
    for k in range(1, n_scales):
        s = 2**k
        v = m.reshape(n, h // s, s, w // s, s, 2).mean((2, 4))
        conv = p[f"spatial_conv{k}"]
        a_k = sigmoid(np_conv_same(v, conv["kernel"], conv["bias"])).repeat(s, 1).repeat(s, 2)
        a_s = a_s + lambdas[k - 1] * a_k
    a_n = sigmoid(np_mlp(p["channel_mlp"], x.mean((1, 2))))[:, None, None, :]
    return x + x * a_s * a_n, lambdas


def np_cbam(p, stats, x, train):
    """(output, batch mean of the spatial gate's conv output)."""
    channel = sigmoid(np_mlp(p["channel_mlp"], x.mean((1, 2))) + np_mlp(p["channel_mlp"], x.max((1, 2))))
    refined = x * channel[:, None, None, :]
    score = np_conv_same(np_channel_pool(refined), p["spatial_conv"]["kernel"])
    if train:
        mean, var = score.mean((0, 1, 2)), score.var((0, 1, 2))
    else:
        mean, var = stats["spatial_bn"]["mean"], stats["spatial_bn"]["var"]
    bn = p["spatial_bn"]
    spatial = sigmoid((score - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"])
    return x + refined * spatial, score.mean((0, 1, 2))


def np_se(p, x):
    return x + x * sigmoid(np_mlp(p["channel_mlp"], x.mean((1, 2))))[:, None, None, :]


def randomised(module, x, seed=0):
    """Variables of `module` with every leaf replaced by random values (variances kept positive)."""
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(variables)
    leaves = [rng.normal(0, 1, leaf.shape).astype(np.float32) for leaf in leaves]
    variables = jax.tree.unflatten(treedef, leaves)
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, variables["batch_stats"])
    return variables


@functools.partial(jax.jit, static_argnames=("module", "train"))
def apply(module, variables, x, train=False):
    """(output, intermediates, updated batch_stats)."""
    out, state = module.apply(variables, x, train, mutable=["intermediates", "batch_stats"])
    return out, state["intermediates"], state.get("batch_stats")


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).normal(0, 1, SHAPE).astype(np.float32)


def to_numpy(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def test_smsa_matches_numpy(x):
    module = attention.SMSA(n_scales=4)
    variables = randomised(module, x)
    out, inter, _ = apply(module, variables, x)
    want, lambdas = np_smsa(to_numpy(variables["params"]), x.astype(np.float64), 4)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    sown = inter["lambdas"][0]
    np.testing.assert_allclose(sown, lambdas, rtol=1e-6)
    assert np.all((sown > 0) & (sown < 1))
    maps = inter["spatial_maps"][0]
    assert len(maps) == 3 and all(a.shape == (2, 8, 8, 1) for a in maps)
    chex.assert_shape(inter["channel"][0], (2, 1, 1, 32))
    chex.assert_shape(inter["spatial"][0], (2, 8, 8, 1))


def test_smsa_lambdas_start_at_one_half(x):
    variables = attention.SMSA(n_scales=3).init(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["params"]["scale_logits"], np.zeros(2))


@pytest.mark.parametrize("train", [True, False])
def test_cbam_matches_numpy(x, train):
    module = attention.CBAM()
    variables = randomised(module, x)
    out, _, stats = apply(module, variables, x, train)
    want, batch_mean = np_cbam(
        to_numpy(variables["params"]), to_numpy(variables["batch_stats"]), x.astype(np.float64), train
    )
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    if train:  # torch momentum 0.01: the running mean moves 1% of the way to the batch mean.
        old = np.asarray(variables["batch_stats"]["spatial_bn"]["mean"])
        np.testing.assert_allclose(stats["spatial_bn"]["mean"], 0.99 * old + 0.01 * batch_mean, rtol=1e-5)


def test_se_matches_numpy(x):
    module = attention.SE()
    variables = randomised(module, x)
    out, inter, _ = apply(module, variables, x)
    np.testing.assert_allclose(out, np_se(to_numpy(variables["params"]), x.astype(np.float64)), rtol=1e-5, atol=1e-5)
    chex.assert_shape(inter["channel"][0], (2, 1, 1, 32))


def test_channel_mlp_bottleneck_is_at_least_one():
    assert attention.hidden_features(512, 16) == 32
    assert attention.hidden_features(8, 16) == 1


@pytest.mark.parametrize("module", [attention.SMSA(), attention.CBAM(), attention.SE()], ids=["smsa", "cbam", "se"])
def test_gradients_reach_every_parameter(x, module):
    variables = randomised(module, x)
    target = np.random.default_rng(2).normal(0, 1, SHAPE).astype(np.float32)

    def loss(params):
        out, _ = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(out * target)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    norms = {jax.tree_util.keystr(k): float(jnp.abs(g).sum()) for k, g in jax.tree.leaves_with_path(grads)}
    assert all(n > 0 for n in norms.values()), norms


def test_smsa_rejects_feature_maps_not_divisible_by_coarsest_scale():
    with pytest.raises(ValueError, match=r"n_scales=4.*divisible by .* 8.*\(2, 12, 12, 32\)"):
        jax.eval_shape(attention.SMSA(n_scales=4).init, jax.random.key(0), jnp.zeros((2, 12, 12, 32)))
    # The same map is fine with one scale fewer (coarsest patch 4x4).
    jax.eval_shape(attention.SMSA(n_scales=3).init, jax.random.key(0), jnp.zeros((2, 12, 12, 32)))
    with pytest.raises(ValueError, match="n_scales >= 2"):
        jax.eval_shape(attention.SMSA(n_scales=1).init, jax.random.key(0), jnp.zeros((2, 8, 8, 32)))
