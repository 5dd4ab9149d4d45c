"""The XLA:CPU conv formulations against lax and torch: values, gradients, bfloat16, sharding, a BaseNet step;
which convs the layers send down the fast path; `prepare` and `describe`."""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from smsanet_jax import losses, parallel
from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.cpu import native
from smsanet_jax.models import BaseNet, layers

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


def same_padding(kernel_size, dilation):
    return tuple((d * (k - 1) // 2,) * 2 for k, d in zip(kernel_size, dilation))


def conv_op(kernel_size, dilation):
    """The fast path's 'same' convolution as a function of (x, kernel)."""
    return functools.partial(cpu_conv.conv2d, padding=same_padding(kernel_size, dilation), dilation=dilation)


def lax_op(kernel_size, dilation):
    """The reference: XLA's own 'same' convolution."""
    padding = same_padding(kernel_size, dilation)
    return lambda x, kernel: lax.conv_general_dilated(
        x, kernel, (1, 1), padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_the_fast_path_is_cpus_own():
    assert jax.default_backend() == "cpu"
    assert cpu_conv.use_fast_path("auto") and cpu_conv.use_fast_path("cpu")
    assert not cpu_conv.use_fast_path("xla")
    with pytest.raises(ValueError, match="conv_impl: 'cudnn' is not one of auto, xla, cpu"):
        cpu_conv.use_fast_path("cudnn")


def test_auto_takes_xla_off_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not cpu_conv.use_fast_path("auto") and cpu_conv.use_fast_path("cpu")
    assert cpu_conv.describe("auto") == "xla"
    assert cpu_conv.describe("cpu") == "cpu (xla transforms: the gpu backend)"


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
    expected = value_and_grads(lax_op((3, 3), (d, d)), x, kernel, dy)
    assert_close(value_and_grads(conv_op((3, 3), (d, d)), x, kernel, dy), expected)
    # Without a gradient, the wide forms take another forward pass (see the next test).
    assert_close(jax.jit(conv_op((3, 3), (d, d)))(x, kernel), expected[0])


def lowers_to_xla_convolution(fn, *args) -> bool:
    return "stablehlo.convolution" in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize(
    "cin,cout,trains_by_winograd,infers_by_winograd",
    [
        (64, 64, True, False),
        (128, 64, True, False),
        (128, 128, True, True),
        (384, 64, True, True),
        (512, 256, True, True),
        (4, 64, False, False),
        (512, 32, False, False),
    ],
)
def test_wide_3x3_convs_take_winograd(cin, cout, trains_by_winograd, infers_by_winograd):
    """Differentiated, Winograd from 64 channels; forward only, from a reduced width I*O/(I+O) of 48."""
    x, kernel, dy = random_arrays((1, 8, 8, cin), (3, 3, cin, cout), (1, 8, 8, cout))
    for d in (1, 2):
        op = conv_op((3, 3), (d, d))
        assert lowers_to_xla_convolution(op, x, kernel) != infers_by_winograd
        trained = lowers_to_xla_convolution(lambda x, kernel, dy, op=op: jax.vjp(op, x, kernel)[1](dy), x, kernel, dy)
        assert trained != trains_by_winograd


def test_forward_only_holds_under_stop_gradient():
    """PFANet in the salient loss sees its inputs under stop_gradient: it takes the forward-only form."""
    x, kernel = random_arrays((1, 8, 8, 64), (3, 3, 64, 64))
    op = conv_op((3, 3), (1, 1))

    def loss(scale):
        return (op(lax.stop_gradient(x * scale), kernel) * scale).sum()

    lowered = jax.jit(jax.grad(loss)).lower(1.0).as_text()
    assert "stablehlo.convolution" in lowered and "custom_call" not in lowered


def test_1x1_conv_is_a_matmul_that_matches_lax():
    x, kernel, dy = random_arrays((2, 16, 16, 16), (1, 1, 16, 8), (2, 16, 16, 8))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(conv_op((1, 1), (1, 1)))(x, kernel))
    expected = value_and_grads(lax_op((1, 1), (1, 1)), x, kernel, dy)
    assert_close(value_and_grads(conv_op((1, 1), (1, 1)), x, kernel, dy), expected)


@pytest.mark.parametrize(
    "kernel_size,dilation", [((1, 9), (1, 1)), ((9, 1), (1, 1)), ((3, 3), (3, 3)), ((3, 3), (7, 7)), ((7, 7), (1, 1))]
)
def test_other_convs_stay_with_lax(kernel_size, dilation):
    """PFANet's and the attention modules' other kernels (narrow, so no Winograd) have no fast form."""
    x, kernel = random_arrays((2, 16, 16, 16), (*kernel_size, 16, 8))
    padding = same_padding(kernel_size, dilation)
    assert not cpu_conv.fits_conv2d(x, kernel, padding, dilation)
    with pytest.raises(ValueError, match="no XLA:CPU formulation"):
        cpu_conv.conv2d(x, kernel, padding=padding, dilation=dilation)


def torch_conv_transpose(x, kernel, dy):
    """torch.nn.functional.conv_transpose2d(stride 2, padding 1) in float64 and its two gradients, NHWC."""
    x_t = torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2), requires_grad=True)
    weight = torch.tensor(np.asarray(kernel, np.float64).transpose(2, 3, 0, 1), requires_grad=True)  # [I, O, kh, kw]
    y = torch.nn.functional.conv_transpose2d(x_t, weight, stride=2, padding=1)
    y.backward(torch.from_numpy(np.asarray(dy, np.float64).transpose(0, 3, 1, 2)))
    return (
        y.detach().numpy().transpose(0, 2, 3, 1),
        x_t.grad.numpy().transpose(0, 2, 3, 1),
        weight.grad.numpy().transpose(2, 3, 0, 1),
    )


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
def test_conv_transpose_matches_torch(n, h, w, cin, cout):
    x, kernel, dy = random_arrays((n, h, w, cin), (4, 4, cin, cout), (n, 2 * h, 2 * w, cout))
    assert_close(value_and_grads(cpu_conv.conv_transpose_4x4_s2, x, kernel, dy), torch_conv_transpose(x, kernel, dy))


