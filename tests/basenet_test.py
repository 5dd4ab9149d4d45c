"""BaseNet against the PyTorch SIGGRAPH17 reference, the SIGGRAPH17 converter, full-size shapes, input checks."""

import copy
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from smsanet_jax import convert
from smsanet_jax.models import BaseNet
from tests.reference import torch_siggraph17
from tests.reference.torch_utils import perturb_batch_norms

WIDTH, BATCH, SIZE = 64, 2, 64  # The released network's channels, on small images.
PARITY_TOLERANCE = 1e-3  # Raw ab units.


def state_dict_numpy(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = torch_siggraph17.SIGGRAPH17(WIDTH)
    perturb_batch_norms(model, seed=1)
    return model


@pytest.fixture(scope="module")
def inputs():
    """L in [0, 100] and sparse ab hints with their mask, NHWC."""
    rng = np.random.default_rng(0)
    l = rng.uniform(0, 100, (BATCH, SIZE, SIZE, 1)).astype(np.float32)
    mask = (rng.uniform(size=(BATCH, SIZE, SIZE, 1)) < 0.05).astype(np.float32)
    ab_hint = (rng.uniform(-100, 100, (BATCH, SIZE, SIZE, 2)) * mask).astype(np.float32)
    return l, ab_hint, mask


@functools.partial(jax.jit, static_argnames=("width", "train"))
def run(variables, l, ab_hint, mask, width, train):
    """(ab, updated batch_stats or None); ab_hint and mask may be None (the default path)."""
    model = BaseNet(width=width)
    if train:
        ab, state = model.apply(variables, l, ab_hint, mask, train=True, mutable=["batch_stats"])
        return ab, state["batch_stats"]
    return model.apply(variables, l, ab_hint, mask), None


def torch_colorize(model, l, ab_hint, mask):
    """(raw ab NHWC, BN prefix -> N*H*W of its input) for NHWC numpy inputs; hints may be None."""
    samples_seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: samples_seen.__setitem__(name, args[0][:, 0].numel()))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        ab = model(nchw(l), *(None if x is None else nchw(x) for x in (ab_hint, mask))).numpy()
    for hook in hooks:
        hook.remove()
    return ab.transpose(0, 2, 3, 1), samples_seen


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
@pytest.mark.parametrize("hints", [False, True], ids=["no_hints", "hints"])
def test_matches_torch_reference(reference, inputs, train, hints):
    l, ab_hint, mask = inputs
    if not hints:
        ab_hint = mask = None
    torch_model = copy.deepcopy(reference).train(train)  # A copy: train mode updates the running stats.
    if train:
        # Train mode normalises with batch statistics, so the old running var only enters the update. At 0
        # the update is 0.1 x the batch variance: torch's unbiased n/(n-1) then shows even at n = 8192.
        for m in torch_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.zero_()
    variables = convert.siggraph17_from_torch(state_dict_numpy(torch_model), width=WIDTH)
    want, samples_seen = torch_colorize(torch_model, l, ab_hint, mask)
    ab, batch_stats = run(variables, l, ab_hint, mask, width=WIDTH, train=train)
    error = float(np.abs(np.asarray(ab) - want).max())
    print(f"max |ours - torch| ({'train' if train else 'inference'}, hints={hints}): {error:.2e} raw ab")
    assert ab.dtype == jnp.float32
    assert error < PARITY_TOLERANCE
    assert np.std(want) > 1  # A meaningful comparison: outputs are not collapsed.
    if train:
        ours = convert.siggraph17_to_torch({"params": variables["params"], "batch_stats": batch_stats})
        check_running_stats(ours, state_dict_numpy(torch_model), samples_seen)


def check_running_stats(ours, torch_after, samples_seen):
    """Same running means as torch; running vars equal once ours are scaled to torch's unbiased variance.

    Variances are compared relative to the layer's largest one, as some channels are (nearly) dead; the
    tolerance, 1e-5, is well below the 1/(n-1) >= 1.2e-4 that an uncorrected variance would be off by.
    """
    for name, n in samples_seen.items():
        np.testing.assert_allclose(
            ours[f"{name}.running_mean"], torch_after[f"{name}.running_mean"], rtol=1e-5, atol=1e-6, err_msg=name
        )
        want = torch_after[f"{name}.running_var"]
        np.testing.assert_allclose(
            ours[f"{name}.running_var"] * n / (n - 1), want, rtol=1e-5, atol=1e-5 * want.max(), err_msg=name
        )


def random_variables(width, seed=0):
    """BaseNet variables with every leaf random (positive, so valid variances); no init compile."""
    abstract = jax.eval_shape(BaseNet(width=width).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: rng.uniform(0.1, 1.0, v.shape).astype(np.float32), abstract)


def test_converter_round_trip_is_exact_and_loads_into_torch():
    variables = random_variables(width=8)
    sd = convert.siggraph17_to_torch(variables)
    torch_sd = torch_siggraph17.SIGGRAPH17(8).state_dict()
    torch_shapes = {
        k: tuple(v.shape)
        for k, v in torch_sd.items()
        if not k.startswith("model_class.") and not k.endswith("num_batches_tracked")
    }
    assert {k: v.shape for k, v in sd.items()} == torch_shapes
    chex.assert_trees_all_equal(convert.siggraph17_from_torch(sd, width=8), variables)
    # Without the class head the state dict loads non-strictly.
    result = torch_siggraph17.SIGGRAPH17(8).load_state_dict(
        {k: torch.from_numpy(v) for k, v in sd.items()}, strict=False
    )
    assert sorted(result.missing_keys) == ["model_class.0.bias", "model_class.0.weight"]
    assert not result.unexpected_keys


def test_converter_names_every_mismatch_at_once():
    sd = state_dict_numpy(torch_siggraph17.SIGGRAPH17(8))
    del sd["model2.0.bias"]
    sd["model11.0.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    sd["model4.2.weight"] = np.zeros((64, 32, 3, 3), np.float32)
    with pytest.raises(convert.ConversionError) as info:
        convert.siggraph17_from_torch(sd, width=8, source="broken.pth")
    message = str(info.value)
    assert "broken.pth" in message
    assert "missing key model2.0.bias" in message
    assert "unexpected key model11.0.weight" in message
    assert "model4/conv2/kernel: shape (3, 3, 32, 64) in the checkpoint, (3, 3, 64, 64) in the network" in message
    assert "model_class" not in message  # The class head is dropped, not reported.


def test_full_size_shapes_and_parameter_count():
    model = BaseNet()
    l = jax.ShapeDtypeStruct((2, 256, 256, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), l)
    out = jax.eval_shape(model.apply, variables, l)
    assert out.shape == (2, 256, 256, 2) and out.dtype == jnp.float32
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 34_051_074
    assert "model_class" not in variables["params"]


@pytest.mark.parametrize("shape", [(1, 60, 64, 1), (1, 64, 36, 1)])
def test_input_not_divisible_by_8_is_rejected(shape):
    with pytest.raises(ValueError, match=rf"divisible by 8.*{re.escape(str(shape))}"):
        jax.eval_shape(BaseNet(width=8).init, jax.random.key(0), jnp.zeros(shape))


def test_hint_shape_must_match_l():
    with pytest.raises(ValueError, match="ab_hint must have shape"):
        jax.eval_shape(BaseNet(width=8).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 3)))
