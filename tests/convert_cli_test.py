"""convert-weights round trips (SIGGRAPH17, PFANet), its errors, and the commands that read its output."""

import os
import re

import chex
import jax
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from smsanet_jax import cli, colorize, config_util, convert, inference, parallel, saliency, state, weights
from smsanet_jax.models import pfanet
from tests.reference import torch_pfanet, torch_siggraph17
from tests.reference.torch_utils import perturb_batch_norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8


def run_cli(args, capsys):
    """(exit status, stderr) of `smsanet-jax ARGS` run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def siggraph17_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_batch_norms(torch_siggraph17.SIGGRAPH17(width=WIDTH), 1)
    path = tmp_path_factory.mktemp("siggraph17") / "siggraph17.pth"
    torch.save(model.state_dict(), path)
    return path, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pfanet_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_batch_norms(torch_pfanet.SODModel(), 2).eval()
    path = tmp_path_factory.mktemp("pfanet") / "best-model.pth"
    # The PyTorch port's checkpoint format: the state dict under "model", numbers beside it.
    torch.save({"epoch": 204, "test_mae": np.float32(0.0505), "model": model.state_dict()}, path)
    return path, {k: v.numpy() for k, v in model.state_dict().items()}


def test_siggraph17_round_trip_and_every_reader(siggraph17_pth, tmp_path, capsys):
    src, state_dict = siggraph17_pth
    dst = str(tmp_path / "siggraph17.msgpack")
    status, err = run_cli(["convert-weights", "siggraph17", str(src), dst], capsys)
    assert status == 0 and "width 8" in err
    variables, meta = weights.load_variables(dst, kind="siggraph17")
    assert meta["width"] == WIDTH and meta["source"] == "siggraph17.pth" and len(meta["source_sha256"]) == 64
    back = convert.siggraph17_to_torch(variables)
    expected = {
        k: v for k, v in state_dict.items() if not k.startswith("model_class") and not k.endswith("num_batches_tracked")
    }
    assert back.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    # train: initial BaseNet weights of an SMSANet (its attention params stay fresh).
    config = config_util.load_config(os.path.join(ROOT, "configs", "tiny.py"), [f"--config.init.basenet={dst}"])
    fresh = state.create_train_state(config, state.build_model(config), parallel.make_mesh(1))
    chex.assert_trees_all_equal(jax.device_get(fresh.params["model3"]), variables["params"]["model3"])
    assert "attention_model5" in fresh.params

    # evaluate / colorize: --params with the config of the same network.
    basenet = os.path.join(ROOT, "configs", "basenet.py")
    colorizer = inference.load_colorizer(params=dst, config=basenet, overrides=[f"--config.model.width={WIDTH}"])
    assert colorizer.provenance["params_sha256"] == inference.params_sha256(variables)
    photo = tmp_path / "photo.png"
    Image.fromarray(skimage.data.chelsea()[:120, :200]).save(photo)
    report = colorize.colorize(inference.PhotoColorizer(colorizer), [str(photo)], str(tmp_path / "colorized"))
    assert not report.failed and Image.open(tmp_path / "colorized" / "photo.png").size == (200, 120)
    with pytest.raises(ValueError, match="does not fit the network") as e:
        inference.load_colorizer(params=dst, config=basenet)  # Width 64.
    assert "shape" in str(e.value)


def test_pfanet_round_trip_and_saliency_maps(pfanet_pth, tmp_path, capsys):
    src, state_dict = pfanet_pth
    dst = str(tmp_path / "pfanet_s.msgpack")
    status, _ = run_cli(["convert-weights", "pfanet-s", str(src), dst], capsys)
    assert status == 0
    variables, _ = weights.load_variables(dst, kind="pfanet-s")
    back = convert.pfanet_to_torch(variables)
    expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    photos = tmp_path / "photos"
    photos.mkdir()
    rocket = skimage.data.rocket()[:90, :140]
    Image.fromarray(rocket).save(photos / "rocket.png")
    Image.fromarray(skimage.data.coffee()[:50, :64]).save(photos / "coffee.jpg")
    out = tmp_path / "saliency"
    status, err = run_cli(["saliency", str(photos), "--params", dst, "--out", str(out), "--size", "32"], capsys)
    assert status == 0, err
    assert sorted(os.listdir(out)) == [
        "coffee_mask.png",
        "coffee_saliency.png",
        "rocket_mask.png",
        "rocket_saliency.png",
    ]
    prob = np.asarray(Image.open(out / "rocket_saliency.png"))
    mask = np.asarray(Image.open(out / "rocket_mask.png"))
    assert prob.shape == mask.shape == (90, 140) and prob.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    # Equal to pfanet.saliency on the one image, up to the PNG's 8 bits.
    direct = np.asarray(pfanet.saliency(variables, rocket[None].astype(np.float32), size=32))[0, ..., 0]
    np.testing.assert_allclose(prob / 255.0, direct, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(mask == 255, direct >= 0.5)
    assert 0 < prob.std()  # Random weights still give a non-constant map.

    # A second run does not overwrite: both inputs are reported.
    status, err = run_cli(["saliency", str(photos), "--params", dst, "--out", str(out)], capsys)
    assert status == 1 and "already exists" in err


def test_wrong_and_truncated_files_give_one_clear_error(siggraph17_pth, pfanet_pth, tmp_path, capsys):
    siggraph17, _ = siggraph17_pth
    pfanet_file, _ = pfanet_pth
    cases = [
        (["siggraph17", str(pfanet_file)], "holds no siggraph17 weights.*looks like pfanet-s"),
        (["pfanet-s", str(siggraph17)], "holds no pfanet-s weights.*looks like siggraph17"),
        (["pfanet-k", str(siggraph17)], "not a readable Keras HDF5 file"),
    ]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(siggraph17.read_bytes()[:20_000])
    cases.append((["siggraph17", str(truncated)], "not a readable PyTorch weights file"))
    cases.append((["siggraph17", str(tmp_path / "missing.pth")], "no such file"))
    for args, match in cases:
        status, err = run_cli(["convert-weights", *args, str(tmp_path / "out.msgpack")], capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("smsanet-jax convert-weights: error:"), err
        assert re.search(match, lines[0]), (match, lines[0])
    assert not os.path.exists(tmp_path / "out.msgpack")

    dst = tmp_path / "exists.msgpack"
    dst.write_bytes(b"keep")
    status, err = run_cli(["convert-weights", "siggraph17", str(siggraph17), str(dst)], capsys)
    assert status == 2 and "--overwrite" in err and dst.read_bytes() == b"keep"


def test_saliency_rejects_colorizer_weights(siggraph17_pth, tmp_path, capsys):
    src, _ = siggraph17_pth
    dst = str(tmp_path / "siggraph17.msgpack")
    convert.convert_file("siggraph17", str(src), dst)
    status, err = run_cli(["saliency", str(src), "--params", dst, "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and "not PFANet weights" in err


@pytest.fixture(scope="module")
def keras_layout_weights(tmp_path_factory):
    variables = jax.device_get(
        jax.eval_shape(pfanet.PFANet("k").init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    )
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), variables)
    path = str(tmp_path_factory.mktemp("pfanet_k") / "pfanet_k.msgpack")
    weights.save_variables(path, variables, kind="pfanet-k")
    return path


def test_saliency_tells_the_keras_layout_from_its_weights(keras_layout_weights):
    """The Keras model's 1x1 high-level conv means variant "k"."""
    _, variant = weights.load_pfanet(keras_layout_weights)
    assert variant == "k"


@pytest.mark.slow
def test_saliency_maps_with_keras_layout_weights(keras_layout_weights, tmp_path):
    loaded, _ = weights.load_pfanet(keras_layout_weights)
    image = skimage.data.astronaut()[:48, :80]
    Image.fromarray(image).save(tmp_path / "a.png")
    report = saliency.saliency_maps(keras_layout_weights, [str(tmp_path / "a.png")], str(tmp_path / "out"), size=32)
    assert not report.failed
    direct = np.asarray(pfanet.saliency(loaded, image[None].astype(np.float32), variant="k", size=32))[0, ..., 0]
    prob = np.asarray(Image.open(tmp_path / "out" / "a_saliency.png")) / 255.0
    np.testing.assert_allclose(prob, direct, atol=0.5 / 255 + 1e-6)
