"""evaluate: every artefact, per-image numbers against scikit-image, the gray baseline, stable lists across devices."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage import color
from skimage import metrics as skmetrics

from smsanet_jax import cli, evaluation, inference, weights
from smsanet_jax.data import decode, transforms
from tests import tiny_checkpoint
from tests.net_utils import communicate_all, free_port

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_checkpoint.trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three photos (one in a subfolder, one as JPEG) and a file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    os.makedirs(root / "sub")
    shutil.copy(os.path.join(skimage.data.data_dir, PHOTOS[0]), root / PHOTOS[0])
    shutil.copy(os.path.join(skimage.data.data_dir, PHOTOS[1]), root / "sub" / PHOTOS[1])
    Image.open(os.path.join(skimage.data.data_dir, PHOTOS[2])).save(root / "coffee.jpg", quality=90)
    (root / "notes.jpg").write_text("not an image")
    return str(root)


def report(colorizer, images, out, **options):
    """Scores and writes a report, as the command does; returns its summary."""
    return evaluation.evaluate_to_folder(colorizer, images, out, **options).summary


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def colorfulness(rgb):
    """Hasler & Suesstrunk 2003 in float64, written independently of smsanet_jax.metrics."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())


def skimage_scores(pred, truth):
    return {
        "psnr": skmetrics.peak_signal_noise_ratio(truth, pred, data_range=255),
        "ssim": skmetrics.structural_similarity(pred, truth, channel_axis=-1, data_range=255),
        "ssim_gaussian": skmetrics.structural_similarity(
            pred, truth, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        ),
        "colorfulness": colorfulness(pred),
    }


def check_against_skimage(out_dir, rows):
    for row in rows:
        png = evaluation.image_file_name(row["name"])
        pred = read_rgb(os.path.join(out_dir, "predictions", png))
        truth = read_rgb(os.path.join(out_dir, "truth", png))
        expected = skimage_scores(pred, truth)
        for k, v in expected.items():
            np.testing.assert_allclose(float(row[k]), v, rtol=1e-5, atol=2e-5, err_msg=f"{row['name']} {k}")


@pytest.fixture(scope="module")
def folder_report(trained, folder, tmp_path_factory):
    workdir, _ = trained
    out = str(tmp_path_factory.mktemp("eval") / "report")
    colorizer = inference.load_colorizer(workdir=workdir)
    summary = report(colorizer, evaluation.FolderImages(folder), out, batch_size=4, save_images=True)
    return out, summary, colorizer


def test_folder_evaluation_writes_every_artefact(folder_report, folder):
    out, summary, colorizer = folder_report
    names = ["astronaut.png", "coffee.jpg", "sub/chelsea.png"]
    with open(os.path.join(out, "images.txt"), "rb") as f:
        listing = f.read()
    assert listing.decode().splitlines() == names
    rows = read_csv(os.path.join(out, "per_image.csv"))
    assert [r["name"] for r in rows] == names
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert saved["n"] == 3 and saved["images"] == names and saved["unreadable"] == ["notes.jpg"]
    assert saved["images_sha256"] == hashlib.sha256(listing).hexdigest()
    assert saved["model"]["step"] == 4 and saved["model"]["source"] == colorizer.provenance["source"]
    assert saved["model"]["params_sha256"] == inference.params_sha256(colorizer.variables)
    assert saved["model"]["config"]["model"]["width"] == 8
    assert saved["data"]["folder"] == os.path.realpath(folder) and saved["data"]["image_size"] == 256
    for k in evaluation.METRICS:
        values = np.array([float(r[k]) for r in rows])
        stats = saved[k]
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["std"] == pytest.approx(values.std(ddof=1))
        assert stats["ci95"][0] < stats["mean"] < stats["ci95"][1]
    assert saved["psnr"]["n_infinite"] == 0
    ranked = sorted(rows, key=lambda r: -float(r["psnr"]))
    assert [saved["grid"][k] for k in ("best", "median", "worst")] == [r["name"] for r in ranked]
    grid = read_rgb(os.path.join(out, "grid.png"))
    assert grid.shape == (3 * 258 - 2, 3 * 258 - 2, 3)
    # The middle column is the worst image's prediction, as saved.
    worst = read_rgb(os.path.join(out, "predictions", evaluation.image_file_name(ranked[-1]["name"])))
    np.testing.assert_array_equal(grid[2 * 258 :, 258 : 258 + 256], worst)
    with pytest.raises(ValueError, match="--overwrite"):
        report(colorizer, evaluation.FolderImages(folder), out)


def test_per_image_numbers_equal_skimage_on_saved_images(folder_report, folder):
    out, _, _ = folder_report
    check_against_skimage(out, read_csv(os.path.join(out, "per_image.csv")))
    # The saved ground truth is the protocol's crop of the original file.
    with open(os.path.join(folder, "sub", "chelsea.png"), "rb") as f:
        crop = transforms.center_crop(decode.decode_rgb(f.read()), 256)
    np.testing.assert_array_equal(read_rgb(os.path.join(out, "truth", "sub", "chelsea.png")), crop)