def test_conv_transpose_rejects_other_kernels():
    with pytest.raises(ValueError, match="4x4"):
        cpu_conv.conv_transpose_4x4_s2(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)))


@pytest.mark.parametrize("op_name", ["conv3x3", "conv3x3_d2", "conv1x1", "conv_transpose"])
def test_bfloat16_runs_and_stays_close(op_name):
    """bfloat16 in, bfloat16 out and gradients, close to the float32 results."""
    n, h, cin, cout = 2, 8, 32, 16
    if op_name == "conv_transpose":
        op, kernel_shape, out_h = cpu_conv.conv_transpose_4x4_s2, (4, 4), 2 * h
    else:
        size, d = {"conv3x3": (3, 1), "conv3x3_d2": (3, 2), "conv1x1": (1, 1)}[op_name]
        op, kernel_shape, out_h = conv_op((size, size), (d, d)), (size, size), h
    arrays = random_arrays((n, h, h, cin), (*kernel_shape, cin, cout), (n, out_h, out_h, cout))
    low = value_and_grads(op, *[a.astype(jnp.bfloat16) for a in arrays])
    assert all(a.dtype == jnp.bfloat16 for a in low)
    # Compared with float32 on the bfloat16-rounded inputs: only output rounding remains (2^-8).
    expected = value_and_grads(op, *[a.astype(jnp.bfloat16).astype(jnp.float32) for a in arrays])
    assert_close(low, expected, tolerance=1e-2)


