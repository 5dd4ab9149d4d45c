"""Tests of the datasets (sample_photos, image folders) and the grain loaders built on them."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import grain.python as grain_py
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from smsanet_jax import data
from smsanet_jax.data import image_folder, pipeline, sample_photos, sources

SIZE = 32
BANDS_4 = np.array([[255, 0, 0], [0, 200, 0], [0, 0, 255], [250, 250, 0]])


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    """A data dir holding sample_photos, built once for this module."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("sample_photos", data_dir=data_dir)
    return data_dir


def _train(data_dir, **kwargs):
    args = dict(
        name="sample_photos",
        data_dir=data_dir,
        image_size=SIZE,
        local_batch_size=4,
        seed=0,
        gray_threshold=0.0,
        process_index=0,
        process_count=1,
    )
    return data.make_train_loader(**{**args, **kwargs})


def _take(loader_or_iterator, n):
    it = iter(loader_or_iterator)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- sample_photos -----------------------------------------------------------------------------


def test_sample_photos_builds_with_expected_splits(tmp_path):
    info = data.prepare("sample_photos", data_dir=str(tmp_path))
    assert dict(info.splits) == {
        "train": len(sample_photos.TRAIN_FILES),
        "validation": len(sample_photos.VALIDATION_FILES),
    }
    assert not info.reused and not info.skipped
    assert data.prepare("sample_photos", data_dir=str(tmp_path)).reused
    source = data.open_source("sample_photos", "validation", data_dir=str(tmp_path))
    assert sorted(source.name(i) for i in range(len(source))) == sorted(sample_photos.VALIDATION_FILES)
    coffee = [i for i in range(len(source)) if source.name(i) == "coffee.png"][0]
    image = data.read_image("sample_photos", "validation", coffee, data_dir=str(tmp_path))
    assert image.shape == (400, 600, 3)


def test_train_batches_have_the_promised_structure(photos_dir):
    batch = _take(_train(photos_dir), 1)[0]
    assert set(batch) == {"rgb", "id"}
    assert batch["rgb"].shape == (4, SIZE, SIZE, 3) and batch["rgb"].dtype == np.uint8
    assert batch["id"].shape == (4,) and batch["id"].dtype == np.int64


def test_tfds_name_not_prepared_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="prepare-data mnist"):
        _train(str(tmp_path), name="mnist")


