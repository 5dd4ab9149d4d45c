"""Tests of the datasets (sample_photos, image folders) and the grain loaders built on them."""

import hashlib
import io
import json
import math
import os
import re
import signal
import socket
import stat
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
from smsanet_jax.data import decode, folders, image_folder, pipeline, sample_photos, sources

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
    listing = folders.list_folder(str(folder))
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


# --- what users feed it: each case leaves the user's files as they were ---------------------------


def _snapshot(folder) -> dict:
    """Every entry under `folder` (links not followed): type, target or bytes, and mtime."""
    out = {}
    for directory, subdirs, names in os.walk(folder):
        for name in subdirs + names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = ("file", f.read())
            else:
                content = ("other", stat.S_IFMT(st.st_mode))
            out[os.path.relpath(path, folder)] = (content, st.st_mtime_ns)
    return out


@pytest.fixture
def no_hang():
    """Fails a test that blocks (e.g. opening a FIFO) instead of hanging the suite."""

    def alarm(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("count", [2, 3, 5, 36])
def test_every_flat_folder_of_two_or_more_images_can_train_and_evaluate(tmp_path, count):
    # 0.png ... 35.png: the 5% path-hash rule puts none of them in validation.
    names = [f"{i}.png" for i in range(count)]
    assert not any(image_folder._bucket(n) < image_folder.VALIDATION_PERCENT for n in names)
    folder = _colour_folder(tmp_path / "photos", names)
    before = _snapshot(folder)
    info = data.prepare(str(folder), data_dir=str(tmp_path / "tfds"))
    by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode()).digest())
    assert dict(info.splits) == {"train": count - 1, "validation": 1}
    assert data.example_name(info.name, "validation", 0, data_dir=str(tmp_path / "tfds")) == by_hash[0]
    batches = list(_eval(str(tmp_path / "tfds"), name=info.name, split="validation"))
    assert sum(b["mask"].sum() for b in batches) == 1
    assert _snapshot(folder) == before


def test_hash_split_leaves_train_one_image_when_it_would_take_all():
    names = [f"img_{i}.png" for i in range(400)]
    both = [n for n in names if image_folder._bucket(n) < image_folder.VALIDATION_PERCENT][:2]
    splits = image_folder.assign_splits(both)
    largest = max(both, key=lambda n: hashlib.sha256(n.encode()).digest())
    assert splits == {"train": [largest], "validation": [n for n in both if n != largest]}


def test_every_split_is_nonempty_for_any_folder_size():
    for count in range(2, 80):
        splits = image_folder.assign_splits([f"photo_{i}.jpg" for i in range(count)])
        assert splits["train"] and splits["validation"], count


@pytest.mark.parametrize("extra", [[], ["broken.jpg"]], ids=["one-image", "one-readable-image"])
def test_a_one_image_folder_is_a_clear_error_at_prepare_time(tmp_path, extra):
    folder = _colour_folder(tmp_path / "photos", ["only.png"])
    for name in extra:
        (folder / name).write_bytes(b"\xff\xd8 not a jpeg")
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"only one readable image \(only.png\): .*validation split"):
        data.prepare(str(folder), data_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / image_folder.BUILDER_NAME).exists()
    assert _snapshot(folder) == before


def _make_hostile_entries(folder, outside) -> dict[str, str]:
    """Links, a loop, a FIFO... beside real images; returns {entry: expected reason (a regex)}."""
    Image.new("RGB", (40, 30), (200, 30, 30)).save(outside / "linked.png")
    (outside / "linked_folder").mkdir()
    Image.new("RGB", (40, 30), (30, 30, 200)).save(outside / "linked_folder" / "x.png")
    os.symlink(outside / "linked.png", folder / "link_to_image.png")  # Followed: listed.
    os.symlink(outside / "linked_folder", folder / "link_to_folder")  # Followed: listed.
    os.symlink(folder / "gone.png", folder / "dangling.jpg")
    os.symlink(folder / "self_loop.jpg", folder / "self_loop.jpg")
    os.symlink("..", folder / "sub" / "up")  # A folder that contains itself.
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("/dev/zero", folder / "zeros.png")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(folder / "sock.png"))
    return {
        "dangling.jpg": "dangling symbolic link",
        "self_loop.jpg": "symbolic link loop",
        "sub/up": "symbolic link to a folder listed already",
        "pipe.jpg": r"not a regular file \(a FIFO\)",
        "zeros.png": r"not a regular file \(a device\)",
        "sock.png": r"not a regular file \(a socket\)",
    }


