"""colorize: full-resolution outputs that keep L, point hints, bad inputs skipped and named, safe writes."""

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage import color

from smsanet_jax import cli, colorize, hints, image_files, inference
from tests import tiny_checkpoint

# Rounding sRGB to uint8 moves L by at most ~0.25 (measured over random colours); in-gamut colours
# are otherwise exact.
L_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def colorizer(tmp_path_factory):
    workdir, _ = tiny_checkpoint.trained_workdir(tmp_path_factory)
    return inference.PhotoColorizer(inference.load_colorizer(workdir=workdir), batch_size=8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A 300x171 colour JPEG and a 1024x683 grayscale PNG."""
    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).resize((300, 171), Image.Resampling.BICUBIC).save(
        root / "colour.jpg", quality=90
    )
    Image.fromarray(skimage.data.coffee()).convert("L").resize((1024, 683), Image.Resampling.BICUBIC).save(
        root / "gray.png"
    )
    return root


def lightness(path):
    return color.rgb2lab(np.asarray(Image.open(path).convert("RGB")))[..., 0]


def ab(path):
    return color.rgb2lab(np.asarray(Image.open(path).convert("RGB")))[..., 1:]


def test_full_resolution_outputs_keep_size_and_lightness(colorizer, photos, tmp_path):
    out = tmp_path / "out"
    report = colorize.colorize(colorizer, [str(photos)], str(out))
    assert not report.failed
    assert sorted(os.listdir(out)) == ["colour.png", "gray.png"]
    for name, source, size in (("colour.png", "colour.jpg", (300, 171)), ("gray.png", "gray.png", (1024, 683))):
        result = Image.open(out / name)
        assert result.size == size and result.mode == "RGB"
        diff = np.abs(lightness(out / name) - lightness(photos / source))
        assert diff.max() <= L_TOLERANCE, (name, diff.max())
    # The model did colour the grayscale photo (the test above is not about a gray output).
    assert np.abs(ab(out / "gray.png")).mean() > 1.0


def test_a_hint_changes_colours_near_it_more_than_far_away(colorizer, photos, tmp_path):
    x, y = 60, 40  # Original pixels of the 300x171 photo.
    hints_file = tmp_path / "hints.json"
    hints_file.write_text(json.dumps({"colour.jpg": [{"x": x, "y": y, "a": 70, "b": -60}]}))
    plain = colorize.colorize(colorizer, [str(photos / "colour.jpg")], str(tmp_path / "plain"))
    hinted = colorize.colorize(
        colorizer, [str(photos / "colour.jpg")], str(tmp_path / "hinted"), hints_file=str(hints_file)
    )
    assert not plain.failed and not hinted.failed
    change = np.linalg.norm(ab(tmp_path / "hinted" / "colour.png") - ab(tmp_path / "plain" / "colour.png"), axis=-1)
    rows, cols = np.mgrid[: change.shape[0], : change.shape[1]]
    distance = np.hypot(cols - x, rows - y)
    near, far = change[distance < 4].mean(), change[distance > 100].mean()
    assert near > 5.0 and near > 20 * far, (near, far)


def test_hint_planes_map_original_pixels_to_the_network_grid():
    ab_hint, mask = hints.hint_planes(
        [hints.Hint(x=1023, y=0, a=10, b=-20, radius=0), hints.Hint(x=512, y=341.5, a=5, b=5)], 1024, 683
    )
    assert ab_hint.shape == (256, 256, 2) and mask.shape == (256, 256, 1)
    assert mask[0, 255, 0] == 1 and tuple(ab_hint[0, 255]) == (10, -20)
    assert mask[127:130, 127:130].all() and mask.sum() == 1 + 9
    with pytest.raises(ValueError, match="outside the 1024x683 image"):
        hints.hint_planes([hints.Hint(x=1024, y=0, a=0, b=0)], 1024, 683)


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "hints file"),
        ('[{"x": 1, "y": 2, "a": 3}]', r"needs x, y, a and b"),
        ('{"a.jpg": [{"x": 1, "y": 2, "a": 3, "b": "red"}]}', "finite numbers"),
        ('[{"x": 1, "y": 2, "a": 3, "b": 4, "size": 2}]', "unknown field"),
        ('"a.jpg"', "expected a list"),
    ],
)
def test_malformed_hints_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "hints.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        hints.load_hints(str(path))


def test_bad_inputs_are_named_and_skipped_nothing_overwritten_no_partial_files(
    colorizer, photos, tmp_path, tmp_path_factory, capsys
):
    workdir, _ = tiny_checkpoint.trained_workdir(tmp_path_factory)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = photos / "colour.jpg"
    (inputs / "first.jpg").write_bytes(good.read_bytes())
    (inputs / "second.jpg").write_bytes(good.read_bytes())
    (inputs / "kept.jpg").write_bytes(good.read_bytes())
    (inputs / "empty.jpg").write_bytes(b"")
    (inputs / "text.jpg").write_text("this is not a JPEG")
    (inputs / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.png").write_bytes(b"an earlier result")
    missing = str(tmp_path / "missing.jpg")

    args = [
        "colorize",
        str(inputs),
        missing,
        str(tmp_path / "nothing_*.png"),
        "--workdir",
        workdir,
        "--out",
        str(out),
        "--batch-size",
        "2",
    ]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    for name in ("empty.jpg", "text.jpg", "truncated.jpg", "missing.jpg", "nothing_*.png", "kept.jpg"):
        assert name in err.split("inputs failed:")[1], name
    assert sorted(os.listdir(out)) == ["first.png", "kept.png", "second.png"]
    assert (out / "kept.png").read_bytes() == b"an earlier result"
    assert Image.open(out / "first.png").size == (300, 171)

    # With --overwrite the earlier result is replaced; still nothing but finished outputs.
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--overwrite"])
    assert exit_info.value.code == 1
    assert sorted(os.listdir(out)) == ["first.png", "kept.png", "second.png"]
    assert Image.open(out / "kept.png").size == (300, 171)


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        image_files.write_image(str(tmp_path / "x.png"), np.zeros((4, 4, 3), np.uint8), "png", overwrite=False)
    assert os.listdir(tmp_path) == []


def test_output_name_clashes_are_reported(colorizer, photos, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "colour.png").write_bytes((photos / "gray.png").read_bytes())
    report = colorize.colorize(
        colorizer, [str(photos / "colour.jpg"), str(other / "colour.png")], str(tmp_path / "out")
    )
    assert [f[0] for f in report.failed] == [str(other / "colour.png")]
    assert "would also be written" in report.failed[0][1]
