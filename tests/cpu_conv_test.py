"""The XLA:CPU conv formulations against the lax reference: values, gradients, bfloat16, sharding, a BaseNet step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from smsanet_jax import losses, ops, parallel
from smsanet_jax.models import BaseNet

TOLERANCE = 1e-5  # Max abs error over max abs reference value, per array (float32).


def relative_errors(actual, expected) -> dict[str, float]:
    """Per leaf: max abs error over the leaf's max abs reference value."""
    errors = {}
    for path, a, e in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(actual), jax.tree.leaves(expected)
    ):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, jax.tree_util.keystr(path[0])
        errors[jax.tree_util.keystr(path[0])] = np.abs(a - e).max() / np.abs(e).max()
    return errors


def assert_close(actual, expected, tolerance=TOLERANCE):
    """Every leaf's max abs error is within `tolerance` of that leaf's max abs reference value."""
    for name, error in relative_errors(actual, expected).items():
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def random_arrays(*shapes, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def value_and_grads(op, x, kernel, dy):
    """op(x, kernel) and the gradients of <op(x, kernel), dy> w.r.t. x and kernel, jitted."""

    def run(x, kernel, dy):
        y, vjp = jax.vjp(op, x, kernel)
        return y, *vjp(dy)

    return jax.jit(run)(x, kernel, dy)


def conv_op(kernel_size, dilation, impl):
    pads = tuple((d * (k - 1) // 2,) * 2 for k, d in zip(kernel_size, dilation))
    return functools.partial(ops.conv2d, padding=pads, dilation=dilation, impl=impl)


def test_auto_resolves_to_the_cpu_formulations_on_cpu():
    assert jax.default_backend() == "cpu"
    assert ops.resolve_impl("auto") == "cpu"
    assert ops.resolve_impl("xla") == "xla"
    with pytest.raises(ValueError, match="conv impl"):
        ops.resolve_impl("cudnn")


# (batch, height, width, in, out, dilation): BaseNet's 3x3 convs (4 -> 64 input layer, d2 in
# model5/6, 512 channels) on small images, with odd sizes and batch 1 and 2; the narrow ones take
# the shifted-matmul gradient, those with >= 64 channels Winograd (d3 is not in the models).
CONV_CASES = (
    (1, 16, 16, 4, 64, 1),
    (2, 9, 13, 64, 48, 1),
    (1, 16, 16, 64, 64, 1),
    (2, 7, 9, 64, 80, 3),
    (2, 8, 8, 128, 128, 2),
    (1, 11, 7, 96, 64, 2),
    (2, 5, 4, 512, 512, 2),
    (1, 6, 6, 256, 512, 1),
)


@pytest.mark.parametrize("n,h,w,cin,cout,d", CONV_CASES)
def test_conv3x3_matches_lax(n, h, w, cin, cout, d):
    x, kernel, dy = random_arrays((n, h, w, cin), (3, 3, cin, cout), (n, h, w, cout))
    expected = value_and_grads(conv_op((3, 3), (d, d), "xla"), x, kernel, dy)
    assert_close(value_and_grads(conv_op((3, 3), (d, d), "cpu"), x, kernel, dy), expected)


@pytest.mark.parametrize("cin,cout,uses_winograd", [(64, 64, True), (512, 256, True), (4, 64, False), (512, 32, False)])
def test_wide_3x3_convs_take_winograd(cin, cout, uses_winograd):
    x, kernel = random_arrays((1, 8, 8, cin), (3, 3, cin, cout))
    for d in (1, 2):
        jaxpr = str(jax.make_jaxpr(conv_op((3, 3), (d, d), "cpu"))(x, kernel))
        assert ("conv_general_dilated" not in jaxpr) == uses_winograd


@pytest.mark.parametrize(
    "kernel_size,dilation",
    [((1, 1), (1, 1)), ((1, 9), (1, 1)), ((9, 1), (1, 1)), ((3, 3), (3, 3)), ((3, 3), (7, 7)), ((7, 7), (1, 1))],
)
def test_other_convs_match_lax(kernel_size, dilation):
    """PFANet's and the attention modules' kernels (1x1 is a matmul on "cpu", the others lax)."""
    x, kernel, dy = random_arrays((2, 16, 16, 16), (*kernel_size, 16, 8), (2, 16, 16, 8))
    expected = value_and_grads(conv_op(kernel_size, dilation, "xla"), x, kernel, dy)
    assert_close(value_and_grads(conv_op(kernel_size, dilation, "cpu"), x, kernel, dy), expected)


# (batch, height, width, in, out): model8up, model9up and model10up on small inputs, odd sizes.
CONV_T_CASES = (
    (1, 4, 4, 512, 256),
    (2, 8, 8, 256, 128),
    (2, 6, 6, 128, 128),
    (1, 5, 3, 64, 96),
    (2, 5, 7, 24, 40),
    (1, 1, 1, 8, 8),
)


@pytest.mark.parametrize("n,h,w,cin,cout", CONV_T_CASES)
def test_conv_transpose_matches_lax(n, h, w, cin, cout):
    x, kernel, dy = random_arrays((n, h, w, cin), (4, 4, cin, cout), (n, 2 * h, 2 * w, cout))
    op = functools.partial(ops.conv_transpose_4x4_s2, impl="xla")
    expected = value_and_grads(op, x, kernel, dy)
    op = functools.partial(ops.conv_transpose_4x4_s2, impl="cpu")
    assert_close(value_and_grads(op, x, kernel, dy), expected)


def test_conv_transpose_matches_torch():
    x, weight = random_arrays((2, 5, 7, 6), (6, 3, 4, 4))  # torch weight [I, O, kh, kw].
    expected = (
        torch.nn.functional.conv_transpose2d(
            torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(np.array(weight)),
            stride=2,
            padding=1,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    assert_close(ops.conv_transpose_4x4_s2(x, weight.transpose(2, 3, 0, 1), impl="cpu"), expected)


def test_conv_transpose_rejects_other_kernels():
    with pytest.raises(ValueError, match="4x4"):
        ops.conv_transpose_4x4_s2(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), impl="cpu")


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("op_name", ["conv3x3", "conv3x3_d2", "conv1x1", "conv_transpose"])
def test_bfloat16_runs_and_stays_close(op_name, impl):
    """bfloat16 in, bfloat16 out and gradients, close to the float32 results."""
    n, h, cin, cout = 2, 8, 32, 16
    if op_name == "conv_transpose":
        op, kernel_shape, out_h = functools.partial(ops.conv_transpose_4x4_s2, impl=impl), (4, 4), 2 * h
    else:
        size, d = {"conv3x3": (3, 1), "conv3x3_d2": (3, 2), "conv1x1": (1, 1)}[op_name]
        op, kernel_shape, out_h = conv_op((size, size), (d, d), impl), (size, size), h
    arrays = random_arrays((n, h, h, cin), (*kernel_shape, cin, cout), (n, out_h, out_h, cout))
    low = value_and_grads(op, *[a.astype(jnp.bfloat16) for a in arrays])
    assert all(a.dtype == jnp.bfloat16 for a in low)
    # Compared with float32 on the bfloat16-rounded inputs: only output rounding remains (2^-8).
    expected = value_and_grads(op, *[a.astype(jnp.bfloat16).astype(jnp.float32) for a in arrays])
    assert_close(low, expected, tolerance=1e-2)


def test_batch_sharded_across_devices():
    """Under jit with the batch split over the 8 test devices, the weight gradient sums every shard."""
    batch = parallel.batch_sharded(parallel.make_mesh())
    x, kernel, dy = random_arrays((8, 6, 6, 16), (3, 3, 16, 8), (8, 6, 6, 8))
    x, dy = jax.device_put(x, batch), jax.device_put(dy, batch)
    expected = value_and_grads(conv_op((3, 3), (1, 1), "xla"), x, kernel, dy)
    assert_close(value_and_grads(conv_op((3, 3), (1, 1), "cpu"), x, kernel, dy), expected)
    x, kernel, dy = random_arrays((8, 3, 3, 16), (4, 4, 16, 8), (8, 6, 6, 8))
    x, dy = jax.device_put(x, batch), jax.device_put(dy, batch)
    expected = value_and_grads(functools.partial(ops.conv_transpose_4x4_s2, impl="xla"), x, kernel, dy)
    assert_close(value_and_grads(functools.partial(ops.conv_transpose_4x4_s2, impl="cpu"), x, kernel, dy), expected)


def basenet_variables(dtype):
    """Random BaseNet (width 8) variables drawn with NumPy: compiling Flax's init takes longer than the step."""
    shapes = jax.eval_shape(BaseNet(width=8).init, jax.random.key(0), jnp.zeros((2, 32, 32, 1)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":  # He-normal, as the layers initialise.
            return rng.standard_normal(leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return 0.1 * rng.standard_normal(leaf.shape)  # Biases, BN offsets and means.

    return jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.asarray(draw(path, leaf), dtype), shapes)


def basenet_loss_and_grads(impl, dtype):
    """Huber loss of a train-mode BaseNet (width 8, 32x32, batch 2) and its parameter gradients."""
    rng = np.random.default_rng(1)
    l = jnp.asarray(50 + 25 * rng.standard_normal((2, 32, 32, 1)), dtype)
    true_ab = jnp.asarray(40 * rng.standard_normal((2, 32, 32, 2)), dtype)
    model = BaseNet(width=8, dtype=dtype, conv_impl=impl)
    variables = basenet_variables(dtype)

    def loss_fn(params):
        pred_ab, _ = model.apply({**variables, "params": params}, l, train=True, mutable=["batch_stats"])
        return losses.huber(pred_ab, true_ab)

    return jax.jit(jax.value_and_grad(loss_fn))(variables["params"])


def test_basenet_training_step_is_the_same_with_either_impl():
    """The same loss and gradients either way: exactly (float64) and as accurately (float32).

    In float32 the deep stack of small-batch BNs amplifies rounding: either path's gradients are
    about 1e-3 (relative) away from the float64 ones, and the two differ from each other by about
    1e-4, from summation order alone. So the formulations are checked for equality in float64, and
    in float32 the fast path must be no further from the float64 result than XLA's own convolutions.
    """
    with jax.enable_x64(True):
        exact = basenet_loss_and_grads("xla", jnp.float64)
        assert_close(basenet_loss_and_grads("cpu", jnp.float64), exact, tolerance=1e-12)
    fast = relative_errors(basenet_loss_and_grads("cpu", jnp.float32), exact)
    standard = relative_errors(basenet_loss_and_grads("xla", jnp.float32), exact)
    assert fast["[0]"] <= 1e-5 and standard["[0]"] <= 1e-5  # The loss.
    assert max(fast.values()) <= 1.5 * max(standard.values())
    assert np.median(list(fast.values())) <= 1.5 * np.median(list(standard.values()))