def test_links_loops_fifos_and_devices_are_skipped_by_name_never_opened(tmp_path, no_hang):
    folder = _colour_folder(tmp_path / "photos", ["a.png"])
    (folder / "sub").mkdir()
    Image.new("RGB", (40, 30), (30, 200, 30)).save(folder / "sub" / "b.png")
    (tmp_path / "outside").mkdir()
    expected = _make_hostile_entries(folder, tmp_path / "outside")
    before = _snapshot(folder)
    listing = folders.list_folder(str(folder))
    assert listing.relpaths == ["a.png", "link_to_folder/x.png", "link_to_image.png", "sub/b.png"]
    skipped = dict(listing.skipped)
    assert skipped.keys() == expected.keys()
    for entry, reason in expected.items():
        assert re.match(reason, skipped[entry]), (entry, skipped[entry])
    info = data.prepare(str(folder), data_dir=str(tmp_path / "tfds"))
    assert sum(info.splits.values()) == 4 and dict(info.skipped) == skipped
    text = str(info)
    assert "skipped 6 files: dangling.jpg (dangling symbolic link); pipe.jpg" in text and "and 1 more" in text
    assert _snapshot(folder) == before


@pytest.mark.parametrize(
    "entry,problem",
    [
        ("a.png", None),
        ("link_to_image.png", None),
        ("dangling.jpg", "dangling symbolic link"),
        ("self_loop.jpg", "symbolic link loop"),
        ("pipe.jpg", "not a regular file (a FIFO): not opened"),
        ("zeros.png", "not a regular file (a device): not opened"),
        ("sub", "a folder, not a file"),
        ("missing.jpg", "no such file"),
    ],
)
def test_regular_file_problem_names_what_a_given_path_is(tmp_path, no_hang, entry, problem):
    folder = _colour_folder(tmp_path / "photos", ["a.png"])
    (folder / "sub").mkdir()
    (tmp_path / "outside").mkdir()
    _make_hostile_entries(folder, tmp_path / "outside")
    before = _snapshot(folder)
    assert folders.regular_file_problem(str(folder / entry)) == problem
    assert _snapshot(folder) == before


def test_a_folder_of_only_bad_entries_names_them(tmp_path, no_hang):
    (tmp_path / "photos").mkdir()
    os.mkfifo(tmp_path / "photos" / "pipe.jpg")
    with pytest.raises(ValueError, match=r"no image files .*\(skipped: pipe.jpg \(not a regular file \(a FIFO\)"):
        data.prepare(str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"))


# --- identity: what the data is, not when its files were touched -----------------------------------


def test_touched_files_keep_the_dataset_and_a_saved_iterator_resumes(tmp_path):
    folder = _colour_folder(tmp_path / "photos", [f"{i}.png" for i in range(6)])
    data_dir = str(tmp_path / "tfds")
    name = data.prepare(str(folder), data_dir=data_dir).name
    loader = _train(data_dir, name=name, local_batch_size=2)
    iterator = iter(loader)
    _take(iterator, 2)
    state = iterator.get_state()
    following = _take(iterator, 2)
    for path in folder.iterdir():  # `touch`, and a new inode with the same bytes.
        content = path.read_bytes()
        path.unlink()
        path.write_bytes(content)
        os.utime(path, ns=(1, 1))
    sources._cached_source.cache_clear()  # As a new run would: list the folder afresh.
    again = data.prepare(str(folder), data_dir=data_dir)
    assert again.reused
    resumed_loader = _train(data_dir, name=name, local_batch_size=2)
    assert resumed_loader.identity == loader.identity
    assert repr(resumed_loader.source) == repr(loader.source)
    resumed = iter(resumed_loader)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), following)
    # A changed image is different data: a new dataset, and the identity says so.
    Image.new("RGB", (40, 30), (0, 0, 0)).save(folder / "0.png")
    sources._cached_source.cache_clear()
    changed = _train(data_dir, name=name, local_batch_size=2).identity
    assert changed["dataset"] != loader.identity["dataset"] and changed["num_records"] == loader.identity["num_records"]


def test_loader_identity_is_plain_json_naming_the_data(photos_dir):
    train = _train(photos_dir, local_batch_size=2, seed=7)
    assert (
        json.loads(json.dumps(train.identity))
        == train.identity
        == {
            "dataset": "sample_photos/1.0.0",
            "split": "train",
            "num_records": len(sample_photos.TRAIN_FILES),
            "local_batch_size": 2,
            "num_workers": 0,
            "process_index": 0,
            "process_count": 1,
            "seed": 7,
        }
    )
    evaluation = _eval(photos_dir, split="validation", process_index=1, process_count=2)
    assert evaluation.identity["split"] == "validation" and evaluation.identity["process_index"] == 1


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("imagenet2021", r"unknown dataset 'imagenet2021'; close matches: imagenet2012"),
        ("sample_photo", r"close matches: sample_photos"),
        ("nosuchds", r"unknown dataset 'nosuchds'; a folder path must start with \./, \.\./, /, ~ or folder:"),
    ],
)
def test_an_unknown_dataset_is_one_line_with_close_matches(tmp_path, name, expected):
    for call in (
        lambda: data.prepare(name, data_dir=str(tmp_path)),
        lambda: data.open_source(name, "validation", data_dir=str(tmp_path)),  # evaluate --dataset
    ):
        with pytest.raises(ValueError, match=expected) as error:
            call()
        assert "\n" not in str(error.value) and len(str(error.value)) < 250


