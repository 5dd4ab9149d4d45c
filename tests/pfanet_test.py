"""PFANet: parity with the PyTorch port (S) and a tf.keras build of the official model (K), converters, resizing."""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smsanet_jax import convert
from smsanet_jax.models import pfanet
from smsanet_jax.models.pfanet import PFANet
from tests.reference import keras_pfanet as keras_pfanet_reference
from tests.reference import torch_pfanet

SIZE = 64  # Parity images: 64x64, batch 2.
PARITY_ATOL = 1e-4
S_PARAMS = 16_381_607  # docs/architecture.md, PFANet.
K_PARAMS = 16_184_999  # S minus the 3x3 -> 1x1 high-level conv (384*64*8 weights fewer).
BN_STAT_SCALARS = 1_412  # Running means and variances, both variants.


def _apply(variant: str):
    """Jitted apply returning (probability, intermediates); one compile per variant and shape."""

    def run(variables, x):
        prob, state = PFANet(variant).apply(variables, x, mutable=["intermediates"])
        return prob, state["intermediates"]

    return jax.jit(run)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two random RGB images in [0, 255], [2, SIZE, SIZE, 3]."""
    return np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)


# --- S: the PyTorch port -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_model() -> torch_pfanet.SODModel:
    """PFANet-S with He-normal weights (so the logits spread well beyond 0) and perturbed BN stats."""
    g = torch.Generator().manual_seed(0)
    model = torch_pfanet.SODModel()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, generator=g)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def torch_state_dict(torch_model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def s_variables(torch_state_dict):
    return convert.pfanet_from_torch(torch_state_dict)


def test_pfanet_s_matches_torch(torch_model, s_variables, images):
    x = np.array(pfanet.preprocess(images, "s"))
    logits = {}
    hook = torch_model.ff_conv_1.register_forward_hook(lambda m, i, out: logits.update(out=out))
    with torch.no_grad():
        prob_t, ca_reg_t = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    hook.remove()

    prob, inter = _apply("s")(s_variables, x)
    err = float(np.abs(np.asarray(prob)[..., 0] - prob_t.numpy()[:, 0]).max())
    print(f"PFANet-S vs torch: max |prob diff| = {err:.2e}")
    assert prob.shape == (2, SIZE, SIZE, 1) and prob.dtype == jnp.float32
    assert err < PARITY_ATOL
    np.testing.assert_allclose(inter["logits"][0][..., 0], logits["out"].numpy()[:, 0], atol=1e-4)
    np.testing.assert_allclose(inter["ca_activity"][0], ca_reg_t.item(), atol=1e-6)
    assert inter["ca_gates"][0].shape == (2, 384)
    assert float(prob_t.std()) > 0.05  # The weights make a non-trivial map, so the check means something.


def test_pfanet_torch_round_trip(torch_state_dict, s_variables):
    back = convert.pfanet_to_torch(s_variables)
    expected = {k: v for k, v in torch_state_dict.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_pfanet_from_torch_names_every_problem(torch_state_dict):
    sd = dict(torch_state_dict)
    del sd["ll_bn_2.running_var"]
    sd["spa_att.extra.weight"] = np.zeros(3, np.float32)
    sd["hl_conv1.weight"] = np.zeros((64, 384, 1, 1), np.float32)  # The Keras layout's 1x1.
    with pytest.raises(convert.ConversionError, match="missing key ll_bn_2.running_var") as e:
        convert.pfanet_from_torch(sd)
    assert "unexpected key spa_att.extra.weight" in str(e.value)
    del sd["spa_att.extra.weight"]
    sd["ll_bn_2.running_var"] = torch_state_dict["ll_bn_2.running_var"]
    with pytest.raises(convert.ConversionError, match="hl_conv/kernel: shape"):
        convert.pfanet_from_torch(sd)


def test_load_torch_truncated_checkpoint(torch_model, tmp_path):
    path = tmp_path / "pfanet.pth"
    torch.save({"epoch": 204, "model": torch_model.state_dict()}, path)
    assert convert.load_torch(str(path)).keys() == torch_model.state_dict().keys()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(convert.ConversionError, match="truncated.pth"):
        convert.load_torch(str(truncated))


def test_load_torch_reads_the_ports_checkpoint_format(torch_model, tmp_path):
    path = tmp_path / "best-model.pth"
    torch.save(
        {
            "epoch": 204,
            "test_mae": np.mean(np.array([0.05, 0.06], np.float32)),
            "model": torch_model.state_dict(),
            "test_loss": 0.137,
            "test_acc": torch.tensor(0.9),
            "test_pre": torch.tensor(0.8),
            "test_rec": torch.tensor(0.7),
        },
        path,
    )
    assert convert.load_torch(str(path)).keys() == torch_model.state_dict().keys()


# --- K: the official Keras model ----------------------------------------------------------------


def _randomise(model, rng):
    """He-normal kernels, small biases, BN affine and moving stats away from their identity values."""
    for layer in model.layers:
        values = []
        for v in layer.weights:
            shape = tuple(v.shape)
            if v.name == "kernel":
                values.append(rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape))
            elif v.name in ("gamma", "moving_variance"):
                values.append(1 + 0.2 * rng.uniform(-1, 1, shape))
            else:
                values.append(0.1 * rng.normal(size=shape))
        layer.set_weights([np.asarray(a, np.float32) for a in values])


@pytest.fixture(scope="module")
def keras_pfanet(tmp_path_factory):
    """(tf.keras PFANet-K with random weights, its Keras-written legacy .h5, its layer -> weights)."""
    tf = pytest.importorskip("tensorflow")
    import keras  # pylint: disable=import-outside-toplevel

    model = keras_pfanet_reference.build(tf, keras, SIZE)
    _randomise(model, np.random.default_rng(1))
    # Keras 3's save_weights writes only its own .weights.h5 layout (layers/<class name>/vars/<i>);
    # its legacy whole-model .h5 keeps Keras 2's by-layer-name layout that published weights use.
    path = tmp_path_factory.mktemp("keras") / "pfanet_k.h5"
    model.save(path)
    weights = {layer.name: [(v.name, v.numpy()) for v in layer.weights] for layer in model.layers}
    return model, path, weights


def _write_keras2_h5(path, weights, renames=None):
    """A `save_weights` file as Keras 2 writes it: /<layer>/<layer>/<weight>:0 at the root, byte-string names."""
    renames = renames or {}
    with h5py.File(path, "w") as f:
        names = [renames.get(n, n) for n in weights]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for layer, values in weights.items():
            name = renames.get(layer, layer)
            group = f.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w, _ in values])
            for w, value in values:
                group.create_dataset(f"{name}/{w}:0", data=value)


def test_pfanet_k_matches_keras(keras_pfanet, images):
    model, path, _ = keras_pfanet
    x = np.asarray(pfanet.preprocess(images, "k"))
    logits_keras = model(x, training=False).numpy()
    variables = convert.pfanet_from_keras_h5(str(path))
    prob, inter = _apply("k")(variables, x)
    err = float(np.abs(np.asarray(prob) - jax.nn.sigmoid(logits_keras)).max())
    print(f"PFANet-K vs tf.keras: max |prob diff| = {err:.2e}")
    assert err < PARITY_ATOL
    np.testing.assert_allclose(inter["logits"][0], logits_keras, atol=1e-3)
    assert float(np.std(logits_keras)) > 0.1


def test_keras2_layout_and_dense_names(keras_pfanet, tmp_path):
    model, path, weights = keras_pfanet
    dense = [layer.name for layer in model.layers if layer.name.startswith("dense")]
    # Keras 2 numbered its auto names from 1, and weightless layers carry an empty weight list.
    keras2 = tmp_path / "keras2.h5"
    _write_keras2_h5(keras2, weights, renames={dense[0]: "dense_1", dense[1]: "dense_2"})
    jax.tree.map(
        np.testing.assert_array_equal,
        convert.pfanet_from_keras_h5(str(keras2)),
        convert.pfanet_from_keras_h5(str(path)),
    )


def test_pfanet_from_keras_h5_names_every_problem(keras_pfanet, tmp_path):
    _, _, weights = keras_pfanet
    broken = dict(weights)
    del broken["C12_BN"]
    broken["extra_conv"] = [("kernel", np.zeros((3, 3, 1, 1), np.float32))]
    broken["C345_conv"] = [("kernel", np.zeros((3, 3, 384, 64), np.float32)), weights["C345_conv"][1]]
    broken["dense_extra"] = [(w, np.zeros_like(v)) for w, v in weights["C345_conv"]]
    dense = [n for n, v in weights.items() if n.startswith("dense") and v[0][1].shape == (96, 384)]
    broken[dense[0]] = [(w, v[:50]) for w, v in weights[dense[0]]]
    path = tmp_path / "broken.h5"
    _write_keras2_h5(path, broken)
    with pytest.raises(convert.ConversionError) as e:
        convert.pfanet_from_keras_h5(str(path))
    message = str(e.value)
    for expected in (
        "missing layer C12_BN",
        "unexpected layer extra_conv",
        "unexpected layer dense_extra",
        "layer C345_conv (params/hl_conv)/kernel: shape (3, 3, 384, 64)",
        "Dense layer with kernel (96, 384)",
    ):
        assert expected in message, message


def test_pfanet_from_keras_h5_unreadable_files(keras_pfanet, tmp_path):
    _, path, _ = keras_pfanet
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:100_000])
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    keras3 = tmp_path / "model.weights.h5"
    with h5py.File(keras3, "w") as f:
        f.create_group("layers/conv2d/vars")
    for bad, match in ((truncated, "truncated.h5"), (text, "notes.h5"), (keras3, "Keras 3 .weights.h5")):
        with pytest.raises(convert.ConversionError, match=match):
            convert.pfanet_from_keras_h5(str(bad))


def test_saliency_k_is_per_image(keras_pfanet, images):
    variables = convert.pfanet_from_keras_h5(str(keras_pfanet[1]))
    both = pfanet.saliency(variables, images[:, :40, :56], variant="k", size=32)
    alone = pfanet.saliency(variables, images[1:, :40, :56], variant="k", size=32)
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)


# --- Shared pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_hw, out_hw", [((16, 16), (64, 64)), ((5, 7), (13, 4)), ((64, 48), (16, 30)), ((1, 3), (4, 1))]
)
def test_resize_align_corners_matches_torch(in_hw, out_hw):
    x = np.random.default_rng(2).normal(size=(2, *in_hw, 3)).astype(np.float32)
    ours = pfanet.resize_bilinear_align_corners(jnp.asarray(x), out_hw)
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_hw, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_resize_align_corners_gradient():
    grad = jax.grad(lambda x: pfanet.resize_bilinear_align_corners(x, (7, 9)).sum())(jnp.ones((1, 4, 5, 2)))
    # Each output pixel spreads weight 1 over its sources.
    np.testing.assert_allclose(grad.sum(), 7 * 9 * 2, rtol=1e-6)


def test_saliency_any_size(s_variables, images):
    out = pfanet.saliency(s_variables, images[:, :40, :56], size=32)
    assert out.shape == (2, 40, 56, 1) and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.std()) > 0.0


def test_preprocess():
    rgb = jnp.array([[255.0, 0.0, 127.5]])
    imagenet = [[(1 - 0.485) / 0.229, -0.456 / 0.224, (0.5 - 0.406) / 0.225]]
    np.testing.assert_allclose(pfanet.preprocess(rgb, "s"), imagenet, rtol=1e-6)
    np.testing.assert_allclose(pfanet.preprocess(rgb, "k"), [[255 - 103.939, -116.779, 127.5 - 123.68]], rtol=1e-6)
    with pytest.raises(ValueError, match="variant"):
        pfanet.preprocess(rgb, "x")


@pytest.mark.parametrize("variant, count", [("s", S_PARAMS), ("k", K_PARAMS)])
def test_full_size_parameter_count(variant, count):
    image = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    shapes = jax.eval_shape(PFANet(variant).init, jax.random.key(0), image)
    out = jax.eval_shape(PFANet(variant).apply, shapes, image)
    assert out.shape == (2, 256, 256, 1) and out.dtype == jnp.float32
    bf16 = jax.eval_shape(PFANet(variant, jnp.bfloat16).apply, shapes, image)
    assert bf16.dtype == jnp.float32  # Probabilities stay float32 whatever the compute dtype.
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes["params"])) == count
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes["batch_stats"])) == BN_STAT_SCALARS


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiples of 16"):
        jax.eval_shape(PFANet().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 24, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        jax.eval_shape(PFANet().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
    with pytest.raises(ValueError, match="variant"):
        PFANet("x")
