"""Dataset names -> prepared tfds datasets: preparation, and random access to one split's images.

A dataset `name` is one of:
  * `sample_photos` - the embedded default (scikit-image's colour photos);
  * an image folder - `folder:PATH`, or a path starting with `/`, `./`, `../` or `~`, or ending
    with `/`;
  * any other tfds dataset name with an image feature (`imagenet2012`, `oxford_flowers102`, ...).
Everything is stored in array_record format under the tfds data dir and read with random access
(`as_data_source`); reading imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import logging
import os
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from smsanet_jax.data import decode, folders, image_folder, sample_photos

FOLDER_PREFIX = "folder:"
SAMPLE_PHOTOS = "sample_photos"
_PATH_PREFIXES = ("/", "./", "../", "~")
_RANDOM_ACCESS_FORMAT = "array_record"
# Skipped files named by `PreparedDataset.__str__`; the rest are counted.
_NAMED_SKIPS = 5


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """What `prepare` made (or found already made)."""

    name: str  # What to give the loaders as `name` (for folders: `folder:<absolute path>`).
    path: str  # The prepared dataset's directory.
    splits: Mapping[str, int]  # Split -> number of examples.
    skipped: tuple[tuple[str, str], ...] = ()  # (file, reason): files left out (unreadable, links...).
    reused: bool = False  # Already prepared: nothing was written.

    def __str__(self) -> str:
        """One line: name, where, images per split, and the skipped files (the first few by name)."""
        splits = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items()))
        state = "already prepared" if self.reused else "prepared"
        line = f"{self.name}: {state} in {self.path} ({splits} images)"
        if self.skipped:
            named = "; ".join(f"{f} ({r})" for f, r in self.skipped[:_NAMED_SKIPS])
            more = len(self.skipped) - _NAMED_SKIPS
            line += f"; skipped {len(self.skipped)} files: {named}" + (f"; and {more} more" if more > 0 else "")
        return line


def default_data_dir() -> str:
    """tfds's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets (read at call time)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def is_folder(name: str) -> bool:
    """Whether `name` names an image folder rather than a tfds dataset."""
    return name.startswith(FOLDER_PREFIX) or name.startswith(_PATH_PREFIXES) or name.endswith("/")


def _folder_path(name: str) -> str:
    path = name[len(FOLDER_PREFIX) :] if name.startswith(FOLDER_PREFIX) else name
    return os.path.realpath(os.path.expanduser(path))


def prepare(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None, source: str | None = None
) -> PreparedDataset:
    """Prepares a dataset in array_record format (the `smsanet-jax prepare-data` command).

    Preparing an already prepared dataset does nothing. tfds and this function show progress bars.

    Args:
      name: `sample_photos`, an image folder (`folder:PATH` or a path) or a tfds dataset name.
      data_dir: the tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      manual_dir: where manually downloaded files are (e.g. ImageNet's tars, see the README).
      source: an image folder; the same as giving it as `name` (then `name` may be `folder`).

    Returns:
      What was prepared, with the name to give the loaders.

    Raises:
      ValueError: unknown name, a folder without readable images, or a dataset stored in a format
        without random access (the message gives the `tfds` command that converts it).
    """
    data_dir = _resolve(data_dir)
    if source is not None:
        if name != "folder" and not (is_folder(name) and _folder_path(name) == _folder_path(source)):
            raise ValueError(f"`source` prepares an image folder; give the name `folder`, not {name!r}")
        name = FOLDER_PREFIX + source
    with _prepare_lock(data_dir):
        if is_folder(name):
            return _prepare_folder(_folder_path(name), data_dir)
        builder = _tfds_builder(name, data_dir, file_format=_RANDOM_ACCESS_FORMAT)
        reused = builder.is_prepared()
        if not reused:
            download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=download_config)
    _check_random_access(builder)
    return _summary(name, builder, reused)


def _folder_version(root: str, data_dir: str) -> tuple[folders.FolderListing, str, str]:
    """(listing, content key, prepared dataset directory) of the folder's current content."""
    listing = folders.list_folder(root)
    key = image_folder.dataset_key(listing, data_dir)
    return listing, key, image_folder.builder_dir(data_dir, key)


def _prepare_folder(root: str, data_dir: str) -> PreparedDataset:
    listing, key, path = _folder_version(root, data_dir)
    reused = _is_prepared(path)
    if reused:
        logging.info("%s: reusing %s (same content as when it was prepared)", root, path)
    else:
        logging.info("%s: preparing %d files into %s", root, len(listing.files), path)
        image_folder.build(listing, data_dir, key)
    builder = tfds.builder_from_directory(path)
    unreadable = [tuple(s) for s in builder.info.metadata.get("skipped", [])]
    return _summary(FOLDER_PREFIX + listing.root, builder, reused, tuple(sorted(list(listing.skipped) + unreadable)))


def _summary(name: str, builder, reused: bool, skipped: tuple = ()) -> PreparedDataset:
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    return PreparedDataset(name, os.fspath(builder.data_dir), splits, skipped, reused)


def _is_prepared(builder_dir: str) -> bool:
    return os.path.exists(os.path.join(builder_dir, "dataset_info.json"))


def _resolve(data_dir: str | None) -> str:
    return os.path.realpath(os.path.expanduser(data_dir or default_data_dir()))