def test_a_folder_name_without_prefix_gets_the_spelling_and_a_trailing_slash_works(tmp_path, monkeypatch):
    _colour_folder(tmp_path / "my_photos")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"my_photos is a folder here: write \./my_photos"):
        data.prepare("my_photos", data_dir=str(tmp_path / "tfds"))
    assert data.prepare("my_photos/", data_dir=str(tmp_path / "tfds")).splits["train"] >= 1


def test_prepared_dataset_prints_splits_and_the_first_skipped_files():
    skipped = tuple((f"bad_{i}.jpg", "empty file") for i in range(8))
    text = str(data.PreparedDataset("folder:/p", "/d/x", {"validation": 2, "train": 30}, skipped))
    assert text == (
        "folder:/p: prepared in /d/x (train 30, validation 2 images); skipped 8 files: bad_0.jpg (empty file); "
        "bad_1.jpg (empty file); bad_2.jpg (empty file); bad_3.jpg (empty file); bad_4.jpg (empty file); and 3 more"
    )


# --- gray_threshold ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1000.0, 386.8, -1.0, float("nan")])
def test_an_impossible_gray_threshold_is_refused_up_front(photos_dir, threshold):
    with pytest.raises(ValueError, match=r"data.gray_threshold=\S+: must be in \[0, 386.8\)"):
        _train(photos_dir, gray_threshold=threshold)


def _gray_folder(tmp_path):
    yy, xx = np.mgrid[0:40, 0:40]
    folder = tmp_path / "gray"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((xx * 6 + i).astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")
    return data.prepare(str(folder), data_dir=str(tmp_path / "tfds")).name


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_grayscale_only_folder_names_gray_threshold(tmp_path, num_workers):
    name = _gray_folder(tmp_path)
    loader = _train(str(tmp_path / "tfds"), name=name, gray_threshold=5.0, num_workers=num_workers)
    with pytest.raises(ValueError, match=r"in a row were near-grayscale .*lower data.gray_threshold") as error:
        _take(loader, 1)
    assert "\n" not in str(error.value)


# --- padding and the decode cache -------------------------------------------------------------


@pytest.mark.parametrize("num_ids,batch,count", [(7, 2, 1), (7, 2, 3), (2, 4, 4), (9, 3, 2), (1, 1, 8)])
def test_pad_for_process_covers_the_ids_with_equal_batch_counts(num_ids, batch, count):
    ids = np.arange(100, 100 + num_ids)
    parts = [data.pad_for_process(ids, batch, i, count) for i in range(count)]
    assert len({n for n, _ in parts}) == 1
    for n, padded in parts:
        assert padded.shape == (n * batch,) and padded.dtype == np.int64
        assert np.all(padded[np.argmax(padded < 0) :] < 0) or np.all(padded >= 0)  # Padding at the end.
    np.testing.assert_array_equal(np.concatenate([p[p >= 0] for _, p in parts]), ids)
    assert parts[0][0] == math.ceil(math.ceil(num_ids / count) / batch)


@pytest.mark.parametrize("cache_bytes", [0, 100_000, pipeline.DEFAULT_DECODE_CACHE_BYTES])
def test_the_decode_cache_changes_no_batch(photos_dir, monkeypatch, cache_bytes):
    reference = _take(_train(photos_dir, decode_cache_bytes=0), 6)  # 24 examples: 3+ epochs.
    decoded = []
    real = decode.decode_rgb
    monkeypatch.setattr(decode, "decode_rgb", lambda *a, **k: decoded.append(1) or real(*a, **k))
    _assert_same_batches(_take(_train(photos_dir, decode_cache_bytes=cache_bytes), 6), reference)
    n = len(sample_photos.TRAIN_FILES)
    # No cache: every example; a tiny one holds the small (reduced-size) JPEGs; the default all.
    assert len(decoded) >= 24 if cache_bytes == 0 else n <= len(decoded) < 24
    if cache_bytes == pipeline.DEFAULT_DECODE_CACHE_BYTES:
        assert len(decoded) == n