def test_gray_baseline_scores_the_gray_prediction(folder, tmp_path):
    out = str(tmp_path / "gray")
    summary = report(
        inference.load_colorizer(baseline="gray"), evaluation.FolderImages(folder), out, batch_size=4, save_images=True
    )
    assert summary["model"]["source"] == "baseline:gray"
    rows = read_csv(os.path.join(out, "per_image.csv"))
    for row in rows:
        png = evaluation.image_file_name(row["name"])
        truth = read_rgb(os.path.join(out, "truth", png))
        lab = color.rgb2lab(truth)
        lab[..., 1:] = 0
        gray = np.clip(np.rint(color.lab2rgb(lab) * 255), 0, 255).astype(np.uint8)
        pred = read_rgb(os.path.join(out, "predictions", png))
        # float32 vs float64 Lab may round a rare pixel to the neighbouring level.
        assert np.mean(pred != gray) < 1e-3 and np.abs(pred.astype(int) - gray).max() <= 1
        assert float(row["psnr"]) == pytest.approx(
            skmetrics.peak_signal_noise_ratio(truth, gray, data_range=255), abs=0.01
        )
        assert float(row["colorfulness"]) < 1.0
    check_against_skimage(out, rows)


def test_image_list_and_summary_stable_across_runs_and_device_counts(trained, folder, tmp_path, capsys):
    workdir, data_dir = trained
    colorizer = inference.load_colorizer(workdir=workdir)
    subset = dict(data_dir=data_dir, num_images=5, seed=3)
    images = evaluation.DatasetImages("sample_photos", "train", **subset)
    assert list(images.ids) == list(evaluation.DatasetImages("sample_photos", "train", **subset).ids)
    one = report(colorizer, images, str(tmp_path / "one"), batch_size=4, num_devices=1)
    assert one["n"] == 5 and one["run"]["devices"] == 1
    four = report(
        colorizer,
        evaluation.DatasetImages("sample_photos", "train", **subset),
        str(tmp_path / "four"),
        batch_size=4,
        num_devices=4,
    )
    assert four["run"]["devices"] == 4
    # Everything but the run record is the same; the numbers up to float32 noise (convolutions over
    # 4 or 1 images per device may round a pixel of the prediction differently).
    fixed = lambda s: {k: v for k, v in s.items() if k != "run" and k not in evaluation.METRICS}
    assert json.dumps(fixed(one), sort_keys=True) == json.dumps(fixed(four), sort_keys=True)
    for k in evaluation.METRICS:
        np.testing.assert_allclose(
            [one[k]["mean"], one[k]["std"], *one[k]["ci95"]],
            [four[k]["mean"], four[k]["std"], *four[k]["ci95"]],
            rtol=1e-5,
            err_msg=k,
        )
    assert one["data"] == {
        "dataset": "sample_photos/1.0.0",
        "split": "train",
        "num_records": 7,
        "num_images_requested": 5,
        "seed": 3,
        "image_size": 256,
    }

    # The command: the same folder list hash as the library call, on 4 devices.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "evaluate",
                "--workdir",
                workdir,
                "--images",
                folder,
                "--out",
                str(tmp_path / "cli"),
                "--num-devices",
                "4",
                "--batch-size",
                "4",
            ]
        )
    assert exit_info.value.code == 0
    assert "psnr" in capsys.readouterr().out
    with open(tmp_path / "cli" / "summary.json", encoding="utf-8") as f:
        from_cli = json.load(f)
    direct = report(colorizer, evaluation.FolderImages(folder), str(tmp_path / "direct"), batch_size=4, num_devices=1)
    assert from_cli["images_sha256"] == direct["images_sha256"]
    assert from_cli["psnr"]["mean"] == pytest.approx(direct["psnr"]["mean"], rel=1e-5)


def test_model_choice_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="exactly one model"):
        inference.load_colorizer(baseline="gray", workdir=str(tmp_path))
    with pytest.raises(ValueError, match="go together"):
        inference.load_colorizer(params=str(tmp_path / "w.msgpack"))
    with pytest.raises(ValueError, match="no config.json"):
        inference.load_colorizer(workdir=str(tmp_path))


def test_a_weights_file_with_its_config_scores_like_the_workdir(folder_report, folder, tmp_path):
    out, summary, colorizer = folder_report
    weights_file = str(tmp_path / "tiny.msgpack")
    weights.save_variables(weights_file, colorizer.variables, kind="smsanet")
    loaded = inference.load_colorizer(params=weights_file, config=tiny_checkpoint.TINY)  # SMSA at 32x32.
    assert loaded.provenance["params_sha256"] == summary["model"]["params_sha256"]
    again = report(loaded, evaluation.FolderImages(folder), str(tmp_path / "again"), batch_size=4)
    assert again["psnr"]["mean"] == pytest.approx(summary["psnr"]["mean"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_give_the_summary_of_one(trained, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on loopback): 5 images split 2 + 3, padded."""
    workdir, data_dir = trained
    subset = [
        "--dataset",
        "sample_photos",
        "--split",
        "train",
        "--data-dir",
        data_dir,
        "--num-images",
        "5",
        "--seed",
        "3",
        "--batch-size",
        "4",
        "--save-images",
    ]
    single = report(
        inference.load_colorizer(workdir=workdir),
        evaluation.DatasetImages("sample_photos", "train", data_dir=data_dir, num_images=5, seed=3),
        str(tmp_path / "single"),
        batch_size=4,
        num_devices=4,
    )
    out = tmp_path / "multi"
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smsanet_jax",
                "evaluate",
                "--workdir",
                workdir,
                *subset,
                "--out",
                str(out),
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            cwd=tiny_checkpoint.ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = communicate_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    with open(out / "summary.json", encoding="utf-8") as f:
        multi = json.load(f)
    assert multi["run"]["processes"] == 2 and multi["run"]["devices"] == 4
    for k in ("n", "images", "images_sha256", "grid", "data", "model"):
        assert multi[k] == json.loads(json.dumps(single[k])), k
    for k in evaluation.METRICS:
        assert multi[k]["mean"] == pytest.approx(single[k]["mean"], rel=1e-5)
    assert sorted(os.listdir(out / "predictions")) == sorted(map(evaluation.image_file_name, single["images"]))
