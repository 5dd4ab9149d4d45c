"""The train step: sharding invariance, one trace, donation, bfloat16, frozen PFANet, full-size compiles; configs."""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsanet_jax import config_util, parallel, train
from smsanet_jax import state as state_lib
from smsanet_jax.models import basenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "[a-z]*.py")))
PAPER_CONFIGS = ["smsanet", "smsanet_huber", "basenet", "basenet_cbam", "basenet_se", "basenet_salient"]


def tiny_config(*overrides):
    return config_util.load_config(os.path.join(ROOT, "configs", "tiny.py"), overrides)


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.image_size
    # Smooth colour fields, so the targets are learnable and not near-gray.
    base = rng.uniform(0, 255, (config.global_batch_size, 1, 1, 3))
    ramp = np.linspace(-60, 60, size)[None, :, None, None]
    return {
        "rgb": np.clip(base + ramp + rng.normal(0, 10, (config.global_batch_size, size, size, 3)), 0, 255).astype(
            np.uint8
        )
    }


def run_steps(config, num_devices, num_steps=3):
    mesh = parallel.make_mesh(num_devices)
    model = state_lib.build_model(config)
    state = state_lib.create_train_state(config, model, mesh)
    pfanet = train.load_pfanet(config, mesh)
    step_fn = train.jit_train_step(config, mesh)
    losses = []
    for i in range(num_steps):
        batch = parallel.make_global(random_batch(config, i), mesh)
        state, metrics = step_fn(state, batch, pfanet)
        losses.append(jax.device_get(metrics))
    return state, losses, pfanet


def test_every_config_loads():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert set(PAPER_CONFIGS + ["quickstart", "tiny"]) <= names
    for path in CONFIGS:
        config = config_util.load_config(path)
        config_util.validate_train_config(config, state_lib.DTYPES)  # Every shipped config is valid.
    with pytest.raises(ValueError, match="no_such_key"):
        config_util.load_config(CONFIGS[0], ["--config.no_such_key=1"])  # Locked: typos fail.


@pytest.mark.parametrize("block", basenet.BLOCK_NAMES)
def test_image_size_multiple_is_what_the_network_needs(block):
    """config_util's table of block resolutions agrees with the network: SMSA after `block`."""
    config = tiny_config("--config.model.n_scales=3")
    config.model.blocks = (block,)
    multiple = config_util.image_size_multiple(config.model)

    def trace(size):
        model = state_lib.build_model(config)
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))

    trace(multiple)
    if multiple > basenet.SIZE_MULTIPLE:  # Half a multiple more: BaseNet accepts it, SMSA must not.
        with pytest.raises(ValueError, match="divisible by 2"):
            trace(multiple * 3 // 2)


def full_size_step(name):
    """(jitted step, abstract state, abstract batch, abstract PFANet variables) of a paper config at 256x256."""
    config = config_util.load_config(os.path.join(ROOT, "configs", f"{name}.py"), ["--config.init.pfanet=random"])
    assert config.image_size == 256
    mesh = parallel.make_mesh(0)
    abstract = state_lib.abstract_train_state(config, state_lib.build_model(config), mesh)
    pfanet_abstract = None
    if config.loss.alpha:
        size = config.loss.pfanet_size
        module = train.pfanet_lib.PFANet(variant=config.loss.pfanet_variant)
        pfanet_abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    batch = {
        "rgb": jax.ShapeDtypeStruct(
            (config.global_batch_size, 256, 256, 3), jnp.uint8, sharding=parallel.batch_sharded(mesh)
        )
    }
    return train.jit_train_step(config, mesh), abstract, batch, pfanet_abstract, mesh


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_compile_at_full_size_with_the_state_donated(name):
    """XLA accepts the whole step (custom calls included); the state's buffers are reused, all replicated."""
    step_fn, abstract, batch, pfanet_abstract, mesh = full_size_step(name)
    out_state, out_metrics = jax.eval_shape(step_fn, abstract, batch, pfanet_abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(out_state, abstract)
    assert set(out_metrics) >= {"huber", "salient", "total", "grad_norm"}
    compiled = step_fn.lower(abstract, batch, pfanet_abstract).compile()
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
    # Donation: every byte of the incoming state is an output buffer too (~400 MB not allocated twice).
    assert compiled.memory_analysis().alias_size_in_bytes == state_bytes
    replicated = parallel.replicated(mesh)
    for sharding in jax.tree.leaves(compiled.output_shardings):
        assert sharding.is_equivalent_to(replicated, 0)


def test_one_device_equals_eight_devices():
    lr = 1e-5  # The paper's rate.
    config = tiny_config(f"--config.optimizer.learning_rate={lr}")
    state1, losses1, _ = run_steps(config, num_devices=1)
    state8, losses8, _ = run_steps(config, num_devices=8)
    loss_terms = lambda ls: [{k: v for k, v in l.items() if k != "grad_norm"} for l in ls]
    chex.assert_trees_all_close(loss_terms(losses1), loss_terms(losses8), rtol=1e-5, atol=1e-7)
    # Step 1 starts from identical params: its gradient (norm) checks the sharded backward pass.
    # The norm sums ~10^5 squares in an order that depends on the device count.
    np.testing.assert_allclose(losses1[0]["grad_norm"], losses8[0]["grad_norm"], rtol=1e-4)
    # Adam moves a parameter by up to ~lr per step however small its gradient, so rounding-level
    # differences in near-zero gradients may differ by 2*lr per step: that bounds the params.
    chex.assert_trees_all_close(
        jax.device_get(state1.params), jax.device_get(state8.params), rtol=1e-5, atol=3 * 2 * lr
    )
    chex.assert_trees_all_close(
        jax.device_get(state1.batch_stats), jax.device_get(state8.batch_stats), rtol=1e-5, atol=1e-6
    )
    assert losses1[-1]["total"] < losses1[0]["total"]


def test_jit_train_step_traces_once_donates_the_state_and_keeps_it_replicated(monkeypatch):
    config = tiny_config()
    mesh = parallel.make_mesh(2)
    state = state_lib.create_train_state(config, state_lib.build_model(config), mesh)
    monkeypatch.setattr(train, "train_step", chex.assert_max_traces(train.train_step, n=1))
    step_fn = train.jit_train_step(config, mesh)
    replicated = parallel.replicated(mesh)
    # No hidden host<->device copies in the loop: batches are placed explicitly, metrics stay put.
    with jax.transfer_guard("disallow"):
        for i in range(3):
            previous = state
            state, metrics = step_fn(state, parallel.make_global(random_batch(config, i), mesh), None)
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(previous))  # Donated, not copied.
            for leaf in jax.tree.leaves((state, metrics)):
                assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)