def test_batch_sharded_across_devices():
    """Under jit with the batch split over the 8 test devices, the weight gradient sums every shard."""
    batch = parallel.batch_sharded(parallel.make_mesh())
    for op, shapes in [
        (conv_op((3, 3), (1, 1)), ((8, 6, 6, 16), (3, 3, 16, 8), (8, 6, 6, 8))),
        (cpu_conv.conv_transpose_4x4_s2, ((8, 3, 3, 16), (4, 4, 16, 8), (8, 6, 6, 8))),
    ]:
        x, kernel, dy = random_arrays(*shapes)
        expected = value_and_grads(op, x, kernel, dy)
        assert_close(value_and_grads(op, jax.device_put(x, batch), kernel, jax.device_put(dy, batch)), expected)


def fast_path_calls(monkeypatch, name: str) -> list:
    """Records each call of `cpu_conv.<name>` (which still runs)."""
    calls, function = [], getattr(cpu_conv, name)
    monkeypatch.setattr(cpu_conv, name, lambda *args, **kwargs: calls.append(args) or function(*args, **kwargs))
    return calls


def init_and_apply(module: nn.Module, x: jax.Array) -> jax.Array:
    return module.apply(module.init(jax.random.key(0), x), x)


@pytest.mark.parametrize(
    "impl,kernel_size,dilation,fast",
    [
        ("cpu", (3, 3), 1, True),
        ("auto", (3, 3), 2, True),
        ("auto", (1, 1), 1, True),
        ("xla", (3, 3), 1, False),
        ("xla", (1, 1), 1, False),
        ("cpu", (7, 7), 1, False),
        ("cpu", (3, 3), 3, False),
    ],
)
def test_the_conv_layer_takes_the_fast_path_where_it_fits(monkeypatch, impl, kernel_size, dilation, fast):
    calls = fast_path_calls(monkeypatch, "conv2d")
    init_and_apply(layers.Conv(8, kernel_size, dilation, conv_impl=impl), jnp.ones((1, 8, 8, 4)))
    assert bool(calls) == fast


@pytest.mark.parametrize("impl", ["xla", "cpu", "auto"])
def test_the_transposed_conv_layer_matches_torch(monkeypatch, impl):
    calls = fast_path_calls(monkeypatch, "conv_transpose_4x4_s2")
    x, kernel, bias, dy = random_arrays((2, 5, 7, 6), (4, 4, 6, 3), (3,), (2, 10, 14, 3))
    layer = layers.ConvTranspose4x4(3, conv_impl=impl)
    op = lambda x, kernel: layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    y, dx, dkernel = torch_conv_transpose(x, kernel, dy)
    assert_close(value_and_grads(op, x, kernel, dy), (y + np.asarray(bias), dx, dkernel))
    assert bool(calls) == (impl != "xla")


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


@pytest.mark.slow  # 35-40 s on 2 shared cores: four BaseNet steps compiled.
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


def test_describe_names_the_path(monkeypatch):
    assert cpu_conv.describe("xla") == "xla"
    monkeypatch.setattr(native, "_unavailable", None)  # As once prepare() registered the transforms.
    assert cpu_conv.describe("auto") == cpu_conv.describe("cpu") == "cpu+native"
    monkeypatch.setattr(native, "_unavailable", native.NOT_PREPARED)
    assert cpu_conv.describe("cpu") == "cpu (xla transforms: not prepared before tracing)"
    with pytest.raises(ValueError, match="conv_impl: 'gpu'"):
        cpu_conv.describe("gpu")


def test_prepare_logs_one_line_and_returns_the_path(monkeypatch, caplog):
    monkeypatch.setattr(native, "_unavailable", native.NOT_PREPARED)
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    with caplog.at_level(logging.INFO):
        assert cpu_conv.prepare("auto") == "cpu (xla transforms: SMSANET_NATIVE=0)"
    assert [r.getMessage() for r in caplog.records] == ["convolutions: cpu (xla transforms: SMSANET_NATIVE=0)"]


def test_prepare_builds_nothing_for_xlas_convolutions(monkeypatch):
    monkeypatch.setattr(native, "prepare", lambda: pytest.fail("prepare('xla') built the native transforms"))
    assert cpu_conv.prepare("xla") == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        cpu_conv.prepare("fast")