def _tfds_builder(name: str, data_dir: str, **kwargs):
    """The tfds builder of `name` (`sample_photos` is this package's own builder class)."""
    if name == SAMPLE_PHOTOS:
        return sample_photos.SamplePhotos(data_dir=data_dir, **kwargs)
    try:
        return tfds.builder(name, data_dir=data_dir, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(_unknown_dataset(name)) from None


def _unknown_dataset(name: str) -> str:
    """One line for a name that is neither a tfds dataset nor a folder path (tfds lists ~450)."""
    message = f"unknown dataset {name!r}"
    known = [SAMPLE_PHOTOS, *tfds.list_builders(with_community_datasets=False)]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        message += f"; close matches: {', '.join(close)}"
    if os.path.isdir(name):
        return message + f"; {name} is a folder here: write ./{name} (or folder:{name}) to use it"
    return message + "; a folder path must start with ./, ../, /, ~ or folder: (or end with /)"


def _check_random_access(builder) -> None:
    formats = {f.value for f in builder.info.available_file_formats()}
    if _RANDOM_ACCESS_FORMAT not in formats:
        raise ValueError(
            f"{builder.info.full_name} in {builder.data_dir} is stored as {', '.join(sorted(formats))}, "
            "which the grain loader cannot read by index. Convert it in place with:\n"
            f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
            f"--out_file_format={_RANDOM_ACCESS_FORMAT}"
        )


@contextlib.contextmanager
def _prepare_lock(data_dir: str) -> Iterator[None]:
    """Serialises preparation between processes sharing `data_dir`.

    Several processes of one run may prepare the same dataset on demand: the first prepares it,
    the others wait and then reuse it.
    """
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".smsanet_prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepared_builder(name: str, data_dir: str):
    """The builder of a prepared dataset; folders and sample_photos are prepared here if needed."""
    if is_folder(name):
        _, _, path = _folder_version(_folder_path(name), data_dir)
        if not _is_prepared(path):
            logging.info("%s is not prepared yet: preparing it now", name)
            prepare(name, data_dir=data_dir)
        builder = tfds.builder_from_directory(path)
    else:
        builder = _tfds_builder(name, data_dir)
        if not builder.is_prepared():
            if name != SAMPLE_PHOTOS:
                manual = " --manual-dir DIR" if name.startswith("imagenet") else ""
                raise ValueError(
                    f"{name} is not prepared in {data_dir}; run: smsanet-jax prepare-data "
                    f"{name} --data-dir {data_dir}{manual}"
                )
            logging.info("%s is not prepared yet: preparing it now", name)
            prepare(name, data_dir=data_dir)
            builder = _tfds_builder(name, data_dir)
    _check_random_access(builder)
    return builder


def _image_key(features) -> str:
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            return key
    raise ValueError(f"the dataset has no image feature (features: {', '.join(features)})")


class ImageSource:
    """One split's encoded images by index (a grain random-access data source).

    Records are `{"image": encoded bytes, "name": str, "id": int64 index in the split}`. The name is
    the dataset's `file_name` feature when it has one (the relative path, for folders), else
    `"<split>/<index>"`.
    """

    def __init__(self, builder, split: str):
        if split.split("[")[0] not in builder.info.splits:  # `train[:10%]` slices are fine.
            raise ValueError(
                f"{builder.info.full_name} has no split {split!r} (it has {', '.join(sorted(builder.info.splits))})"
            )
        self._image_key = _image_key(builder.info.features)
        self._has_file_name = "file_name" in builder.info.features
        self._source = builder.as_data_source(split, decoders={self._image_key: tfds.decode.SkipDecoding()})
        self.dataset = builder.info.full_name
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        return {"image": record[self._image_key], "name": self._name(record, index), "id": np.int64(index)}

    def _name(self, record: Mapping, index: int) -> str:
        if self._has_file_name:
            name = record["file_name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        return f"{self.split}/{index}"

    def name(self, index: int) -> str:
        """The stable name of example `index` (see the class docstring)."""
        return self[index]["name"]

    def image(self, index: int) -> np.ndarray:
        """Example `index` at full resolution, uint8 [H, W, 3] (upright, converted to RGB).

        Raises:
          decode.UnreadableImageError: the stored bytes do not decode.
        """
        return np.asarray(decode.decode_rgb(self[index]["image"]))

    def __repr__(self) -> str:
        # grain compares this string when restoring an iterator: it names the data, not its location.
        return f"ImageSource({self.dataset}, split={self.split}, num_records={len(self)})"


def open_source(name: str, split: str, *, data_dir: str | None = None) -> ImageSource:
    """One split of a dataset for random access; folders and sample_photos are prepared if needed.

    Sources are cached per process, so a folder is listed once per run.

    Raises:
      ValueError: see `prepare`; also an unprepared tfds dataset or an unknown split.
    """
    return _cached_source(name, split, _resolve(data_dir))


@functools.lru_cache(maxsize=16)
def _cached_source(name: str, split: str, data_dir: str) -> ImageSource:
    return ImageSource(_prepared_builder(name, data_dir), split)


def example_name(name: str, split: str, index: int, *, data_dir: str | None = None) -> str:
    """The stable name of one example (relative path for folders, `file_name`, or `split/index`)."""
    return open_source(name, split, data_dir=data_dir).name(index)


def read_image(name: str, split: str, index: int, *, data_dir: str | None = None) -> np.ndarray:
    """One example's original image, uint8 [H, W, 3] at full resolution."""
    return open_source(name, split, data_dir=data_dir).image(index)
