"""export: StableHLO and ONNX files that equal the JAX model, their errors, and colorize --onnx without JAX."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
import skimage.data
from PIL import Image

from smsanet_jax import colorize, colorspace, config_util, export, exported, hints, inference, state, weights
from tests.cli_utils import one_error_line, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"basenet": "configs/basenet.py", "smsanet": "configs/smsanet.py"}
WIDTH = 16
FORMATS = {"onnx": "onnx", "stablehlo": "stablehlo"}  # Format -> file extension.
PHOTOS = (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())


def model_args(width=WIDTH):
    return [f"--config.model.width={width}"]


def random_weights(path, name, width=WIDTH, seed=0):
    """Random weights of a network (BatchNorm statistics too, so that inference mode is tested)."""
    config = config_util.load_config(os.path.join(ROOT, CONFIGS[name]), model_args(width))
    variables = state.build_model(config).init(jax.random.key(seed), jnp.zeros((1, 64, 64, 1)), train=False)
    rng = np.random.default_rng(seed)
    variables["batch_stats"] = jax.tree.map(
        lambda x: (x + rng.uniform(0.5, 1.5, x.shape)).astype(np.float32), jax.device_get(variables["batch_stats"])
    )
    weights.save_variables(str(path), variables, kind="smsanet")
    return str(path)


def load(params, name, width=WIDTH):
    return inference.load_colorizer(
        params=params, config=os.path.join(ROOT, CONFIGS[name]), overrides=model_args(width)
    )


@pytest.fixture(scope="module")
def colorizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {name: load(random_weights(root / f"{name}.msgpack", name), name) for name in CONFIGS}


@pytest.fixture(scope="module")
def exports(colorizers, tmp_path_factory):
    """(network, size, format) -> ExportResult of a dynamic-batch export, made on first use."""
    root = tmp_path_factory.mktemp("exports")

    class Exports(dict):
        def __missing__(self, key):
            name, size, fmt = key
            path = str(root / f"{name}{size}.{FORMATS[fmt]}")
            self[key] = export.export_colorizer(colorizers[name], path, fmt=fmt, image_size=size)
            return self[key]

    return Exports()


def open_export(result):
    if result.metadata["exported_as"] == "onnx":
        return exported.OnnxNetwork(result.path)
    return export.StableHloNetwork(result.path)


def photo_inputs(size, rows, with_hints):
    """L of real photos resized to `size`, and point hints of their own colours (or none)."""
    photos = []
    for rgb in PHOTOS[:rows]:
        h, w = rgb.shape[:2]
        ab = colorspace.rgb_uint8_to_lab(rgb)[..., 1:]
        points = [(x, y) for x in (w // 5, w // 2, 4 * w // 5) for y in (h // 4, 3 * h // 4)] if with_hints else []
        photos.append(hints.prepare_photo(rgb, [hints.Hint(x, y, *ab[y, x]) for x, y in points], size))
    l, _ = colorspace.rgb_uint8_to_l_ab(np.stack([p.small for p in photos]))
    return l, np.stack([p.ab_hint for p in photos]), np.stack([p.mask for p in photos])


def jax_ab(colorizer, l, ab_hint, mask):
    return np.asarray(colorizer.apply_fn(colorizer.variables, l, ab_hint, mask, train=False))


@pytest.mark.parametrize("fmt", FORMATS)
# 128x128 doubles the exports and their checks (~40 s here): run with the slow tests.
@pytest.mark.parametrize("size", [64, pytest.param(128, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", CONFIGS)
def test_export_equals_the_jax_model(exports, colorizers, name, size, fmt):
    result = exports[name, size, fmt]
    assert result.max_abs_error <= export.PARITY_TOLERANCE
    network = open_export(result)
    assert (network.size, network.batch) == (size, None)
    assert network.metadata["params_sha256"] == colorizers[name].provenance["params_sha256"]
    assert network.metadata["config"]["model"]["attention"] == ("smsa" if name == "smsanet" else "none")
    for rows in (1, 3):  # One file, any batch.
        for with_hints in (False, True):
            l, ab_hint, mask = photo_inputs(size, rows, with_hints)
            expected = jax_ab(colorizers[name], l, ab_hint, mask)
            ours = network(l, ab_hint, mask) if with_hints else network(l)  # Hints default to none.
            assert ours.shape == (rows, size, size, 2) and ours.dtype == np.float32
            assert np.abs(ours - expected).max() <= export.PARITY_TOLERANCE, (rows, with_hints)
            if with_hints:  # The hints reach the network.
                assert np.abs(ours - network(l)).max() > 0.01


def test_metadata_of_both_formats(exports):
    onnx_result, stablehlo_result = exports["smsanet", 64, "onnx"], exports["smsanet", 64, "stablehlo"]
    props = {p.key: p.value for p in onnx.load(onnx_result.path).metadata_props}
    in_file = json.loads(props[exported.METADATA_KEY])
    assert in_file["opset"] == export.ONNX_OPSET == onnx.load(onnx_result.path).opset_import[0].version
    beside = json.loads(open(stablehlo_result.metadata_path).read())
    assert beside["platforms"] == list(export.STABLEHLO_PLATFORMS)
    for metadata in (in_file, beside):
        assert metadata["image_size"] == 64 and metadata["batch"] is None and metadata["layout"] == "NHWC"
        assert list(metadata["inputs"]) == ["l", "ab_hint", "mask"] and list(metadata["outputs"]) == ["ab"]
        assert metadata["config"]["model"]["width"] == WIDTH and len(metadata["params_sha256"]) == 64
    assert os.path.getsize(stablehlo_result.path) == stablehlo_result.num_bytes


def test_stablehlo_runs_with_jax_alone(exports):
    """The file is a plain serialised jax.export.Exported: deserialize and call, no project code."""
    result = exports["basenet", 64, "stablehlo"]
    code = (
        "import sys, numpy as np; from jax import export\n"
        "f = export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
        "z = np.zeros((2, 64, 64, 1), np.float32)\n"
        "print(f.call(z + 50, np.zeros((2, 64, 64, 2), np.float32), z).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, result.path], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 64, 64, 2)"


@pytest.mark.slow
def test_paper_size_smsanet_to_onnx(tmp_path):
    colorizer = load(random_weights(tmp_path / "smsanet.msgpack", "smsanet", width=64), "smsanet", width=64)
    result = export.export_colorizer(colorizer, str(tmp_path / "smsanet.onnx"), fmt="onnx")
    network = exported.OnnxNetwork(result.path)
    assert network.size == 256 and result.max_abs_error <= export.PARITY_TOLERANCE
    for with_hints in (False, True):
        inputs = photo_inputs(256, 2, with_hints)
        assert np.abs(network(*inputs) - jax_ab(colorizer, *inputs)).max() <= export.PARITY_TOLERANCE


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Photos of three sizes (larger and smaller than the network's side) and a hints file."""
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    folder.mkdir()
    Image.fromarray(PHOTOS[0]).save(folder / "astronaut.png")
    Image.fromarray(PHOTOS[1][:90, :150]).save(folder / "coffee.png")
    Image.fromarray(PHOTOS[2]).convert("L").save(folder / "chelsea.png")
    hints_file = root / "hints.json"
    hints_file.write_text(json.dumps({"astronaut.png": [{"x": 100, "y": 200, "a": 40, "b": -30}]}))
    return folder, hints_file


