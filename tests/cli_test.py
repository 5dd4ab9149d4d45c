"""The commands as a user types them: relative paths, careless and hostile options, outputs that must survive.

Every bad input must give one line `smsanet-jax CMD: error: ...` naming the option or file, exit
status 2, no traceback, and leave the user's files and any earlier output untouched.
"""

import json
import os
import shutil
import signal

import flax.serialization
import numpy as np
import pytest
import skimage.data
from PIL import Image

from smsanet_jax import evaluation, files, reporting
from tests import cli_utils, tiny_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_checkpoint.trained_workdir(tmp_path_factory)


@pytest.fixture
def photos(tmp_path):
    """Two small colour photos in a folder."""
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(root / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()[::3, ::3]).save(root / "chelsea.jpg", quality=90)
    return root


def run(capsys, *argv):
    """(exit status, stderr) of the command, in this process."""
    return cli_utils.run_cli(capsys, [str(a) for a in argv])


def one_clear_line(err, command, *needles):
    line = cli_utils.one_error_line(err)
    assert line.startswith(f"smsanet-jax {command}: error:"), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-3"], "--batch-size"),
        (["--num-devices", "-1"], "--num-devices"),
    ],
)
def test_colorize_rejects_bad_numbers_before_any_work(trained, photos, tmp_path, capsys, options, needle):
    workdir, _ = trained
    status, err = run(capsys, "colorize", photos, "--workdir", workdir, "--out", tmp_path / "out", *options)
    assert status == 2
    one_clear_line(err, "colorize", needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--image-size", "0"], "--image-size"),
        (["--num-images", "-1"], "--num-images"),
        (["--num-workers", "-2"], "--num-workers"),
    ],
)
def test_evaluate_rejects_bad_numbers_before_any_work(photos, tmp_path, capsys, options, needle):
    argv = ["evaluate", "--baseline", "gray", "--images", photos, "--out", tmp_path / "report", *options]
    status, err = run(capsys, *argv)
    assert status == 2
    one_clear_line(err, "evaluate", needle)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("option, value", [("--size", "0"), ("--size", "-16"), ("--batch-size", "0")])
def test_saliency_rejects_bad_numbers(photos, tmp_path, capsys, option, value):
    status, err = run(
        capsys, "saliency", photos, "--params", tmp_path / "none.msgpack", "--out", tmp_path / "o", option, value
    )
    assert status == 2
    one_clear_line(err, "saliency", option)


def test_evaluate_out_that_is_a_file_fails_before_scoring(photos, tmp_path, capsys):
    target = tmp_path / "report"
    target.write_text("a file the user keeps")
    status, err = run(capsys, "evaluate", "--baseline", "gray", "--images", photos, "--out", target)
    assert status == 2
    one_clear_line(err, "evaluate", "--out", "is a file")
    assert target.read_text() == "a file the user keeps"


def test_colorize_never_writes_into_its_input_folder(trained, photos, tmp_path, capsys):
    workdir, _ = trained
    before = snapshot(photos)
    for out in (photos, photos / "colorized"):
        status, err = run(capsys, "colorize", photos, "--workdir", workdir, "--out", out, "--overwrite")
        assert status == 2
        one_clear_line(err, "colorize", "--out", "inside the input folder")
    assert snapshot(photos) == before


def test_colorize_never_replaces_an_input_file(trained, photos, tmp_path, capsys):
    workdir, _ = trained
    before = snapshot(photos)
    status, err = run(
        capsys, "colorize", photos / "astronaut.png", "--workdir", workdir, "--out", tmp_path / "photos", "--overwrite"
    )
    assert status == 1
    assert "would replace it" in err
    assert snapshot(photos) == before


def test_relative_paths_work_like_absolute_ones(trained, photos, tmp_path, capsys, monkeypatch):
    """The README's form: every path relative to the current folder (a trailing slash, too)."""
    workdir, _ = trained
    shutil.copytree(workdir, tmp_path / "runs" / "tiny")
    shutil.copytree(photos, tmp_path / "my photos é")
    monkeypatch.chdir(tmp_path)
    status, err = run(capsys, "colorize", "my photos é/", "--workdir", "runs/tiny/", "--out", "colorized")
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "colorized")) == ["astronaut.png", "chelsea.png"]
    status, err = run(capsys, "evaluate", "--workdir", "runs/tiny", "--images", "my photos é", "--out", "results/tiny")
    assert status == 0, err
    assert (tmp_path / "results" / "tiny" / "summary.json").is_file()
    os.symlink(tmp_path / "runs" / "tiny", tmp_path / "linked")
    status, err = run(capsys, "colorize", "my photos é", "--workdir", "linked", "--out", "again")
    assert status == 0, err