def test_bfloat16_first_loss_close_to_float32():
    _, losses32, _ = run_steps(tiny_config(), num_devices=1, num_steps=1)
    _, losses16, _ = run_steps(tiny_config("--config.dtype=bfloat16"), num_devices=1, num_steps=1)
    # bfloat16 keeps 8 bits of mantissa: activations carry ~0.4% relative error each layer.
    np.testing.assert_allclose(losses16[0]["total"], losses32[0]["total"], rtol=0.05)


def test_salient_loss_keeps_pfanet_frozen_and_trains_colorizer():
    config = tiny_config("--config.loss.alpha=1.0", "--config.init.pfanet=random")
    mesh = parallel.make_mesh(2)
    model = state_lib.build_model(config)
    initial = jax.device_get(state_lib.create_train_state(config, model, mesh).params)
    state, losses, pfanet = run_steps(config, num_devices=2, num_steps=2)
    before = jax.device_get(train.load_pfanet(config, mesh))
    chex.assert_trees_all_equal(jax.device_get(pfanet), before)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), initial, jax.device_get(state.params))
    assert all(jax.tree.leaves(changed))
    assert all(np.isfinite(l["salient"]) for l in losses)


def test_salient_step_is_the_same_with_either_conv_impl():
    """The fast path (PFANet's forward-only forms, the colorizer's Winograd) leaves the loss and gradient as XLA's."""
    salient = ("--config.loss.alpha=1.0", "--config.init.pfanet=random")
    _, fast, _ = run_steps(tiny_config(*salient, "--config.conv_impl=cpu"), num_devices=1, num_steps=1)
    _, xla, _ = run_steps(tiny_config(*salient, "--config.conv_impl=xla"), num_devices=1, num_steps=1)
    assert fast[0]["salient"] > 0  # Some pixels are salient: the masks are part of what is compared.
    grad_norms = fast[0].pop("grad_norm"), xla[0].pop("grad_norm")
    chex.assert_trees_all_close(fast[0], xla[0], rtol=1e-5)
    # The colorizer's gradient: Winograd against direct convolutions, summed in different orders.
    np.testing.assert_allclose(*grad_norms, rtol=1e-4)


def test_salient_loss_without_pfanet_weights_is_a_clear_error():
    config = tiny_config("--config.loss.alpha=1.0")
    with pytest.raises(ValueError, match="convert-weights"):
        train.load_pfanet(config, parallel.make_mesh(1))