def assert_same_pngs(folder_a, folder_b):
    names = sorted(os.listdir(folder_a))
    assert names == sorted(os.listdir(folder_b)) == ["astronaut.png", "chelsea.png", "coffee.png"]
    for name in names:
        a, b = (np.asarray(Image.open(os.path.join(f, name))).astype(int) for f in (folder_a, folder_b))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name


def test_colorize_onnx_gives_the_pngs_of_colorize(exports, colorizers, photo_folder, tmp_path, capsys):
    folder, hints_file = photo_folder
    with_jax = tmp_path / "jax"
    network = inference.PhotoColorizer(colorizers["smsanet"], batch_size=2, size=64)
    report = colorize.colorize(network, [str(folder)], str(with_jax), hints_file=str(hints_file))
    assert not report.failed
    onnx_file = exports["smsanet", 64, "onnx"].path
    args = ["colorize", str(folder), "--onnx", onnx_file, "--hints", str(hints_file), "--batch-size", "2"]
    status, err = run_cli(capsys, [*args, "--out", str(tmp_path / "onnx")])
    assert status == 0, err
    assert_same_pngs(with_jax, tmp_path / "onnx")


def test_fixed_batch_export_pads_and_refuses_other_batches(colorizers, photo_folder, tmp_path, capsys):
    folder, _ = photo_folder
    path = str(tmp_path / "batch2.onnx")
    source = colorizers["basenet"].provenance["source"]
    args = ["export", "--format", "onnx", "--out", path, "--image-size", "64", "--batch", "2", "--params", source]
    status, err = run_cli(capsys, [*args, "--config", CONFIGS["basenet"], *model_args()])
    assert status == 0, err
    network = exported.OnnxNetwork(path)
    assert network.batch == 2
    with pytest.raises(ValueError, match=r"exported for a fixed batch of 2, got 3 rows"):
        network(photo_inputs(64, 3, False)[0])
    # colorize runs 3 photos as batches of 2 (the last one padded) with the JAX model's results.
    with_jax = tmp_path / "jax"
    colorize.colorize(inference.PhotoColorizer(colorizers["basenet"], size=64), [str(folder)], str(with_jax))
    status, err = run_cli(capsys, ["colorize", str(folder), "--onnx", path, "--out", str(tmp_path / "onnx")])
    assert status == 0, err
    assert_same_pngs(with_jax, tmp_path / "onnx")