def test_a_failed_overwrite_leaves_the_old_report_whole(photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    argv = ["evaluate", "--baseline", "gray", "--images", photos, "--out", out, "--save-images"]
    assert run(capsys, *argv)[0] == 0
    before = {p: (out / p).read_bytes() for p in ("summary.json", "per_image.csv", "images.txt", "grid.png")}

    def full_disk(path, image):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(reporting, "write_png", full_disk)
    os.remove(photos / "chelsea.jpg")  # The new report would differ.
    status, err = run(capsys, *argv, "--overwrite")
    assert status == 2
    one_clear_line(err, "evaluate", "No space left on device")
    assert {p: (out / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["photos", "report"]  # No temporary folders left.


def test_save_images_overwrite_leaves_no_stale_predictions(photos, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate", "--baseline", "gray", "--images", photos, "--out", out, "--save-images"]
    assert run(capsys, *argv)[0] == 0
    assert sorted(os.listdir(out / "predictions")) == ["astronaut.png", "chelsea.png"]
    os.remove(photos / "chelsea.jpg")
    assert run(capsys, *argv, "--overwrite")[0] == 0
    assert sorted(os.listdir(out / "predictions")) == ["astronaut.png"]
    assert json.loads((out / "summary.json").read_text())["n"] == 1


def test_convert_weights_to_a_folder_is_one_clear_line(tmp_path, capsys):
    src = tmp_path / "siggraph17.pth"
    src.write_bytes(b"not read")
    (tmp_path / "weights").mkdir()
    status, err = run(capsys, "convert-weights", "siggraph17", src, tmp_path / "weights")
    assert status == 2
    one_clear_line(err, "convert-weights", "is a folder")
    assert sorted(os.listdir(tmp_path)) == ["siggraph17.pth", "weights"]
    assert os.listdir(tmp_path / "weights") == []


def test_weights_with_a_non_array_leaf_are_one_clear_line(photos, tmp_path, capsys):
    bad = tmp_path / "bad.msgpack"
    payload = {"kind": "smsanet", "meta": {}, "variables": {"params": {"model1": {"kernel": "text"}}}}
    bad.write_bytes(flax.serialization.msgpack_serialize(payload))
    argv = ["colorize", photos, "--params", bad, "--config", tiny_checkpoint.TINY, "--out", tmp_path / "out"]
    status, err = run(capsys, *argv)
    assert status == 2
    one_clear_line(err, "colorize", "not an array")


@pytest.mark.parametrize(
    "override, needle",
    [("--config.nokey=1", "--config.nokey: no such key"), ("--config.model.widht=8", "did you mean model.width")],
)
def test_a_misspelt_config_key_is_named_plainly(tmp_path, capsys, override, needle):
    status, err = run(capsys, "train", "--config", tiny_checkpoint.TINY, "--workdir", tmp_path / "run", override)
    assert status == 2
    line = one_clear_line(err, "train", needle)
    assert "\\'" not in line and "\\n" not in line


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "kept.txt").write_text("old")

    def half(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(str(tmp_path / "kept.txt"), half)
    assert os.listdir(tmp_path) == ["kept.txt"] and (tmp_path / "kept.txt").read_text() == "old"


def test_replace_folder_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path):
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with files.replace_folder(str(target)) as staging:
            (np.zeros(1)).tofile(os.path.join(staging, "new.bin"))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["report"] and os.listdir(target) == ["old.txt"]
    with files.replace_folder(str(target)) as staging:
        open(os.path.join(staging, "new.txt"), "w").close()
    assert os.listdir(tmp_path) == ["report"] and os.listdir(target) == ["new.txt"]


def test_report_folder_check_names_the_existing_report(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="--overwrite"):
        evaluation.check_report_folder(str(tmp_path), overwrite=False)
    assert evaluation.check_report_folder(str(tmp_path), overwrite=True) == str(tmp_path)


def test_links_loops_and_fifos_among_inputs_are_named_and_skipped(trained, photos, tmp_path, capsys):
    """Never opened (a FIFO would block a reader forever), never a traceback; the good photos are done."""
    workdir, _ = trained
    os.symlink(photos / "missing.png", photos / "dangling.png")
    os.symlink(photos / "loop.jpg", photos / "loop.jpg")
    os.mkfifo(photos / "pipe.jpg")
    os.mkfifo(tmp_path / "given.jpg")
    signal.alarm(600)  # A hang fails the test instead of blocking the suite.
    try:
        status, err = run(
            capsys, "colorize", photos, tmp_path / "given.jpg", "--workdir", workdir, "--out", tmp_path / "o"
        )
        assert status == 1
        failed = err.split("inputs failed:")[1]
        for name in ("dangling.png", "loop.jpg", "pipe.jpg", "given.jpg"):
            assert name in failed, name
        assert "Traceback" not in err
        assert sorted(os.listdir(tmp_path / "o")) == ["astronaut.png", "chelsea.png"]
        status, err = run(capsys, "evaluate", "--baseline", "gray", "--images", photos, "--out", tmp_path / "r")
        assert status == 0, err
        assert json.loads((tmp_path / "r" / "summary.json").read_text())["n"] == 2
    finally:
        signal.alarm(0)