def test_reading_never_imports_tensorflow(photos_dir):
    # In a fresh process: other tests in this session may have imported TensorFlow already.
    code = (
        "import sys; from smsanet_jax import data; "
        f"it = iter(data.make_train_loader(name='sample_photos', data_dir={photos_dir!r}, "
        "image_size=16, local_batch_size=2, seed=0, process_index=0, process_count=1)); next(it); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --- determinism, epochs, sharding, resume -----------------------------------------------------


def test_same_seed_same_batches_other_seed_differs(photos_dir):
    first = _take(_train(photos_dir), 3)
    _assert_same_batches(first, _take(_train(photos_dir), 3))
    other = _take(_train(photos_dir, seed=1), 3)
    assert any(not np.array_equal(a["rgb"], b["rgb"]) for a, b in zip(first, other))


def test_every_epoch_is_a_new_permutation(photos_dir):
    n = len(sample_photos.TRAIN_FILES)
    epochs = [b["id"] for b in _take(_train(photos_dir, local_batch_size=n), 3)]
    for ids in epochs:
        assert sorted(ids) == list(range(n))
    assert len({tuple(ids) for ids in epochs}) == 3


@pytest.mark.parametrize("count", [2, 4])
def test_train_global_batches_do_not_depend_on_the_process_count(photos_dir, count):
    """Process shards are disjoint parts of one global stream: stacked, they equal one process's."""
    global_batch = 4
    single = _take(_train(photos_dir, local_batch_size=global_batch), 5)
    shards = [
        _take(_train(photos_dir, local_batch_size=global_batch // count, process_index=i, process_count=count), 5)
        for i in range(count)
    ]
    for step, expected in enumerate(single):
        stacked = {k: np.concatenate([shard[step][k] for shard in shards]) for k in expected}
        _assert_same_batches([stacked], [expected])
    parts = [set(shard[0]["id"].tolist()) for shard in shards]  # Within the first epoch: disjoint.
    assert sum(map(len, parts)) == len(set.union(*parts)) == global_batch


def test_resume_with_orbax_yields_the_next_batches(photos_dir, tmp_path):
    k, n = 2, 3
    reference = _take(_train(photos_dir), k + n)
    iterator = iter(_train(photos_dir))
    _take(iterator, k)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(k, args=ocp.args.Composite(data=grain_py.PyGrainCheckpointSave(iterator)))
        manager.wait_until_finished()
        _take(iterator, 1)  # Moving on after the save must not change what was saved.
        restored = iter(_train(photos_dir))
        manager.restore(k, args=ocp.args.Composite(data=grain_py.PyGrainCheckpointRestore(restored)))
    _assert_same_batches(_take(restored, n), reference[k:])


# --- evaluation --------------------------------------------------------------------------------


def _eval(data_dir, **kwargs):
    args = dict(
        name="sample_photos",
        split="train",
        data_dir=data_dir,
        image_size=SIZE,
        local_batch_size=2,
        process_index=0,
        process_count=1,
    )
    return data.make_eval_loader(**{**args, **kwargs})


@pytest.mark.parametrize("count", [2, 4])
def test_eval_shards_cover_the_split_exactly_with_padding(photos_dir, count):
    loaders = [_eval(photos_dir, process_index=i, process_count=count) for i in range(count)]
    assert len({loader.num_batches for loader in loaders}) == 1
    seen = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == loader.num_batches
        for b in batches:
            assert b["rgb"].shape == (2, SIZE, SIZE, 3) and b["mask"].dtype == bool
            assert np.all(b["rgb"][~b["mask"]] == 0) and np.all(b["id"][~b["mask"]] == -1)
            seen += b["id"][b["mask"]].tolist()
    assert sorted(seen) == list(range(len(sample_photos.TRAIN_FILES)))


def test_eval_subset_is_fixed_by_seed_whatever_the_process_count(photos_dir):
    def chosen(count, seed):
        ids = []
        for i in range(count):
            for b in _eval(photos_dir, process_index=i, process_count=count, num_examples=4, seed=seed):
                ids += b["id"][b["mask"]].tolist()
        return sorted(ids)

    one = chosen(1, seed=3)
    assert len(one) == 4 and one == chosen(2, seed=3) == chosen(4, seed=3)
    assert one == data.select_examples(len(sample_photos.TRAIN_FILES), 4, 3).tolist()
    assert one != data.select_examples(len(sample_photos.TRAIN_FILES), 4, 4).tolist()


def test_eval_is_the_center_crop_of_the_image(photos_dir):
    loader = _eval(photos_dir, split="validation", image_size=48)
    for batch in loader:
        for rgb, i in zip(batch["rgb"][batch["mask"]], batch["id"][batch["mask"]]):
            original = Image.fromarray(loader.source.image(int(i)))
            np.testing.assert_array_equal(rgb, data.transforms.center_crop(original, 48))


# --- image folders and bad input ---------------------------------------------------------------


def _png48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = rgb16.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _write_problem_folder(folder) -> tuple[dict, set]:
    """One file per kind of awkward input.

    Returns:
      ({file: (expected RGB, tolerance)} for the convertible files, {files that must be skipped}).
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    photo = np.stack([xx * 4, yy * 5, 255 - xx * 3], -1).astype(np.uint8)  # Smooth: JPEG-friendly.
    palette_rgb = BANDS_4[(xx // 16) % 4].astype(np.uint8)
    palette = Image.fromarray(palette_rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    alpha = np.dstack([np.full((48, 64, 3), (200, 30, 30), np.uint8), np.where(xx < 32, 0, 255).astype(np.uint8)])
    gray16 = (yy * 5).astype(np.uint16) * 257
    rgb16 = photo.astype(np.uint16) * 257
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32], stored[:, 32:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = np.concatenate([np.full((32, 32, 3), (255, 0, 0), np.uint8), np.full((32, 32, 3), (0, 0, 255), np.uint8)])
    tiny = rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)
    noise = _encode(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), "JPEG")
    files = {
        "cmyk.jpg": (_encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95), photo, 12),
        "gray.png": (_encode(Image.fromarray(photo[..., 1]), "PNG"), np.repeat(photo[..., 1:2], 3, 2), 0),
        "palette.png": (_encode(palette, "PNG"), palette_rgb, 0),
        "alpha.png": (
            _encode(Image.fromarray(alpha, "RGBA"), "PNG"),
            np.where(xx[..., None] < 32, 255, alpha[..., :3]).astype(np.uint8),
            0,
        ),
        "gray16.png": (_encode(Image.fromarray(gray16), "PNG"), np.repeat((yy * 5)[..., None], 3, 2), 0),
        "rgb16.png": (_png48(rgb16), photo, 0),
        # No chroma subsampling: the red/blue edge stays sharp enough to check pixels.
        "sub/rotated.jpg": (
            _encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif.tobytes()),
            rotated,
            12,
        ),
        "tiny.png": (_encode(Image.fromarray(tiny), "PNG"), tiny, 0),
        "one_pixel.png": (_encode(Image.fromarray(tiny[:1, :1]), "PNG"), tiny[:1, :1], 0),
        "photo.webp": (_encode(Image.fromarray(photo), "WEBP", lossless=True), photo, 0),
        "photo.bmp": (_encode(Image.fromarray(photo), "BMP"), photo, 0),
        "sub/photo.tiff": (_encode(Image.fromarray(photo), "TIFF"), photo, 0),
        "truncated.jpg": (noise[: len(noise) * 2 // 3], None, None),
        "empty.jpg": (b"", None, None),
        "not_an_image.png": (b"these are not the pixels you are looking for\n", None, None),
    }
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an image extension: ignored")
    for name, (content, _, _) in files.items():
        (folder / name).write_bytes(content)
    expected = {name: (rgb, tol) for name, (_, rgb, tol) in files.items() if rgb is not None}
    return expected, {name for name, (_, rgb, _) in files.items() if rgb is None}


def _images_by_name(name, data_dir, splits):
    out = {}
    for split in splits:
        source = data.open_source(name, split, data_dir=data_dir)
        out.update({source.name(i): source.image(i) for i in range(len(source))})
    return out


def test_folder_with_every_bad_input_prepares_converts_and_skips(tmp_path):
    expected, bad = _write_problem_folder(tmp_path / "photos")
    info = data.prepare(str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"))
    assert info.name == "folder:" + str((tmp_path / "photos").resolve())
    assert {name for name, _ in info.skipped} == bad
    assert sum(info.splits.values()) == len(expected)
    images = _images_by_name(info.name, str(tmp_path / "tfds"), info.splits)
    assert images.keys() == expected.keys()
    for name, (rgb, tolerance) in expected.items():
        assert images[name].shape == rgb.shape, name
        np.testing.assert_allclose(images[name], rgb, atol=tolerance, err_msg=name)
    # The tiny and one-pixel images are upscaled; near-grayscale ones pass with threshold 0.
    loader = data.make_train_loader(
        name=info.name,
        data_dir=str(tmp_path / "tfds"),
        image_size=SIZE,
        local_batch_size=8,
        seed=0,
        gray_threshold=0.0,
        process_index=0,
        process_count=1,
    )
    iterator = iter(loader)
    ids = np.concatenate([next(iterator)["id"] for _ in range(3)])
    assert set(ids.tolist()) == set(range(info.splits["train"]))
    assert iterator.skipped == {"unreadable": 0, "near-grayscale": 0}


def _colour_folder(folder, names=("a.png", "b.png", "c.png")):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (10 + 20 * i, 200, 30)).save(folder / name)
    return folder


def test_folder_is_reused_until_its_files_change(tmp_path):
    folder = _colour_folder(tmp_path / "photos")
    first = data.prepare("folder:" + str(folder), data_dir=str(tmp_path / "tfds"))
    assert not first.reused
    again = data.prepare("folder", source=str(folder), data_dir=str(tmp_path / "tfds"))
    assert again.reused and again.path == first.path
    Image.new("RGB", (40, 30), (200, 10, 30)).save(folder / "d.png")
    changed = data.prepare(str(folder), data_dir=str(tmp_path / "tfds"))
    assert not changed.reused and changed.path != first.path


def test_folder_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        (tmp_path / "photos" / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 50, 0, 100)).save(tmp_path / "photos" / split / f"{i}.png")
    info = data.prepare(str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"))
    assert dict(info.splits) == {"train": 3, "validation": 2}
    name = data.example_name(info.name, "validation", 0, data_dir=str(tmp_path / "tfds"))
    assert name.startswith("val/")


def test_hash_split_is_per_file():
    paths = [f"img_{i}.jpg" for i in range(2000)]
    splits = image_folder.assign_splits(paths)
    assert 0.03 < len(splits["validation"]) / len(paths) < 0.07
    grown = image_folder.assign_splits(paths + [f"new_{i}.jpg" for i in range(100)])
    assert set(splits["validation"]) <= set(grown["validation"])


def test_folder_without_readable_images_fails_before_writing(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    (tmp_path / "photos" / "b.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of its 2 image files could be decoded"):
        data.prepare(str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / image_folder.BUILDER_NAME).exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.prepare(str(tmp_path / "empty"), data_dir=str(tmp_path / "tfds"))


def test_loader_prepares_a_folder_on_demand(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 100, 0)).save(tmp_path / "photos" / f"{i}.png")
    batch = _take(_train(str(tmp_path / "tfds"), name=str(tmp_path / "photos")), 1)[0]
    assert batch["rgb"].shape == (4, SIZE, SIZE, 3)


def _unchecked_folder_dataset(folder, data_dir, files: dict):
    """Writes `files` and builds a folder dataset *without* the readability check, as if a tfds
    dataset held broken records: the loaders must cope at read time."""
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    listing = image_folder.list_folder(str(folder))
    image_folder.SmsanetImageFolder(
        key=image_folder.dataset_key(listing, data_dir),
        listing=listing,
        splits={"train": sorted(files)},
        skipped=[],
        data_dir=data_dir,
        file_format="array_record",
    ).download_and_prepare()
    return "folder:" + str(folder)


def test_unreadable_and_gray_examples_are_skipped_and_counted_at_read_time(tmp_path):
    yy, xx = np.mgrid[0:40, 0:40]
    colour = _encode(Image.fromarray(np.stack([xx * 6, yy * 6, 255 - xx * 6], -1).astype(np.uint8)), "PNG")
    gray = _encode(Image.fromarray((xx * 6).astype(np.uint8)), "PNG")
    files = {"a.png": colour, "b.png": colour, "gray.png": gray, "bad.jpg": b"\xff\xd8junk"}
    name = _unchecked_folder_dataset(tmp_path / "photos", str(tmp_path / "tfds"), files)
    source = data.open_source(name, "train", data_dir=str(tmp_path / "tfds"))
    usable = {i for i in range(len(source)) if source.name(i) in ("a.png", "b.png")}
    iterator = iter(_train(str(tmp_path / "tfds"), name=name, local_batch_size=2, gray_threshold=5.0))
    for _ in range(6):
        assert set(next(iterator)["id"].tolist()) <= usable
    assert iterator.skipped["unreadable"] >= 3 and iterator.skipped["near-grayscale"] >= 3
    evaluated = list(_eval(str(tmp_path / "tfds"), name=name, local_batch_size=4))
    assert evaluated[0]["mask"].sum() == 3  # Gray images are evaluated; the broken one is masked.


def test_a_shard_of_only_unreadable_examples_stops_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_SKIPS", 10)
    name = _unchecked_folder_dataset(tmp_path / "photos", str(tmp_path / "tfds"), {"bad.jpg": b"", "x.png": b"0"})
    with pytest.raises(ValueError, match="10 training examples in a row were unreadable .*prepare it again"):
        _take(_train(str(tmp_path / "tfds"), name=name), 1)


def test_tfrecord_dataset_gets_the_convert_command(tmp_path):
    info = data.prepare(str(_colour_folder(tmp_path / "photos")), data_dir=str(tmp_path / "tfds"))
    # Pretend it was written as tfrecord (writing one for real needs TensorFlow).
    path = os.path.join(info.path, "dataset_info.json")
    with open(path) as f:
        dataset_info = json.load(f)
    dataset_info["fileFormat"] = "tfrecord"
    with open(path, "w") as f:
        json.dump(dataset_info, f)
    command = r"tfds convert_format --dataset_version_dir=\S+ --out_file_format=array_record"
    with pytest.raises(ValueError, match=command):
        sources.open_source(info.name, "train", data_dir=str(tmp_path / "tfds"))


# --- worker processes (one short test: they are slow to start on a small machine) ----------------


@pytest.mark.slow
def test_worker_processes_give_the_same_examples_and_resume(photos_dir):
    stream = _take(_train(photos_dir), 4)
    ids, rgb = np.concatenate([b["id"] for b in stream]), np.concatenate([b["rgb"] for b in stream])
    iterator = iter(_train(photos_dir, num_workers=2))
    for i, batch in enumerate(_take(iterator, 3)):
        # Worker i % 2 batches every other example of the stream, each cropped as without workers.
        positions = (i // 2) * 8 + i % 2 + 2 * np.arange(4)
        np.testing.assert_array_equal(batch["id"], ids[positions])
        np.testing.assert_array_equal(batch["rgb"], rgb[positions])
    state = iterator.get_state()
    following = _take(iterator, 2)
    restored = iter(_train(photos_dir, num_workers=2))
    restored.set_state(state)
    _assert_same_batches(_take(restored, 2), following)