def test_colorize_onnx_imports_no_jax(exports, photo_folder, tmp_path):
    """In a fresh interpreter where importing JAX (or Flax) fails, colorize --onnx still works."""
    folder, hints_file = photo_folder
    code = (
        "import importlib.abc, sys\n"
        "class NoJax(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('jax', 'jaxlib', 'flax'):\n"
        "            raise ImportError('JAX is blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, NoJax())\n"
        "from smsanet_jax import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:])\n"
        "finally:\n"
        "    assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')]\n"
    )
    args = ["colorize", str(folder), "--onnx", exports["basenet", 64, "onnx"].path, "--hints", str(hints_file)]
    out = subprocess.run(
        [sys.executable, "-c", code, *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["astronaut.png", "chelsea.png", "coffee.png"]


def damaged_copies(result, tmp_path):
    """(file, what the error says) for a truncated copy and a copy with a damaged header."""
    data = open(result.path, "rb").read()
    ext = FORMATS[result.metadata["exported_as"]]
    truncated, damaged = tmp_path / f"truncated.{ext}", tmp_path / f"damaged.{ext}"
    truncated.write_bytes(data[: len(data) // 2])
    damaged.write_bytes(b"\xff" * 64 + data[64:])
    if ext == "stablehlo":
        metadata = json.loads(open(result.metadata_path).read())
        (tmp_path / f"truncated.{ext}.json").write_text(json.dumps(metadata))
        # With a JSON that vouches for the damaged bytes, the deserialiser itself must refuse them.
        metadata["file_sha256"] = hashlib.sha256(damaged.read_bytes()).hexdigest()
        (tmp_path / f"damaged.{ext}.json").write_text(json.dumps(metadata))
        return [(truncated, "not the file its JSON describes"), (damaged, "not a readable StableHLO export")]
    return [(truncated, "not a readable ONNX model"), (damaged, "not a readable ONNX model")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_give_one_clear_error(exports, fmt, tmp_path):
    opener = exported.OnnxNetwork if fmt == "onnx" else export.StableHloNetwork
    for path, message in damaged_copies(exports["basenet", 64, fmt], tmp_path):
        with pytest.raises(ValueError, match=message) as e:
            opener(str(path))
        assert "\n" not in str(e.value)


def test_files_of_other_networks_are_refused(exports, tmp_path, capsys):
    # An ONNX model that is not a colorizer export.
    identity = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "identity",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    other = tmp_path / "other.onnx"
    onnx.save(identity, other)
    with pytest.raises(ValueError, match="not a smsanet-jax colorizer export"):
        exported.OnnxNetwork(str(other))
    status, err = run_cli(capsys, ["colorize", str(other), "--onnx", str(other), "--out", str(tmp_path / "out")])
    assert status == 2 and "not a smsanet-jax colorizer export" in err and len(err.strip().splitlines()) == 1
    # A StableHLO file beside the JSON of another export (BaseNet's file, SMSANet's JSON).
    swapped = tmp_path / "swapped.stablehlo"
    swapped.write_bytes(open(exports["basenet", 64, "stablehlo"].path, "rb").read())
    (tmp_path / "swapped.stablehlo.json").write_text(open(exports["smsanet", 64, "stablehlo"].metadata_path).read())
    with pytest.raises(ValueError, match="not the file its JSON describes"):
        export.StableHloNetwork(str(swapped))
    (tmp_path / "swapped.stablehlo.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a smsanet-jax colorizer export"):
        export.StableHloNetwork(str(swapped))
    os.remove(tmp_path / "swapped.stablehlo.json")
    with pytest.raises(ValueError, match="no .*swapped.stablehlo.json beside it"):
        export.StableHloNetwork(str(swapped))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_refuses_other_image_sizes(exports, fmt):
    network = open_export(exports["smsanet", 64, fmt])
    with pytest.raises(ValueError, match=r"exported for L of shape \[N, 64, 64, 1\], got \[1, 128, 128, 1\]"):
        network(np.zeros((1, 128, 128, 1), np.float32))
    with pytest.raises(ValueError, match=r"mask must have shape \[1, 64, 64, 1\]"):
        network(np.zeros((1, 64, 64, 1)), np.zeros((1, 64, 64, 2)), np.zeros((1, 64, 64, 2)))


@pytest.fixture(scope="module")
def basenet_params(colorizers):
    return ["--params", colorizers["basenet"].provenance["source"], "--config", CONFIGS["basenet"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "0"], "--image-size must be >= 1, got 0"),
        (["--image-size", "-64"], "--image-size must be >= 1, got -64"),
        (["--image-size", "60"], "--image-size 60: this network takes sides that are positive multiples of 8"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--batch", "-2"], "--batch must be >= 1"),
        (["--config.conv_impl=cpu"], "--config.conv_impl: export always traces the portable XLA convolutions"),
        (["--format", "tflite"], None),  # argparse's own error.
    ],
)
def test_bad_export_options_give_one_line(basenet_params, extra, message, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    args = ["export", "--format", "onnx", "--out", str(out), *basenet_params, *model_args(), *extra]
    status, err = run_cli(capsys, args)
    line = one_error_line(err)
    assert status == 2 and line == err.strip().splitlines()[-1], err  # argparse's usage lines may precede it.
    if message:
        assert line.startswith(f"smsanet-jax export: error: {message}"), err
    assert os.listdir(tmp_path) == []


def test_smsanet_image_size_step_is_64(colorizers, tmp_path):
    with pytest.raises(ValueError, match="--image-size 96: this network takes sides that are positive multiples of 64"):
        export.export_colorizer(colorizers["smsanet"], str(tmp_path / "x.onnx"), fmt="onnx", image_size=96)


def test_bad_outputs_give_one_line(basenet_params, tmp_path, capsys, monkeypatch):
    base = ["export", "--format", "stablehlo", "--image-size", "64", *basenet_params, *model_args()]
    status, err = run_cli(capsys, [*base, "--out", str(tmp_path)])
    assert status == 2 and "is a folder; give a file name" in err
    (tmp_path / "file").write_text("")
    status, err = run_cli(capsys, [*base, "--out", str(tmp_path / "file" / "x.stablehlo")])
    assert status == 2 and "is a file" in err
    existing = tmp_path / "model.stablehlo"
    existing.write_text("keep me")
    status, err = run_cli(capsys, [*base, "--out", str(existing)])
    assert status == 2 and "exists; pass --overwrite to replace it" in err and existing.read_text() == "keep me"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    status, err = run_cli(capsys, [*base, "--out", str(locked / "x.stablehlo")])
    assert status == 2 and "is not writable" in err and os.listdir(locked) == []
    monkeypatch.undo()
    status, err = run_cli(capsys, [*base, "--out", str(existing), "--overwrite"])
    assert status == 0, err
    assert export.StableHloNetwork(str(existing)).size == 64


def test_a_failed_parity_check_leaves_no_file(colorizers, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # Any export now "differs".
    for fmt in FORMATS:
        with pytest.raises(ValueError, match=f"the {fmt} export differs from the JAX model .* nothing was written"):
            export.export_colorizer(colorizers["basenet"], str(tmp_path / f"x.{fmt}"), fmt=fmt, image_size=64)
    assert os.listdir(tmp_path) == []  # Neither the file, its JSON nor a temporary file.


@pytest.mark.slow  # Trains the tiny checkpoint when no other test module has.
def test_export_from_a_training_workdir(tmp_path_factory, tmp_path, capsys):
    from tests import tiny_checkpoint

    workdir, _ = tiny_checkpoint.trained_workdir(tmp_path_factory)
    out = tmp_path / "tiny.onnx"
    args = ["export", "--workdir", workdir, "--format", "onnx", "--out", str(out), "--image-size", "32"]
    status, err = run_cli(capsys, args)
    assert status == 0, err
    assert "max |ab - JAX|" in err
    metadata = exported.OnnxNetwork(str(out)).metadata
    assert metadata["step"] == 4 and metadata["source"] == workdir
    # A run trained with the CPU fast path named in its config exports the same network.
    cpu_workdir = tmp_path / "trained_with_cpu_convs"
    shutil.copytree(workdir, cpu_workdir)
    config = json.loads((cpu_workdir / "config.json").read_text())
    (cpu_workdir / "config.json").write_text(json.dumps({**config, "conv_impl": "cpu"}))
    cpu_out = tmp_path / "cpu.onnx"
    status, err = run_cli(capsys, [*args[:2], str(cpu_workdir), *args[3:6], str(cpu_out), *args[7:]])
    assert status == 0, err
    l = np.linspace(0, 100, 32 * 32, dtype=np.float32).reshape(1, 32, 32, 1)
    no_hints = np.zeros((1, 32, 32, 2), np.float32), np.zeros((1, 32, 32, 1), np.float32)
    np.testing.assert_array_equal(
        exported.OnnxNetwork(str(cpu_out))(l, *no_hints), exported.OnnxNetwork(str(out))(l, *no_hints)
    )
